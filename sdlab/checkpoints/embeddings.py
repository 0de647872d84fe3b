"""Textual-inversion embeddings: the files AUTOMATIC1111, diffusers and SDXL tools write, read and written.

    AUTOMATIC1111 .pt           {"string_to_param": {"*": (n, D)}, "string_to_token": …, "name": …, "step": …}
    AUTOMATIC1111 .safetensors  {"emb_params": (n, D)}
    diffusers learned_embeds    {"<token>": (D,) or (n, D)}   (.bin or .safetensors)
    SDXL                        {"clip_l": (n, 768), "clip_g": (n, 1280)}: one block per text encoder

An embedding is used by its name (the file's stem) in a prompt; its n vectors stand where the name's
tokens stand (prompts.py). The pickled kinds are read with PyTorch's weights-only unpickler.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sdlab.checkpoints import formats
from sdlab.errors import CheckpointError

SDXL_KEYS = ("clip_l", "clip_g")  # first and second text encoder of SDXL
A1111_SAFETENSORS_KEY = "emb_params"
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


@dataclass
class Embedding:
    """A named set of token vectors: one (n, D_i) block per text encoder of the model it is for."""

    name: str
    vectors: tuple[Tensor, ...]
    source: str = ""

    @property
    def length(self) -> int:
        return self.vectors[0].shape[0]


def _blocks(obj: object, path: Path) -> dict[str, Tensor]:
    """The file's tensors by name, whatever its layout."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    params = obj.get("string_to_param")
    if isinstance(params, Mapping):  # AUTOMATIC1111 .pt
        tensors = {k: v for k, v in params.items() if isinstance(v, Tensor)}
        if len(tensors) != 1:
            raise CheckpointError(f"{path}: string_to_param holds {len(tensors)} tensors; expected one")
        return {A1111_SAFETENSORS_KEY: next(iter(tensors.values()))}
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors; not a textual-inversion embedding")
    return tensors


def read_embedding(path: str | os.PathLike, dims: Sequence[int]) -> Embedding:
    """An embedding file for a model whose text encoders have hidden sizes `dims` (e.g. (768,), or (768, 1280))."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix in formats.SAFETENSORS_SUFFIXES:
        blocks, _ = formats.read_weights(path, dtype=torch.float32)
    elif path.suffix in formats.PICKLE_SUFFIXES:
        blocks = formats.read_pickle_object(path)
    else:
        raise CheckpointError(f"{path}: unknown embedding format {path.suffix!r}; expected .safetensors, .pt or .bin")
    blocks = _blocks(blocks, path)
    if len(dims) == 2 and set(SDXL_KEYS) <= blocks.keys():
        vectors = tuple(blocks[k] for k in SDXL_KEYS)
    elif len(blocks) == 1 and len(dims) == 1:
        vectors = (next(iter(blocks.values())),)
    elif len(dims) == 2:
        raise CheckpointError(
            f"{path}: an embedding for one text encoder ({', '.join(blocks)}); this SDXL model needs clip_l and clip_g"
        )
    else:
        raise CheckpointError(f"{path}: holds {', '.join(sorted(blocks))}; expected one tensor (or clip_l + clip_g for SDXL)")
    vectors = tuple(v.detach().float().reshape(-1, v.shape[-1]) if v.dim() else v for v in vectors)  # (D,) -> (1, D)
    for i, (v, dim) in enumerate(zip(vectors, dims)):
        if v.dim() != 2 or v.shape[-1] != dim:
            raise CheckpointError(
                f"{path}: vectors of shape {tuple(v.shape)} for a text encoder of width {dim}; "
                "is this embedding for another model family?"
            )
    if len({v.shape[0] for v in vectors}) != 1:
        raise CheckpointError(f"{path}: clip_l and clip_g hold different numbers of vectors")
    if not all(torch.isfinite(v).all() for v in vectors):
        raise CheckpointError(f"{path}: holds NaN or infinite values")
    return Embedding(path.stem, vectors, str(path))


def write_embedding(path: str | os.PathLike, embedding: Embedding, layout: str = "a1111") -> Path:
    """Write `embedding`: "a1111" (emb_params, or clip_l/clip_g for two encoders) or "diffusers"
    ({"<name>": vectors}, one encoder only) as .safetensors."""
    path = Path(path)
    vectors = [v.detach().float().cpu().contiguous() for v in embedding.vectors]
    if layout == "diffusers":
        if len(vectors) != 1:
            raise CheckpointError("diffusers' learned_embeds layout holds one text encoder; use the a1111 layout for SDXL")
        tensors = {embedding.name: vectors[0]}
    elif layout == "a1111":
        tensors = dict(zip(SDXL_KEYS, vectors)) if len(vectors) == 2 else {A1111_SAFETENSORS_KEY: vectors[0]}
    else:
        raise CheckpointError(f"unknown embedding layout {layout!r}; use a1111 or diffusers")
    formats.write_safetensors(path, tensors, {"name": embedding.name})
    return path
