"""The KL-regularised autoencoder (ldm `AutoencoderKL`) of SD 1.x, 2.x and SDXL.

    image (B, 3, H, W) in [-1, 1] --Encoder--> moments (B, 2C, H/f, W/f) --> N(mean, exp(logvar))
    z (B, C, H/f, W/f)            --Decoder--> image (B, 3, H, W)

with C = `latent_channels` and f = 2 ** (levels - 1). Attribute names follow the original
checkpoints (`encoder.down.0.block.1.conv2`, `decoder.mid.attn_1.q`, ...) so the weights of a
single-file model load without renaming once the `first_stage_model.` prefix is removed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.config import VAEConfig
from sdlab.models.layers import Upsample

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # ldm clamps the posterior log-variance to this range


def group_norm(channels: int, cfg: VAEConfig) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_num_groups, channels, eps=cfg.norm_eps)


class ResnetBlock(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), the skip through a 1x1 conv when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, cfg: VAEConfig):
        super().__init__()
        self.norm1 = group_norm(in_channels, cfg)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, cfg)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; q, k, v and proj_out are 1x1 convs."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.norm = group_norm(channels, cfg)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (to_tokens(proj(h)) for proj in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h = h.transpose(-1, -2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(h)


def to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 1, H*W, C): one attention head over the H*W positions. Contiguous: given the
    transposed view, PyTorch's CPU attention takes its math path and holds all (H*W)² scores (2.3 GB at
    128² latents), where its flash kernel holds a few MB."""
    B, C, H, W = x.shape
    return x.reshape(B, 1, C, H * W).transpose(-1, -2).contiguous()


class Downsample(nn.Module):
    """Halve H and W: pad one pixel on the right and bottom only (ldm), then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 1, 0, 1))  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H/2, W/2)


def res_blocks(in_channels: int, out_channels: int, num_blocks: int, cfg: VAEConfig) -> nn.ModuleList:
    """`num_blocks` ResnetBlocks; the first changes the width from in_channels to out_channels."""
    widths = [in_channels] + [out_channels] * num_blocks
    return nn.ModuleList(ResnetBlock(a, b, cfg) for a, b in zip(widths[:-1], widths[1:]))


class DownLevel(nn.Module):
    """One encoder resolution: `block.{j}` res blocks, then `downsample` unless it is the last level."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool, cfg: VAEConfig):
        super().__init__()
        self.block = res_blocks(in_channels, out_channels, cfg.layers_per_block, cfg)
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution: `block.{j}` res blocks (one more than the encoder's), then `upsample`."""

    def __init__(self, in_channels: int, out_channels: int, upsample: bool, cfg: VAEConfig):
        super().__init__()
        self.block = res_blocks(in_channels, out_channels, cfg.layers_per_block + 1, cfg)
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class MidBlock(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg)
        self.attn_1 = AttnBlock(channels, cfg)
        self.block_2 = ResnetBlock(channels, channels, cfg)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(B, 3, H, W) -> moments (B, 2C, H/f, W/f): mean and log-variance stacked on channels."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = cfg.block_out_channels
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(widths[max(i - 1, 0)], width, i != last, cfg) for i, width in enumerate(widths)
        )
        self.mid = MidBlock(widths[-1], cfg)
        self.norm_out = group_norm(widths[-1], cfg)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, widths[0], H, W)
        for level in self.down:
            h = level(h)  # (B, widths[-1], H/f, W/f) after the last level
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2C, H/f, W/f)


class Decoder(nn.Module):
    """z (B, C, h, w) -> image (B, 3, f*h, f*w).

    `up.{i}` is level i of the encoder mirrored (width widths[i]), so the levels run in
    reverse index order: up.{L-1} first, at the lowest resolution, and up.0 last.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = cfg.block_out_channels
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], cfg)
        self.up = nn.ModuleList(UpLevel(widths[min(i + 1, last)], width, i != 0, cfg) for i, width in enumerate(widths))
        self.norm_out = group_norm(widths[0], cfg)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)  # (B, widths[-1], h, w)
        h = self.mid(h)
        for level in reversed(self.up):
            h = level(h)  # (B, widths[0], f*h, f*w) after up.0
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, f*h, f*w)


class DiagonalGaussian:
    """The posterior N(mean, diag(exp(logvar))) read off the encoder's moments (B, 2C, h, w)."""

    def __init__(self, moments: Tensor):
        mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * eps, eps ~ N(0, I) drawn in the mean's dtype on the generator's device.

        With a CPU generator and a tensor elsewhere the noise is drawn on the CPU and moved,
        so a seed gives the same latents on every device (diffusers' `randn_tensor` rule).
        """
        noise_device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL(self || other) per sample, summed over (C, h, w); `other` defaults to N(0, I). Shape (B,)."""
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            ratio = self.var / other.var
            terms = (self.mean - other.mean).pow(2) / other.var + ratio - 1.0 - self.logvar + other.logvar
        return 0.5 * terms.sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """Encoder, decoder and the 1x1 convs between them and the latent space."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x (B, 3, H, W) in [-1, 1] -> posterior over z (B, C, H/f, W/f)."""
        moments = self.encoder(x)  # (B, 2C, H/f, W/f)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: Tensor) -> Tensor:
        """z (B, C, h, w) -> image (B, 3, f*h, f*w), roughly in [-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction from a posterior sample, and the posterior (for the KL term in training)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior

    def scale_latents(self, z: Tensor) -> Tensor:
        """VAE latent z -> the latent the diffusion model sees: (z - shift_factor) * scaling_factor."""
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def unscale_latents(self, latents: Tensor) -> Tensor:
        """Inverse of `scale_latents`: diffusion latent -> VAE latent for `decode`."""
        return latents / self.cfg.scaling_factor + self.cfg.shift_factor
