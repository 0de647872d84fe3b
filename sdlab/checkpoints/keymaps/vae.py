"""diffusers `AutoencoderKL` <-> sdlab VAE (ldm names): parameter names and config.json.

The table is generated from the VAEConfig, one entry per parameter:

    ours (ldm)                           diffusers
    encoder.down.{i}.block.{j}.*         encoder.down_blocks.{i}.resnets.{j}.*
    encoder.down.{i}.downsample.conv     encoder.down_blocks.{i}.downsamplers.0.conv
    {enc,dec}oder.mid.block_{1,2}        {enc,dec}oder.mid_block.resnets.{0,1}
    {enc,dec}oder.mid.attn_1.norm        {enc,dec}oder.mid_block.attentions.0.group_norm
    ....mid.attn_1.{q,k,v,proj_out}      ....attentions.0.{to_q,to_k,to_v,to_out.0}  (1x1 conv vs Linear)
    decoder.up.{L-1-i}.block.{j}.*       decoder.up_blocks.{i}.resnets.{j}.*
    decoder.up.{L-1-i}.upsample.conv     decoder.up_blocks.{i}.upsamplers.0.conv
    *.nin_shortcut                       *.conv_shortcut
    {enc,dec}oder.norm_out               {enc,dec}oder.conv_norm_out

Older diffusers weights name the attention `query/key/value/proj_attn`; diffusers still
renames those on load (`ModelMixin._fix_state_dict_keys_on_load`), and so do we.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor

from sdlab.checkpoints.keymaps import check_shapes, meta_shapes, rename
from sdlab.config import VAEConfig
from sdlab.errors import CheckpointError, shorten
from sdlab.models.vae import AutoencoderKL

SOURCE = "diffusers AutoencoderKL"
Pairs = Iterator[tuple[str, str]]  # (our name, diffusers name)

ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
LEGACY_ATTENTION = {"q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}
# our names of the attention projections' weights: (C, C, 1, 1) convs here, (C, C) Linear in diffusers
ATTENTION_WEIGHTS = frozenset(f"{part}.mid.attn_1.{p}.weight" for part in ("encoder", "decoder") for p in ATTENTION)


def _params(ours: str, theirs: str) -> Pairs:
    yield f"{ours}.weight", f"{theirs}.weight"
    yield f"{ours}.bias", f"{theirs}.bias"


def _resnet(ours: str, theirs: str, has_shortcut: bool) -> Pairs:
    for name in ("norm1", "conv1", "norm2", "conv2"):
        yield from _params(f"{ours}.{name}", f"{theirs}.{name}")
    if has_shortcut:
        yield from _params(f"{ours}.nin_shortcut", f"{theirs}.conv_shortcut")


def _mid(ours: str, theirs: str, attention: Mapping[str, str]) -> Pairs:
    yield from _resnet(f"{ours}.block_1", f"{theirs}.resnets.0", False)
    yield from _params(f"{ours}.attn_1.norm", f"{theirs}.attentions.0.group_norm")
    for our_proj, their_proj in attention.items():
        yield from _params(f"{ours}.attn_1.{our_proj}", f"{theirs}.attentions.0.{their_proj}")
    yield from _resnet(f"{ours}.block_2", f"{theirs}.resnets.1", False)


def _encoder(cfg: VAEConfig, attention: Mapping[str, str]) -> Pairs:
    widths = cfg.block_out_channels
    yield from _params("encoder.conv_in", "encoder.conv_in")
    for i, width in enumerate(widths):
        for j in range(cfg.layers_per_block):
            width_in = widths[max(i - 1, 0)] if j == 0 else width
            yield from _resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", width_in != width)
        if i != len(widths) - 1:
            yield from _params(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    yield from _mid("encoder.mid", "encoder.mid_block", attention)
    yield from _params("encoder.norm_out", "encoder.conv_norm_out")
    yield from _params("encoder.conv_out", "encoder.conv_out")


def _decoder(cfg: VAEConfig, attention: Mapping[str, str]) -> Pairs:
    widths = cfg.block_out_channels
    last = len(widths) - 1
    yield from _params("decoder.conv_in", "decoder.conv_in")
    yield from _mid("decoder.mid", "decoder.mid_block", attention)
    for i, width in enumerate(widths):
        k = last - i  # diffusers numbers the up blocks in the order they run
        for j in range(cfg.layers_per_block + 1):
            width_in = widths[min(i + 1, last)] if j == 0 else width
            yield from _resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", width_in != width)
        if i != 0:
            yield from _params(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv")
    yield from _params("decoder.norm_out", "decoder.conv_norm_out")
    yield from _params("decoder.conv_out", "decoder.conv_out")


def vae_diffusers_names(cfg: VAEConfig, *, legacy_attention: bool = False) -> dict[str, str]:
    """Our parameter name -> diffusers parameter name, for every parameter of the VAE `cfg` describes."""
    attention = LEGACY_ATTENTION if legacy_attention else ATTENTION
    pairs = [*_encoder(cfg, attention), *_decoder(cfg, attention)]
    if cfg.use_quant_conv:
        pairs += _params("quant_conv", "quant_conv")
    if cfg.use_post_quant_conv:
        pairs += _params("post_quant_conv", "post_quant_conv")
    return dict(pairs)


def vae_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape under our names (read off a model built on the meta device)."""
    return meta_shapes(AutoencoderKL, cfg)


def vae_diffusers_shapes(cfg: VAEConfig, *, legacy_attention: bool = False) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape under diffusers' names."""
    names = vae_diffusers_names(cfg, legacy_attention=legacy_attention)
    return {names[k]: shape[:2] if k in ATTENTION_WEIGHTS else shape for k, shape in vae_shapes(cfg).items()}


def _has_legacy_attention(state: Mapping[str, Any]) -> bool:
    return any(f"{part}.mid_block.attentions.0.query.weight" in state for part in ("encoder", "decoder"))


def vae_from_diffusers(state: Mapping[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    """A diffusers AutoencoderKL state dict -> ours; every key and shape is checked first."""
    legacy = _has_legacy_attention(state)
    check_shapes(state, vae_diffusers_shapes(cfg, legacy_attention=legacy), source=SOURCE)
    names = vae_diffusers_names(cfg, legacy_attention=legacy)
    ours = rename(state, {theirs: mine for mine, theirs in names.items()}, source=SOURCE)
    # attention weights (C, C) -> (C, C, 1, 1)
    return {k: v.reshape(*v.shape, 1, 1) if k in ATTENTION_WEIGHTS else v for k, v in ours.items()}


def vae_to_diffusers(state: Mapping[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    """Our VAE state dict -> diffusers AutoencoderKL names (current `to_q` style); checked first."""
    check_shapes(state, vae_shapes(cfg), source="sdlab VAE")
    # attention weights (C, C, 1, 1) -> (C, C)
    flat = {k: v.reshape(v.shape[:2]) if k in ATTENTION_WEIGHTS else v for k, v in state.items()}
    return rename(flat, vae_diffusers_names(cfg), source="sdlab VAE")


# --- config.json ---------------------------------------------------------------------------------
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
DIFFUSERS_DEFAULT_SCALING = 0.18215  # AutoencoderKL's class default, used when config.json omits it
KNOWN_KEYS = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
    "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
    "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
}  # fmt: skip


def _refuse(what: str) -> CheckpointError:
    return CheckpointError(f"{SOURCE} config: {what}; sdlab's VAE supports only the SD 1.x/2.x/SDXL layout")


def _check_supported(d: Mapping[str, Any], levels: int) -> None:
    unknown = [k for k in d if k not in KNOWN_KEYS and not k.startswith("_")]
    if unknown:
        raise _refuse(f"unknown keys {shorten(unknown)}")
    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise _refuse(f"_class_name is {d['_class_name']!r}, expected 'AutoencoderKL'")
    if d.get("act_fn", "silu") != "silu":
        raise _refuse(f"act_fn is {d['act_fn']!r}, expected 'silu'")
    if not d.get("mid_block_add_attention", True):
        raise _refuse("mid_block_add_attention is false (a VAE without mid-block attention)")
    for key in ("latents_mean", "latents_std"):
        if d.get(key) is not None:
            raise _refuse(f"{key} is set (per-channel latent normalisation)")
    for key, block in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
        if list(d.get(key, [block] * levels)) != [block] * levels:
            raise _refuse(f"{key} is {list(d[key])}, expected {levels} x {block!r}")


def vae_config_from_diffusers(d: Mapping[str, Any]) -> VAEConfig:
    """A diffusers `vae/config.json` dict -> VAEConfig; absent keys take AutoencoderKL's defaults."""
    widths = tuple(int(w) for w in d.get("block_out_channels", (64,)))
    _check_supported(d, len(widths))
    shift = d.get("shift_factor")
    return VAEConfig(
        in_channels=int(d.get("in_channels", 3)),
        out_channels=int(d.get("out_channels", 3)),
        latent_channels=int(d.get("latent_channels", 4)),
        block_out_channels=widths,
        layers_per_block=int(d.get("layers_per_block", 1)),
        norm_num_groups=int(d.get("norm_num_groups", 32)),
        scaling_factor=float(d.get("scaling_factor", DIFFUSERS_DEFAULT_SCALING)),
        shift_factor=0.0 if shift is None else float(shift),
        force_upcast=bool(d.get("force_upcast", True)),
        use_quant_conv=bool(d.get("use_quant_conv", True)),
        use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
    )


def vae_config_to_diffusers(cfg: VAEConfig) -> dict[str, Any]:
    """VAEConfig -> a config dict `diffusers.AutoencoderKL.from_config` accepts (no `sample_size`: tiling only)."""
    levels = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": [DOWN_BLOCK] * levels,
        "up_block_types": [UP_BLOCK] * levels,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor or None,  # diffusers writes "no shift" as null
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": cfg.force_upcast,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_post_quant_conv,
        "mid_block_add_attention": True,
    }
