"""diffusers `UNet2DConditionModel` <-> sdlab (original ldm) U-Net: names and config.json.

The table is generated from the UNetConfig, block by block:

    conv_in                               input_blocks.0.0
    time_embedding.linear_{1,2}           time_embed.{0,2}
    add_embedding.linear_{1,2}            label_emb.0.{0,2}
    down_blocks.L.resnets.j               input_blocks.(1 + L*(layers+1) + j).0
    down_blocks.L.attentions.j            input_blocks.(same).1
    down_blocks.L.downsamplers.0.conv     input_blocks.(1 + L*(layers+1) + layers).0.op
    mid_block.{resnets.0, attentions.0, resnets.1}  middle_block.{0, 1, 2}
    up_blocks.U.resnets.j                 output_blocks.(U*(layers+1) + j).0
    up_blocks.U.attentions.j              output_blocks.(same).1
    up_blocks.U.upsamplers.0.conv         output_blocks.(last of level).{1|2}.conv
    conv_norm_out, conv_out               out.0, out.2

Inside a ResBlock: norm1/conv1/time_emb_proj/norm2/conv2/conv_shortcut are
in_layers.0/in_layers.2/emb_layers.1/out_layers.0/out_layers.3/skip_connection;
inside a transformer the names are the same on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from sdlab.checkpoints.keymaps import from_theirs, meta_shapes, to_theirs
from sdlab.config import UNetConfig
from sdlab.errors import CheckpointError
from sdlab.models.unet import UNet

T = TypeVar("T")

_RESBLOCK = (  # (ours, diffusers) inside one residual block
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
)
_SKIP = ("skip_connection", "conv_shortcut")
_TRANSFORMER_BLOCK_LEAVES = (  # parameter names inside transformer_blocks.K, identical on both sides
    "norm1.weight", "norm1.bias",
    "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight", "attn1.to_out.0.bias",
    "norm2.weight", "norm2.bias",
    "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias",
    "norm3.weight", "norm3.bias",
    "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias",
)  # fmt: skip


def _affine(ours: str, theirs: str) -> list[tuple[str, str]]:
    """A layer with weight and bias (conv, linear, norm)."""
    return [(f"{ours}.weight", f"{theirs}.weight"), (f"{ours}.bias", f"{theirs}.bias")]


def _resblock(ours: str, theirs: str, has_skip: bool) -> list[tuple[str, str]]:
    modules = _RESBLOCK + ((_SKIP,) if has_skip else ())
    return [pair for o, t in modules for pair in _affine(f"{ours}.{o}", f"{theirs}.{t}")]


def _transformer(ours: str, theirs: str, depth: int) -> list[tuple[str, str]]:
    leaves = ["norm.weight", "norm.bias", "proj_in.weight", "proj_in.bias"]
    leaves += [f"transformer_blocks.{k}.{leaf}" for k in range(depth) for leaf in _TRANSFORMER_BLOCK_LEAVES]
    leaves += ["proj_out.weight", "proj_out.bias"]
    return [(f"{ours}.{leaf}", f"{theirs}.{leaf}") for leaf in leaves]


def unet_key_pairs(cfg: UNetConfig) -> list[tuple[str, str]]:
    """Every U-Net parameter as (sdlab/ldm name, diffusers name), in model order."""
    ch, layers, levels = cfg.block_out_channels, cfg.layers_per_block, len(cfg.block_out_channels)
    pairs = _affine("time_embed.0", "time_embedding.linear_1") + _affine("time_embed.2", "time_embedding.linear_2")
    if cfg.addition_embed_dim is not None:
        pairs += _affine("label_emb.0.0", "add_embedding.linear_1") + _affine("label_emb.0.2", "add_embedding.linear_2")
    pairs += _affine("input_blocks.0.0", "conv_in")

    index, c = 1, ch[0]
    for level in range(levels):
        for j in range(layers):
            ours, theirs = f"input_blocks.{index}", f"down_blocks.{level}"
            pairs += _resblock(f"{ours}.0", f"{theirs}.resnets.{j}", has_skip=c != ch[level])
            if cfg.attention[level]:
                pairs += _transformer(f"{ours}.1", f"{theirs}.attentions.{j}", cfg.transformer_depth[level])
            index, c = index + 1, ch[level]
        if level != levels - 1:
            pairs += _affine(f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            index += 1

    pairs += _resblock("middle_block.0", "mid_block.resnets.0", has_skip=False)
    pairs += _transformer("middle_block.1", "mid_block.attentions.0", cfg.mid_transformer_depth)
    pairs += _resblock("middle_block.2", "mid_block.resnets.1", has_skip=False)

    index = 0
    for up, level in enumerate(reversed(range(levels))):
        attention = cfg.attention[level]
        for j in range(layers + 1):
            ours, theirs = f"output_blocks.{index}", f"up_blocks.{up}"
            pairs += _resblock(f"{ours}.0", f"{theirs}.resnets.{j}", has_skip=True)  # input = h ++ skip
            if attention:
                pairs += _transformer(f"{ours}.1", f"{theirs}.attentions.{j}", cfg.transformer_depth[level])
            if level > 0 and j == layers:
                pairs += _affine(f"{ours}.{2 if attention else 1}.conv", f"{theirs}.upsamplers.0.conv")
            index += 1

    pairs += _affine("out.0", "conv_norm_out") + _affine("out.2", "conv_out")
    return pairs


def unet_shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape in sdlab/ldm names, read off a U-Net built on the meta device."""
    return meta_shapes(UNet, cfg)


def unet_from_diffusers(state: Mapping[str, T], cfg: UNetConfig) -> dict[str, T]:
    """A diffusers UNet2DConditionModel state dict in sdlab/ldm names; keys and shapes checked first."""
    return from_theirs(state, unet_key_pairs(cfg), unet_shapes(cfg), source="diffusers UNet")


def unet_to_diffusers(state: Mapping[str, T], cfg: UNetConfig) -> dict[str, T]:
    """An sdlab/ldm U-Net state dict in diffusers UNet2DConditionModel names; keys and shapes checked first."""
    return to_theirs(state, unet_key_pairs(cfg), unet_shapes(cfg), source="sdlab UNet")


# --- config.json ------------------------------------------------------------------------------

_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
_MID = "UNetMidBlock2DCrossAttn"

# diffusers settings sdlab implements only at these values (the first is diffusers' default,
# which an absent key means); `dropout` and `sample_size` are accepted and ignored.
_FIXED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "mid_block_type": (_MID,),
    "only_cross_attention": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "act_fn": ("silu",),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}


def _per_level(value: Any, levels: int, name: str) -> tuple[int, ...]:
    """An int applies to every level; a list must have one entry per level."""
    if isinstance(value, int):
        return (value,) * levels
    values = tuple(value)
    if len(values) != levels or not all(isinstance(v, int) for v in values):
        raise CheckpointError(f"UNet config: {name} must be an int or {levels} ints (one per level), got {value!r}")
    return values


def _uniform(values: tuple[int, ...]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else list(values)


def _check_fixed(d: Mapping[str, Any]) -> None:
    for key, supported in _FIXED.items():
        value = d.get(key, supported[0])
        if value not in supported:
            raise CheckpointError(
                f"UNet config: {key}={value!r} is not supported (sdlab implements only {supported[0]!r})"
            )


def _attention_levels(d: Mapping[str, Any], levels: int) -> tuple[bool, ...]:
    down = list(d.get("down_block_types", [_CROSS_DOWN] * (levels - 1) + [_PLAIN_DOWN]))
    up = list(d.get("up_block_types", [_PLAIN_UP] + [_CROSS_UP] * (levels - 1)))
    if len(down) != levels or any(t not in (_CROSS_DOWN, _PLAIN_DOWN) for t in down):
        raise CheckpointError(
            f"UNet config: down_block_types must be {levels} of {_CROSS_DOWN}/{_PLAIN_DOWN}, got {down}"
        )
    attention = tuple(t == _CROSS_DOWN for t in down)
    mirrored = [_CROSS_UP if a else _PLAIN_UP for a in reversed(attention)]
    if up != mirrored:
        raise CheckpointError(f"UNet config: up_block_types {up} must mirror down_block_types ({mirrored})")
    return attention


def _cross_attention_dim(value: Any) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise CheckpointError(f"UNet config: a different cross_attention_dim per block ({value}) is not supported")
    return int(value[0])


def _addition_embed(d: Mapping[str, Any]) -> tuple[int | None, int]:
    """(addition_embed_dim, addition_time_embed_dim) from the SDXL "text_time" fields."""
    kind = d.get("addition_embed_type")
    if kind is None:
        return None, UNetConfig.addition_time_embed_dim
    if kind != "text_time":
        raise CheckpointError(f"UNet config: addition_embed_type={kind!r} is not supported (only 'text_time', SDXL)")
    dim, time_dim = d.get("projection_class_embeddings_input_dim"), d.get("addition_time_embed_dim")
    if not isinstance(dim, int) or not isinstance(time_dim, int):
        raise CheckpointError(
            "UNet config: addition_embed_type 'text_time' needs integer projection_class_embeddings_input_dim"
            f" and addition_time_embed_dim, got {dim!r} and {time_dim!r}"
        )
    return dim, time_dim


def unet_config_from_diffusers(d: Mapping[str, Any]) -> UNetConfig:
    """UNetConfig from a diffusers `unet/config.json` dict; unsupported settings raise CheckpointError.

    Naming trap: diffusers' `attention_head_dim` holds the number of heads whenever
    `num_attention_heads` is absent or null (true of every released SD config).
    """
    _check_fixed(d)
    channels = tuple(int(c) for c in d.get("block_out_channels", UNetConfig.block_out_channels))
    levels = len(channels)
    layers = d.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise CheckpointError(f"UNet config: a different layers_per_block per level ({layers}) is not supported")
    if d.get("norm_num_groups", 32) is None:
        raise CheckpointError("UNet config: norm_num_groups=None (no output norm) is not supported")
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    addition_embed_dim, addition_time_embed_dim = _addition_embed(d)
    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        block_out_channels=channels,
        layers_per_block=layers,
        attention=_attention_levels(d, levels),
        transformer_depth=_per_level(d.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block"),
        num_heads=_per_level(heads, levels, "attention_head_dim (= heads)"),
        cross_attention_dim=_cross_attention_dim(d.get("cross_attention_dim", 1280)),
        use_linear_projection=bool(d.get("use_linear_projection", False)),
        upcast_attention=bool(d.get("upcast_attention") or False),  # SDXL writes null
        norm_num_groups=d.get("norm_num_groups", 32),
        norm_eps=float(d.get("norm_eps", 1e-5)),
        flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
        freq_shift=float(d.get("freq_shift", 0)),
        addition_embed_dim=addition_embed_dim,
        addition_time_embed_dim=addition_time_embed_dim,
    )


def unet_config_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
    """Keyword arguments of diffusers' UNet2DConditionModel (a `unet/config.json` body, without
    `_class_name`/`_diffusers_version`) describing the same network as `cfg`."""
    d: dict[str, Any] = {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": [_CROSS_DOWN if a else _PLAIN_DOWN for a in cfg.attention],
        "mid_block_type": _MID,
        "up_block_types": [_CROSS_UP if a else _PLAIN_UP for a in reversed(cfg.attention)],
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "transformer_layers_per_block": _uniform(cfg.transformer_depth),
        "attention_head_dim": _uniform(cfg.num_heads),  # the number of heads (diffusers' naming)
        "cross_attention_dim": cfg.cross_attention_dim,
        "use_linear_projection": cfg.use_linear_projection,
        "upcast_attention": cfg.upcast_attention,
        "norm_num_groups": cfg.norm_num_groups,
        "norm_eps": cfg.norm_eps,
        "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": cfg.freq_shift,
        "act_fn": "silu",
        "center_input_sample": False,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
    }
    if cfg.addition_embed_dim is not None:
        d["addition_embed_type"] = "text_time"
        d["addition_time_embed_dim"] = cfg.addition_time_embed_dim
        d["projection_class_embeddings_input_dim"] = cfg.addition_embed_dim
    return d
