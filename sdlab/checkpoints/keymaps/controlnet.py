"""diffusers `ControlNetModel` <-> sdlab (original cldm) ControlNet: names and config.json.

    time_embedding, add_embedding, conv_in,
    down_blocks, mid_block                  the U-Net's encoder names (keymaps/unet.py)
    controlnet_cond_embedding.conv_in       input_hint_block.0
    controlnet_cond_embedding.blocks.k      input_hint_block.(2k + 2)
    controlnet_cond_embedding.conv_out      input_hint_block.(last)
    controlnet_down_blocks.i                zero_convs.i.0
    controlnet_mid_block                    middle_block_out.0

A diffusers ControlNet config.json is a U-Net config without the decoder fields, plus
`conditioning_channels`, `conditioning_embedding_out_channels`, `global_pool_conditions` and
`controlnet_conditioning_channel_order`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from sdlab.checkpoints.keymaps import from_theirs, meta_shapes, to_theirs
from sdlab.checkpoints.keymaps.unet import unet_config_from_diffusers, unet_config_to_diffusers, unet_key_pairs
from sdlab.config import ControlNetConfig, Family, family_of
from sdlab.errors import CheckpointError
from sdlab.models.controlnet import ControlNet
from sdlab.models.unet import ENCODER_MODULES

T = TypeVar("T")
HINT_PREFIX = "controlnet_cond_embedding."


def _conv(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [(f"{ours}.{p}", f"{theirs}.{p}") for p in ("weight", "bias")]


def controlnet_key_pairs(cfg: ControlNetConfig) -> list[tuple[str, str]]:
    """Every ControlNet parameter as (sdlab/ldm name, diffusers name), in model order."""
    pairs = [pair for pair in unet_key_pairs(cfg.unet) if pair[0].split(".")[0] in ENCODER_MODULES]
    middle = [f"blocks.{k}" for k in range(2 * (len(cfg.hint_embedding_channels) - 1))]
    for i, name in enumerate(["conv_in", *middle, "conv_out"]):
        pairs += _conv(f"input_hint_block.{2 * i}", HINT_PREFIX + name)  # odd indices are SiLUs
    levels = len(cfg.unet.block_out_channels)
    for i in range(levels * (cfg.unet.layers_per_block + 1)):  # one per input block
        pairs += _conv(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}")
    return pairs + _conv("middle_block_out.0", "controlnet_mid_block")


def controlnet_shapes(cfg: ControlNetConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape in sdlab/ldm names, read off a ControlNet built on the meta device."""
    return meta_shapes(ControlNet, cfg)


def controlnet_from_diffusers(state: Mapping[str, T], cfg: ControlNetConfig) -> dict[str, T]:
    """A diffusers ControlNetModel state dict in sdlab/ldm names; keys and shapes checked first."""
    return from_theirs(state, controlnet_key_pairs(cfg), controlnet_shapes(cfg), source="diffusers ControlNet")


def controlnet_to_diffusers(state: Mapping[str, T], cfg: ControlNetConfig) -> dict[str, T]:
    """An sdlab/ldm ControlNet state dict in diffusers ControlNetModel names; keys and shapes checked first."""
    return to_theirs(state, controlnet_key_pairs(cfg), controlnet_shapes(cfg), source="sdlab ControlNet")


# --- config.json ------------------------------------------------------------------------------
_UNET_ONLY = ("out_channels", "up_block_types", "center_input_sample")  # U-Net fields ControlNetModel lacks


def controlnet_config_from_diffusers(d: Mapping[str, Any], family: Family | None = None) -> ControlNetConfig:
    """ControlNetConfig from a diffusers ControlNet config.json dict; unsupported settings raise
    CheckpointError. The family, not part of the file, is `family` or read off the architecture."""
    order = d.get("controlnet_conditioning_channel_order", "rgb")
    if order != "rgb":
        raise CheckpointError(
            f"ControlNet config: controlnet_conditioning_channel_order={order!r} is not supported (only 'rgb')"
        )
    unet_json = dict(d)
    if "down_block_types" in d:  # the U-Net reader checks the up path mirrors the down path
        unet_json["up_block_types"] = [t.replace("Down", "Up") for t in reversed(d["down_block_types"])]
    unet = unet_config_from_diffusers(unet_json)
    hint = d.get("conditioning_embedding_out_channels") or ControlNetConfig.hint_embedding_channels
    return ControlNetConfig(
        unet=unet,
        family=family or family_of(unet),
        hint_channels=int(d.get("conditioning_channels", 3)),
        hint_embedding_channels=tuple(int(c) for c in hint),
        global_pool_conditions=bool(d.get("global_pool_conditions", False)),
    )


def controlnet_config_to_diffusers(cfg: ControlNetConfig) -> dict[str, Any]:
    """Keyword arguments of diffusers' ControlNetModel (a config.json body without `_class_name`)."""
    d = {k: v for k, v in unet_config_to_diffusers(cfg.unet).items() if k not in _UNET_ONLY}
    return d | {
        "conditioning_channels": cfg.hint_channels,
        "conditioning_embedding_out_channels": list(cfg.hint_embedding_channels),
        "global_pool_conditions": cfg.global_pool_conditions,
        "controlnet_conditioning_channel_order": "rgb",
    }
