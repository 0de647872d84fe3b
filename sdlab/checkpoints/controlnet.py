"""Load and save ControlNets in the layouts people have them:

diffusers folder    config.json (`ControlNetModel`) + diffusion_pytorch_model[.fp16].safetensors / .bin
diffusers file      one file with `controlnet_cond_embedding.*` keys (most SDXL ControlNets)
original file       ldm `cldm.py` names (`input_hint_block.*`, `zero_convs.*`), bare or under
                    `control_model.` (whole cldm checkpoints also hold the U-Net, VAE and text
                    encoder; only `control_model.*` is read); .safetensors, .pth or .ckpt

A single file's config comes from sdlab's metadata when sdlab wrote it, else from tensor shapes:
widths, levels, attention and transformer depth per level, cross-attention width, linear
projections and SDXL's label embedding. What weights cannot show follows the family's
convention: heads (SD1 8 per level, SD2/SDXL head dim 64), SD2 attention upcast, the SDXL
time-id sinusoid width (256), and no global pooling (pass a diffusers folder for a "shuffle" model).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from sdlab import __version__
from sdlab.checkpoints import formats
from sdlab.checkpoints.keymaps import rename
from sdlab.checkpoints.keymaps.controlnet import (
    HINT_PREFIX,
    controlnet_config_from_diffusers,
    controlnet_config_to_diffusers,
    controlnet_from_diffusers,
    controlnet_key_pairs,
    controlnet_to_diffusers,
)
from sdlab.checkpoints.load import _component_state, _read_json, build
from sdlab.checkpoints.save import DIFFUSERS_VERSION
from sdlab.config import ControlNetConfig, Family, UNetConfig, family_of, to_dict
from sdlab.errors import CheckpointError
from sdlab.models.controlnet import ControlNet

CONTROL_PREFIX = "control_model."
CONFIG_METADATA_KEY = "sdlab_controlnet_config"
ORIGINAL_MARK = "input_hint_block.0.weight"
DIFFUSERS_MARK = HINT_PREFIX + "conv_in.weight"
OTHER_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.", "model_ema.")
SD1_HEADS = 8  # heads per level of every SD 1.x transformer
HEAD_DIM = 64  # SD 2.x / SDXL: heads = channels // 64
WEIGHTS_STEM = "diffusion_pytorch_model"


def load_controlnet(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = torch.float32,
    device: torch.device | str = "cpu",
    family_hint: Family | None = None,
) -> ControlNet:
    """A ControlNet (its config on `.cfg`) from a diffusers folder or a single file.

    `family_hint` names the base family when the weights leave it open (it decides the heads
    of a single file without sdlab metadata); by default it is read off the architecture.
    """
    path = Path(source).expanduser()
    dtype = formats.parse_dtype(dtype)
    if path.is_dir():
        state, cfg = _read_folder(path, dtype, device, family_hint)
    elif path.is_file():
        state, cfg = _read_single_file(path, dtype, device, family_hint)
    else:
        raise CheckpointError(f"{source}: no such file or folder")
    return build(lambda: ControlNet(cfg), state, f"{path} (ControlNet)")


def _read_folder(folder: Path, dtype, device, family: Family | None) -> tuple[dict, ControlNetConfig]:
    if not (folder / "config.json").is_file() and (folder / "model_index.json").is_file():
        raise CheckpointError(
            f"{folder}: a whole diffusers pipeline, not a ControlNet;"
            " pass a ControlNet folder (config.json of a ControlNetModel)"
        )
    d = _read_json(folder / "config.json")
    kind = d.get("_class_name", "ControlNetModel")
    if kind != "ControlNetModel":
        raise CheckpointError(f"{folder / 'config.json'}: a {kind}, not a ControlNetModel")
    cfg = controlnet_config_from_diffusers(d, family)
    return controlnet_from_diffusers(_component_state(folder, None, dtype, device), cfg), cfg


def _read_single_file(path: Path, dtype, device, family: Family | None) -> tuple[dict, ControlNetConfig]:
    seen: list[str] = []

    def keep(key: str) -> bool:  # skip the rest of a whole cldm checkpoint without converting it
        seen.append(key)
        return not key.startswith(OTHER_PREFIXES)

    state, extras = formats.read_weights(path, keep=keep, dtype=dtype, device=device)
    if formats.any_key(state, CONTROL_PREFIX):
        state = formats.strip_prefix(state, CONTROL_PREFIX)
    marked = DIFFUSERS_MARK in state or ORIGINAL_MARK in state
    if not marked or any("lora" in k for k in seen):  # Control-LoRA files carry the marks too
        raise CheckpointError(f"{path}: not a ControlNet{_what_it_is(seen)}; {_EXPECTED}")
    stored = formats.config_from_metadata(ControlNetConfig, extras, CONFIG_METADATA_KEY, str(path))
    try:
        if DIFFUSERS_MARK in state:
            state = original_names(state, stored, source=f"{path} (diffusers layout)")
        cfg = stored or config_from_shapes(state, family, source=str(path))
    except KeyError as e:
        raise CheckpointError(f"{path}: cannot read the ControlNet's architecture, key {e} is missing") from None
    return state, cfg


_EXPECTED = (
    f"expected '{ORIGINAL_MARK}' (original layout, bare or under '{CONTROL_PREFIX}')"
    f" or '{DIFFUSERS_MARK}' (diffusers layout)"
)


def _what_it_is(keys: list[str]) -> str:
    if any("lora" in k for k in keys):
        return " (it holds LoRA weights; LoRA and Control-LoRA files are not supported here)"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return " (it is a whole Stable Diffusion checkpoint without 'control_model.*' keys)"
    return " (no ControlNet keys)" if keys else " (it holds no tensors)"


# --- configs from tensor shapes ------------------------------------------------------------------
def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    """The distinct integers the first group of `pattern` matches at the start of `keys`, sorted."""
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return sorted(found)


def config_from_shapes(
    state: Mapping[str, torch.Tensor], family: Family | None = None, *, source: str = "ControlNet"
) -> ControlNetConfig:
    """A ControlNet config read off an original-layout state dict (no `control_model.` prefix);
    KeyError when a tensor it reads is absent."""
    keys = list(state)
    blocks = len(_indices(keys, r"input_blocks\.(\d+)\."))
    levels = len(_indices(keys, r"input_blocks\.(\d+)\.0\.op\.weight")) + 1  # a downsample ends all levels but the last
    layers = blocks // levels - 1
    if blocks != levels * (layers + 1) or layers < 1:
        raise CheckpointError(f"{source}: {blocks} input blocks do not make {levels} levels of res blocks + downsample")
    first = [1 + level * (layers + 1) for level in range(levels)]  # each level's first res block
    attention = tuple(f"input_blocks.{i}.1.norm.weight" in state for i in first)
    depth = [len(_indices(keys, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")) or 1 for i in first]
    depth[-1] = len(_indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."))  # mid depth = last level's
    channels = tuple(state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in first)
    label = state.get("label_emb.0.0.weight")
    unet = UNetConfig(
        in_channels=state["input_blocks.0.0.weight"].shape[1],
        block_out_channels=channels,
        layers_per_block=layers,
        attention=attention,
        transformer_depth=tuple(depth),
        num_heads=(1,) * levels,  # set below from the family
        cross_attention_dim=state["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        use_linear_projection=state["middle_block.1.proj_in.weight"].ndim == 2,
        addition_embed_dim=None if label is None else label.shape[1],
    )
    family = family or family_of(unet)
    heads = (SD1_HEADS,) * levels if family == "sd1" else tuple(max(1, c // HEAD_DIM) for c in channels)
    unet = replace(unet, num_heads=heads, upcast_attention=family == "sd2")
    hint = _indices(keys, r"input_hint_block\.(\d+)\.weight")  # convs: in, (same, stride 2) per step, out
    widths = [state[f"input_hint_block.{i}.weight"].shape[0] for i in hint[:-1:2]]
    return ControlNetConfig(unet, family, state[ORIGINAL_MARK].shape[1], tuple(widths))


def original_names(
    state: Mapping[str, torch.Tensor], cfg: ControlNetConfig | None = None, *, source: str = "diffusers ControlNet"
) -> dict[str, torch.Tensor]:
    """A diffusers-layout ControlNet state dict under the original names. Without `cfg` the
    naming is read off the keys; the config itself then comes from `config_from_shapes`."""
    pairs = controlnet_key_pairs(cfg or _structure_of_diffusers(state))
    return rename(state, {theirs: ours for ours, theirs in pairs}, source=source)


def _structure_of_diffusers(state: Mapping[str, torch.Tensor]) -> ControlNetConfig:
    """Just enough of a diffusers-layout ControlNet's config to name its keys the original way:
    levels, res blocks per level, widths, attention and depth per level, label embedding, hint steps."""
    keys = list(state)
    levels = range(len(_indices(keys, r"down_blocks\.(\d+)\.")))
    if not levels:
        raise KeyError("down_blocks.0.resnets.0.conv1.weight")
    attention = tuple(f"down_blocks.{i}.attentions.0.norm.weight" in state for i in levels)
    depth = [len(_indices(keys, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")) or 1 for i in levels]
    depth[-1] = len(_indices(keys, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")) or 1
    label = state.get("add_embedding.linear_1.weight")
    unet = UNetConfig(
        block_out_channels=tuple(state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in levels),
        layers_per_block=len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\.")),
        attention=attention,
        transformer_depth=tuple(depth),
        num_heads=(1,) * len(levels),
        addition_embed_dim=None if label is None else label.shape[1],
    )
    steps = len(_indices(keys, rf"{re.escape(HINT_PREFIX)}blocks\.(\d+)\.")) // 2
    return ControlNetConfig(unet, family_of(unet), hint_embedding_channels=(1,) * (steps + 1))


# --- saving --------------------------------------------------------------------------------------
def save_controlnet(net: ControlNet, path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> Path:
    """`*.safetensors`: one original-layout file (keys under `control_model.`, the config in its
    metadata); any other path: a diffusers folder (config.json + diffusion_pytorch_model.safetensors)."""
    path = Path(path)
    state = formats.cast_all(net.state_dict(), formats.parse_dtype(dtype))
    if path.suffix in formats.SAFETENSORS_SUFFIXES + formats.PICKLE_SUFFIXES:
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: sdlab writes single files as .safetensors only")
        metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(to_dict(net.cfg)), "sdlab_version": __version__}
        formats.write_safetensors(path, formats.with_prefix(state, CONTROL_PREFIX), metadata)
        return path
    return _save_folder(net.cfg, controlnet_to_diffusers(state, net.cfg), path)


def _save_folder(cfg: ControlNetConfig, weights: dict[str, torch.Tensor], folder: Path) -> Path:
    with formats.atomic_folder(folder) as tmp:
        config = {"_class_name": "ControlNetModel", "_diffusers_version": DIFFUSERS_VERSION}
        formats.write_json(tmp / "config.json", config | controlnet_config_to_diffusers(cfg))
        formats.write_safetensors(tmp / f"{WEIGHTS_STEM}.safetensors", weights, {"format": "pt"})
    return folder
