"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the U-Net's encoder. A small conv net turns the hint image into features
added after the copy's conv_in; a zero-initialised 1x1 conv on every input block's output and
on the middle block's output gives the residuals the U-Net adds to its skip connections and
middle block. Parameter names are the original (ldm `cldm.py`) ones without `control_model.`:

    time_embed, label_emb (SDXL), input_blocks, middle_block    as in the U-Net
    input_hint_block.{0, 2, ..., 2n}    3x3 convs with a SiLU after each but the last (zero-initialised)
    zero_convs.{i}.0                    1x1 conv on input block i's output
    middle_block_out.0                  1x1 conv on the middle block's output
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdlab.config import ControlNetConfig, Family, family_of
from sdlab.errors import SdlabError
from sdlab.models.unet import ENCODER_MODULES, ControlResiduals, UNet, UNetEncoder

GUESS_MODE_MIN_SCALE_EXPONENT = -1.0  # guess mode: residual i is scaled by 10 ** linspace(-1, 0)


def _zero(layer: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def hint_encoder(cfg: ControlNetConfig) -> nn.Sequential:
    """(B, hint_channels, H*f, W*f) -> (B, C0, H, W): conv in, then per width step a conv and a
    stride-2 conv, a SiLU after each; last a zero conv to the U-Net's first width."""
    widths = cfg.hint_embedding_channels
    layers: list[nn.Module] = [nn.Conv2d(cfg.hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.SiLU()]
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(_zero(nn.Conv2d(widths[-1], cfg.unet.block_out_channels[0], 3, padding=1)))
    return nn.Sequential(*layers)


def _zero_conv(channels: int) -> nn.Sequential:
    return nn.Sequential(_zero(nn.Conv2d(channels, channels, 1)))


class ControlNet(UNetEncoder):
    """(noisy latents, timesteps, text context, hint image[, adm y]) -> ControlResiduals for the U-Net."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__(cfg.unet)
        self.cfg = cfg
        self.input_hint_block = hint_encoder(cfg)
        self.zero_convs = nn.ModuleList(_zero_conv(c) for c in self.skip_channels)
        self.middle_block_out = _zero_conv(cfg.unet.block_out_channels[-1])

    @classmethod
    def from_unet(
        cls,
        unet: UNet,
        family: Family | None = None,
        *,
        hint_channels: int = 3,
        hint_embedding_channels: tuple[int, ...] = ControlNetConfig.hint_embedding_channels,
    ) -> ControlNet:
        """A new ControlNet whose encoder is a copy of `unet`'s (the paper's initialisation): its
        time/label embeddings, input blocks and middle block; hint encoder and zero convs fresh."""
        cfg = ControlNetConfig(unet.cfg, family or family_of(unet.cfg), hint_channels, hint_embedding_channels)
        like = next(unet.parameters())
        net = cls(cfg).to(like.device, like.dtype)
        for name in ENCODER_MODULES:
            if hasattr(unet, name):
                getattr(net, name).load_state_dict(getattr(unet, name).state_dict())
        return net

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor | float,
        context: Tensor,
        hint: Tensor,
        y: Tensor | None = None,
        scale: float = 1.0,
        guess_mode: bool = False,
    ) -> ControlResiduals:
        """x (B, Cin, H, W), timesteps (B,) or scalar, context (B, L, cross_attention_dim),
        hint (B, hint_channels, H*f, W*f) in [0, 1], y (B, addition_embed_dim) for SDXL.

        `scale` multiplies every residual; `guess_mode` (the U-Net then runs without the text, or
        only on the conditional half of classifier-free guidance) also scales residual i of n
        by 10 ** (i/n - 1), from 0.1 at full resolution to 1 at the middle block.
        """
        emb = self.time_embedding(timesteps, x, y)  # (B, time_embed_dim)
        guided = self.input_hint_block(hint.to(x.dtype))  # (B, C0, H, W)
        if guided.shape[-2:] != x.shape[-2:]:
            f = self.cfg.hint_downscale
            raise SdlabError(
                f"ControlNet hint of size {tuple(hint.shape[-2:])} encodes to {tuple(guided.shape[-2:])}, but the"
                f" latents are {tuple(x.shape[-2:])}; pass the hint at {f}x the latent size"
            )
        skips, mid = self.encode(x, emb, context, added=guided)
        down = [conv(s) for conv, s in zip(self.zero_convs, skips)]  # same shapes as the U-Net's skips
        mid = self.middle_block_out(mid)  # (B, C_last, h, w)

        scales = self._scales(len(down), scale, guess_mode, x.device)
        down = [d * s for d, s in zip(down, scales)]
        mid = mid * scales[-1]
        if self.cfg.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]  # (B, C, 1, 1)
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return ControlResiduals(tuple(down), mid)

    def _scales(self, n: int, scale: float, guess_mode: bool, device: torch.device) -> Tensor:
        """(n + 1,) factors: one per down residual, the last for the middle one."""
        if guess_mode and not self.cfg.global_pool_conditions:
            return torch.logspace(GUESS_MODE_MIN_SCALE_EXPONENT, 0.0, n + 1, device=device) * scale
        return torch.full((n + 1,), scale, device=device)
