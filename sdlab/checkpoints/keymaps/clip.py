"""CLIP text encoder weights and configs: transformers (sdlab's own names) and OpenCLIP layouts.

sdlab's `CLIPTextModel` uses the names of a transformers `CLIPTextModel` / `CLIPTextModelWithProjection`
saved to disk (`text_model.encoder.layers.N.…`, `text_projection.weight`). The OpenCLIP layout is the
one SD2 (`cond_stage_model.model.`) and SDXL's bigG (`conditioner.embedders.1.model.`) single files use;
the functions here take and give its keys without that prefix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from sdlab.checkpoints.keymaps import check_shapes, rename
from sdlab.config import TextEncoderConfig
from sdlab.errors import CheckpointError
from sdlab.models.clip import ACTIVATIONS, CLIPTextModel
from sdlab.models.empty import empty_modules

TEXT_MODEL = "text_model."
POSITION_IDS = "embeddings.position_ids"  # a buffer older transformers versions saved; never a weight
PROJECTION = "text_projection.weight"
OPEN_CLIP_PROJECTION = "text_projection"  # (hidden, projection_dim), used as x @ P, so P = weight.T
OPEN_CLIP_UNUSED = ("logit_scale",)  # the contrastive temperature; the text tower never reads it
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")

# sdlab layer-relative name -> OpenCLIP resblock-relative name, for the tensors copied as they are
_LAYER_NAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = ("q_proj", "k_proj", "v_proj")  # stacked in this order in OpenCLIP's in_proj

# transformers' `CLIPTextConfig` defaults, for fields a config.json leaves out
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
    "eos_token_id": 49407,
}
# SD's config.json files carry eos_token_id 2, a placeholder: transformers then pools at the largest
# token id, which for CLIP's vocabulary is the first EOS (49407) — what sdlab does with the real id.
_PLACEHOLDER_EOS = 2
_REAL_EOS = 49407


def expected_shapes(cfg: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Every sdlab parameter name and shape for `cfg` (built on the meta device: no memory, no time)."""
    with empty_modules():
        model = CLIPTextModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --- transformers ---------------------------------------------------------------------------------


def clip_from_transformers(state: Mapping[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """A transformers CLIP text state dict -> sdlab's, checked key by key and shape by shape.

    Takes files as saved (`text_model.…`) and the flattened names of transformers >= 5.6's
    `CLIPTextModel.state_dict()` (`embeddings.…`); drops a stray `position_ids` buffer.
    """
    state = {k: v for k, v in state.items() if not k.endswith(POSITION_IDS)}
    expected = expected_shapes(cfg)
    flat = not any(k.startswith(TEXT_MODEL) for k in state)
    mapping = {(k.removeprefix(TEXT_MODEL) if flat else k): k for k in expected}
    ours = rename(state, mapping, source="transformers CLIP text encoder")
    check_shapes(ours, expected, source="transformers CLIP text encoder")
    return ours


# --- OpenCLIP -------------------------------------------------------------------------------------


def clip_from_open_clip(state: Mapping[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower (keys without the checkpoint prefix) -> sdlab's state dict.

    Drops what `cfg` does not use: `logit_scale`, resblocks from `cfg.num_layers` on (SD2 ships 24 and
    runs 23) and `text_projection` when the config has no projection. Everything else must match.
    """
    state = _drop_unused(state, cfg)
    check_shapes(state, open_clip_shapes(cfg), source="OpenCLIP text encoder")
    names = _open_clip_names(cfg)
    ours = {k: state[oc] for k, oc in names.items()}
    for i in range(cfg.num_layers):
        ours.update(_split_in_proj(state, i))
    if cfg.projection_dim is not None:
        ours[PROJECTION] = state[OPEN_CLIP_PROJECTION].T.contiguous()  # (P, D)
    return {k: ours[k] for k in expected_shapes(cfg)}


def clip_to_open_clip(state: Mapping[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """sdlab's state dict -> the OpenCLIP layout (no prefix, no `logit_scale`), as diffusers'
    `convert_open_clip_checkpoint` reads it back."""
    check_shapes(state, expected_shapes(cfg), source="sdlab CLIP text encoder")
    theirs = {oc: state[k] for k, oc in _open_clip_names(cfg).items()}
    for i in range(cfg.num_layers):
        theirs.update(_join_in_proj(state, i))
    if cfg.projection_dim is not None:
        theirs[OPEN_CLIP_PROJECTION] = state[PROJECTION].T.contiguous()  # (D, P)
    return {k: theirs[k] for k in open_clip_shapes(cfg)}


def open_clip_shapes(cfg: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Every OpenCLIP text-tower key `cfg` needs, with its shape."""
    ours = expected_shapes(cfg)
    shapes = {oc: ours[k] for k, oc in _open_clip_names(cfg).items()}
    width = cfg.hidden_size
    for i in range(cfg.num_layers):
        shapes[f"transformer.resblocks.{i}.attn.in_proj_weight"] = (3 * width, width)
        shapes[f"transformer.resblocks.{i}.attn.in_proj_bias"] = (3 * width,)
    if cfg.projection_dim is not None:
        shapes[OPEN_CLIP_PROJECTION] = (width, cfg.projection_dim)
    return shapes


def _open_clip_names(cfg: TextEncoderConfig) -> dict[str, str]:
    """sdlab key -> OpenCLIP key, for every tensor that is copied unchanged."""
    names = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for i in range(cfg.num_layers):
        for ours, theirs in _LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                names[f"text_model.encoder.layers.{i}.{ours}.{kind}"] = f"transformer.resblocks.{i}.{theirs}.{kind}"
    return names


def _drop_unused(state: Mapping[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    def used(key: str) -> bool:
        if key in OPEN_CLIP_UNUSED:
            return False
        if key == OPEN_CLIP_PROJECTION:
            return cfg.projection_dim is not None
        block = _RESBLOCK.match(key)
        return block is None or int(block.group(1)) < cfg.num_layers

    return {k: v for k, v in state.items() if used(k)}


def _split_in_proj(state: Mapping[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """OpenCLIP's stacked (3D, D) / (3D,) attention input projection -> q, k, v Linear weights and biases."""
    out = {}
    for kind in ("weight", "bias"):
        parts = state[f"transformer.resblocks.{i}.attn.in_proj_{kind}"].chunk(3, dim=0)  # 3 x (D, D) or (D,)
        for name, part in zip(_QKV, parts):
            # a copy, not a view: safetensors refuses to save tensors that share storage
            out[f"text_model.encoder.layers.{i}.self_attn.{name}.{kind}"] = part.clone()
    return out


def _join_in_proj(state: Mapping[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """q, k, v Linear weights and biases -> OpenCLIP's stacked in_proj (3D, D) / (3D,)."""
    prefix = f"text_model.encoder.layers.{i}.self_attn."
    return {
        f"transformer.resblocks.{i}.attn.in_proj_{kind}": torch.cat([state[f"{prefix}{n}.{kind}"] for n in _QKV])
        for kind in ("weight", "bias")
    }


# --- config.json ----------------------------------------------------------------------------------


def text_encoder_config_from_diffusers(d: Mapping[str, Any]) -> TextEncoderConfig:
    """A transformers `CLIPTextConfig` config.json dict (a diffusers `text_encoder/` folder) -> TextEncoderConfig.

    The projection exists only for `CLIPTextModelWithProjection`: SD2's `CLIPTextModel` config names
    a `projection_dim` its model does not have.
    """
    get = {**_DIFFUSERS_DEFAULTS, **d}.__getitem__
    activation = get("hidden_act")
    if activation not in ACTIVATIONS:
        raise CheckpointError(
            f"text encoder config: hidden_act {activation!r} is not supported; expected one of {', '.join(ACTIVATIONS)}"
        )
    with_projection = "CLIPTextModelWithProjection" in (d.get("architectures") or ())
    eos = int(get("eos_token_id"))
    return TextEncoderConfig(
        vocab_size=int(get("vocab_size")),
        hidden_size=int(get("hidden_size")),
        intermediate_size=int(get("intermediate_size")),
        num_layers=int(get("num_hidden_layers")),
        num_heads=int(get("num_attention_heads")),
        max_positions=int(get("max_position_embeddings")),
        activation=activation,
        layer_norm_eps=float(get("layer_norm_eps")),
        projection_dim=int(get("projection_dim")) if with_projection else None,
        eos_token_id=_REAL_EOS if eos == _PLACEHOLDER_EOS else eos,
    )


def text_encoder_config_to_diffusers(cfg: TextEncoderConfig) -> dict[str, Any]:
    """TextEncoderConfig -> a transformers `CLIPTextConfig` config.json dict that builds the same model."""
    d: dict[str, Any] = {
        "architectures": ["CLIPTextModelWithProjection" if cfg.projection_dim is not None else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_positions,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
        "eos_token_id": cfg.eos_token_id,
    }
    if cfg.projection_dim is not None:
        d["projection_dim"] = cfg.projection_dim
    return d
