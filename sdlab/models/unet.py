"""The text-conditioned U-Net of SD 1.x, 2.x, SDXL and the SDXL refiner (ldm `UNetModel`).

Parameter names are the original single-file names without `model.diffusion_model.`, so an
original checkpoint loads with no key map:

    input_blocks.0.0                    conv_in
    input_blocks.N.{0: ResBlock, 1: SpatialTransformer} or input_blocks.N.0.op (downsample)
    middle_block.{0: ResBlock, 1: SpatialTransformer, 2: ResBlock}
    output_blocks.N.{0: ResBlock, 1: SpatialTransformer, 1|2: Upsample (.conv)}
    out.{0: GroupNorm, 2: conv}, time_embed.{0, 2}, label_emb.0.{0, 2} (SDXL)

`UNetEncoder` builds and runs everything up to the middle block; the U-Net adds the decoder
half, the ControlNet (models/controlnet.py) its hint encoder and zero convolutions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdlab.config import UNetConfig
from sdlab.errors import SdlabError
from sdlab.models.layers import (
    ConditionedSequential,
    Downsample,
    ResBlock,
    SpatialTransformer,
    Upsample,
    timestep_embedding,
)


@dataclass(frozen=True)
class ControlResiduals:
    """ControlNet output added to the U-Net: one tensor per skip connection (in `input_blocks`
    order, same shapes as those blocks' outputs) and one for the middle block's output."""

    down: tuple[Tensor, ...]
    mid: Tensor


def added_condition(pooled: Tensor, time_ids: Tensor, cfg: UNetConfig) -> Tensor:
    """SDXL "adm" vector y = concat(pooled text, sinusoid of each micro-conditioning number).

    pooled (B, P), time_ids (B, N) -> y (B, P + N * cfg.addition_time_embed_dim), float32.
    """
    b, n = time_ids.shape
    width = pooled.shape[1] + n * cfg.addition_time_embed_dim
    if cfg.addition_embed_dim != width:
        raise SdlabError(
            f"added condition: pooled width {pooled.shape[1]} + {n} time ids x {cfg.addition_time_embed_dim}"
            f" = {width}, but this U-Net expects {cfg.addition_embed_dim}; check the model family and its time ids"
        )
    sinusoids = timestep_embedding(
        time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
    )  # (B * N, addition_time_embed_dim)
    return torch.cat([pooled.float(), sinusoids.reshape(b, -1)], dim=-1)  # (B, addition_embed_dim)


def _mlp(in_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))


ENCODER_MODULES = ("time_embed", "label_emb", "input_blocks", "middle_block")  # UNetEncoder's children


class UNetEncoder(nn.Module):
    """The U-Net's encoder half, shared by the U-Net and the ControlNet: time (and SDXL label)
    embedding, `input_blocks` down to the lowest resolution, and `middle_block`."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.unet_cfg = cfg
        ch = cfg.block_out_channels
        emb_dim = cfg.time_embed_dim
        self.time_embed = _mlp(ch[0], emb_dim)
        if cfg.addition_embed_dim is not None:
            self.label_emb = nn.Sequential(_mlp(cfg.addition_embed_dim, emb_dim))

        self.input_blocks = nn.ModuleList([ConditionedSequential(nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1))])
        self.skip_channels = [ch[0]]  # channels of every input block's output, in order
        c = ch[0]
        for level, out in enumerate(ch):
            for _ in range(cfg.layers_per_block):
                self.input_blocks.append(ConditionedSequential(*self._res_attn(c, out, level)))
                c = out
                self.skip_channels.append(c)
            if level != len(ch) - 1:
                self.input_blocks.append(ConditionedSequential(Downsample(c)))
                self.skip_channels.append(c)

        self.middle_block = ConditionedSequential(self._res(c, c), self._transformer(c, len(ch) - 1), self._res(c, c))

    def _res(self, in_channels: int, out_channels: int) -> ResBlock:
        cfg = self.unet_cfg
        return ResBlock(in_channels, out_channels, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps)

    def _transformer(self, channels: int, level: int) -> SpatialTransformer:
        cfg = self.unet_cfg
        return SpatialTransformer(
            channels,
            cfg.num_heads[level],
            cfg.transformer_depth[level],
            cfg.cross_attention_dim,
            cfg.use_linear_projection,
            cfg.norm_num_groups,
            cfg.upcast_attention,
        )

    def _res_attn(self, in_channels: int, out_channels: int, level: int) -> list[nn.Module]:
        """A ResBlock, followed by a SpatialTransformer on levels with attention."""
        layers: list[nn.Module] = [self._res(in_channels, out_channels)]
        if self.unet_cfg.attention[level]:
            layers.append(self._transformer(out_channels, level))
        return layers

    def _check_y(self, y: Tensor | None, batch: int) -> None:
        expected = self.unet_cfg.addition_embed_dim
        if expected is None and y is not None:
            raise SdlabError("this U-Net has no added (SDXL) conditioning; call it without y")
        if expected is not None and (y is None or tuple(y.shape) != (batch, expected)):
            found = None if y is None else tuple(y.shape)
            raise SdlabError(
                f"this SDXL U-Net needs y of shape ({batch}, {expected}), got {found};"
                " build it with added_condition(pooled, time_ids, cfg)"
            )

    def time_embedding(self, timesteps: Tensor | float, x: Tensor, y: Tensor | None) -> Tensor:
        """(B,) or scalar timesteps [+ adm y (B, addition_embed_dim)] -> (B, time_embed_dim), in x's dtype."""
        cfg = self.unet_cfg
        batch = x.shape[0]
        self._check_y(y, batch)
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(batch)  # (B,)
        sinusoid = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embed(sinusoid.to(x.dtype))  # (B, time_embed_dim)
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))
        return emb

    def encode(
        self, x: Tensor, emb: Tensor, context: Tensor, added: Tensor | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """Every input block's output (the skips) and the middle block's output.

        `added` (B, C0, H, W), when given, is added to the first block's (conv_in's) output:
        the ControlNet's hint.
        """
        h = self.input_blocks[0](x, emb, context)  # (B, C0, H, W)
        if added is not None:
            h = h + added
        skips = [h]
        for block in self.input_blocks[1:]:
            h = block(h, emb, context)  # (B, C_level, H / 2**level, W / 2**level)
            skips.append(h)
        h = self.middle_block(h, emb, context)  # (B, C_last, H / 2**(levels-1), W / 2**(levels-1))
        return skips, h


class UNet(UNetEncoder):
    """eps/v prediction network: (noisy latents, timesteps, text context[, adm y]) -> (B, Cout, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        self.cfg = cfg
        ch = cfg.block_out_channels
        skip_channels = list(self.skip_channels)
        c = ch[-1]
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(ch))):
            out = ch[level]
            for i in range(cfg.layers_per_block + 1):
                layers = self._res_attn(c + skip_channels.pop(), out, level)
                c = out
                if level > 0 and i == cfg.layers_per_block:
                    layers.append(Upsample(c))
                self.output_blocks.append(ConditionedSequential(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps),
            nn.SiLU(),
            nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1),
        )

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor | float,
        context: Tensor,
        y: Tensor | None = None,
        control: ControlResiduals | None = None,
    ) -> Tensor:
        """x (B, Cin, H, W), timesteps (B,) or scalar, context (B, L, cross_attention_dim) -> (B, Cout, H, W)."""
        emb = self.time_embedding(timesteps, x, y)  # (B, time_embed_dim)
        skips, h = self.encode(x, emb, context)

        if control is not None:
            skips, h = self._add_control(skips, h, control)

        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, h, w)
            size = tuple(skips[-1].shape[-2:]) if skips else None  # where a following upsample must land
            h = block(h, emb, context, size)
        return self.out(h)  # (B, Cout, H, W)

    def _add_control(self, skips: list[Tensor], mid: Tensor, control: ControlResiduals) -> tuple[list[Tensor], Tensor]:
        if len(control.down) != len(skips):
            raise SdlabError(
                f"ControlNet residuals: expected {len(skips)} down tensors (one per input block),"
                f" got {len(control.down)}"
            )
        return [s + r for s, r in zip(skips, control.down)], mid + control.mid


def unet_block_groups(cfg: UNetConfig) -> dict[str, list[str]]:
    """Parameter-name prefixes grouped by stage, for parameter tables.

    "down k": the input blocks of level k (res blocks, transformers, its downsample);
    "mid"; "up k": output blocks in the order they run (up 1 is the lowest resolution),
    incl. their upsample; "io": conv_in, time/label embeddings and the output head.
    Prefixes end in "." so `input_blocks.1.` does not match `input_blocks.10.`.
    """
    levels = len(cfg.block_out_channels)
    groups: dict[str, list[str]] = {}
    index = 1
    for level in range(levels):
        count = cfg.layers_per_block + (level != levels - 1)
        groups[f"down {level + 1}"] = [f"input_blocks.{i}." for i in range(index, index + count)]
        index += count
    groups["mid"] = ["middle_block."]
    per_up = cfg.layers_per_block + 1
    for k in range(levels):
        groups[f"up {k + 1}"] = [f"output_blocks.{i}." for i in range(k * per_up, (k + 1) * per_up)]
    groups["io"] = ["input_blocks.0.", "time_embed.", *(["label_emb."] if cfg.addition_embed_dim else []), "out."]
    return groups
