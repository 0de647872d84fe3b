"""Quick pictures of latents for progress previews, at a small fraction of a VAE decode.

    linear    rgb(p) = W z(p) + b                          per latent pixel: (B, 4, h, w) -> (B, 3, h, w)
    learned   rgb = shuffle_f(conv1x1(silu(conv3x3(...silu(norm(conv3x3(z)))))))   (B, 4, h, w) -> (B, 3, f·h, f·w)

Both read the latents the diffusion model sees (scaled, as x̂0 comes out of a sampler) and give an image
in about [-1, 1]. SD and SDXL get the widely used linear factors below; sdlab's own shapes-64 model gets a
tiny network distilled from its VAE decoder (benchmarks/fit_preview.py), shipped as package data beside
the model. sdlab.checkpoints.preview reads and writes those files and picks a previewer for a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.config import SD_VAE, SDXL_VAE, ModelConfig, VAEConfig


# --- linear: one 4x3 matrix and a bias --------------------------------------------------------------
@dataclass(frozen=True)
class LinearFactors:
    weight: tuple[tuple[float, float, float], ...]  # (C, 3): the RGB each latent channel adds
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)


# Published factors: ComfyUI comfy/latent_formats.py, `latent_rgb_factors` (+ `_bias`) of its SD15 and SDXL
# formats, applied to the scaled latents with the result read as [-1, 1]. ComfyUI uses the SD15 ones for
# SD 2.x too (same VAE). AUTOMATIC1111's "Approx cheap" previews use an older fit of the same kind.
SD_FACTORS = LinearFactors(
    ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177))
)
SDXL_FACTORS = LinearFactors(
    ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
    bias=(0.1084, -0.0175, -0.0011),
)


class LinearPreview(nn.Module):
    """rgb = W z + b at every latent pixel: (B, C, h, w) -> (B, 3, h, w), one pixel per latent pixel."""

    def __init__(self, factors: LinearFactors):
        super().__init__()
        self.register_buffer("weight", torch.tensor(factors.weight).T[:, :, None, None].contiguous())  # (3, C, 1, 1)
        self.register_buffer("bias", torch.tensor(factors.bias))  # (3,)

    def forward(self, latents: Tensor) -> Tensor:
        return F.conv2d(latents.to(self.weight), self.weight, self.bias)  # (B, 3, h, w)


# --- learned: a few convolutions on the latent grid, then f x f pixels from each latent pixel --------
@dataclass(frozen=True)
class PreviewNetConfig:
    latent_channels: int = 4
    width: int = 16  # hidden channels
    layers: int = 4  # 3x3 convolutions before the 1x1 output; depth helped more than width
    upscale: int = 4  # the VAE's downscale factor f: each latent pixel becomes an f x f block
    groups: int = 8  # GroupNorm after the first conv (0: none), as the VAE decoder normalises over the whole image


class PreviewNet(nn.Module):
    """z (B, C, h, w) -> image (B, 3, f·h, f·w): 3x3 convs with SiLU (a GroupNorm after the first), then a
    1x1 conv to 3·f² values per latent pixel, shuffled into f x f blocks (sub-pixel convolution, Shi et al. 2016).

    The norm matters for x̂0 of early steps: those latents are faint, and the VAE decoder's GroupNorms
    (statistics over the whole image) stretch them, which no function of a pixel's neighbourhood can imitate.
    One norm fitted as well as one after every conv, in half the time (0.15 ms instead of 0.30 at width 24)."""

    def __init__(self, cfg: PreviewNetConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.latent_channels] + [cfg.width] * cfg.layers
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in pairwise(widths))
        self.norm = nn.GroupNorm(cfg.groups, cfg.width) if cfg.groups else nn.Identity()
        self.out = nn.Conv2d(widths[-1], 3 * cfg.upscale**2, 1)
        self.shuffle = nn.PixelShuffle(cfg.upscale)

    def forward(self, latents: Tensor) -> Tensor:
        first, *rest = self.convs
        h = F.silu(self.norm(first(latents.to(self.out.weight))))  # (B, width, h, w)
        for conv in rest:
            h = F.silu(conv(h))
        return self.shuffle(self.out(h))  # (B, 3·f², h, w) -> (B, 3, f·h, f·w)


# --- which VAE a learned previewer was fitted to -------------------------------------------------------
def vae_signature(vae: nn.Module) -> Tensor:
    """(n,) mean |w| of each of the VAE's parameters: differs for a VAE trained anew, but not for the
    same weights loaded in another dtype (bf16 moves each mean by well under 1%)."""
    return torch.stack([p.detach().float().abs().mean().cpu() for p in vae.parameters()])


def same_vae(signature: Tensor, fitted: Tensor) -> bool:
    return signature.shape == fitted.shape and torch.allclose(signature, fitted, rtol=1e-2, atol=1e-8)


def _same_latent_space(vae: VAEConfig, standard: VAEConfig) -> bool:
    keys = ("latent_channels", "block_out_channels", "scaling_factor", "shift_factor")
    return all(getattr(vae, k) == getattr(standard, k) for k in keys)


def linear_factors(config: ModelConfig) -> LinearFactors | None:
    """The published factors when the model has SD's (or SDXL's) autoencoder latent space, else None."""
    if config.family in ("sd1", "sd2") and _same_latent_space(config.vae, SD_VAE):
        return SD_FACTORS
    if config.family in ("sdxl", "sdxl-refiner") and _same_latent_space(config.vae, SDXL_VAE):
        return SDXL_FACTORS
    return None
