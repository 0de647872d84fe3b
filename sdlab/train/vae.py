"""Stage 1: the autoencoder, and the latent scaling factor the diffusion model's latents are divided by.

    loss = mean |x - D(z)|  +  β · KL(q(z|x) ‖ N(0, I)) / (3·H·W),    z ~ q(z|x)

Both terms are per image value, so β means what ldm's `kl_weight` means (ldm sums the L1 term over
the pixels; dividing both terms by the pixel count only rescales the gradient). ldm uses β = 1e-6.

After training, `latent_scale` = 1 / std of posterior samples z ~ q(z|x) over the whole training
set — the rule that gave SD's 0.18215 (ldm measured it on posterior samples of its first batch).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from sdlab.checkpoints import formats
from sdlab.config import VAEConfig, from_dict, to_dict
from sdlab.errors import SdlabError
from sdlab.models.vae import AutoencoderKL, DiagonalGaussian
from sdlab.pipelines.images import to_pil
from sdlab.train.grids import write_grid
from sdlab.train.loop import EMA
from sdlab.train.sources import SampleStream

VAE_CONFIG_KEY = "sdlab_vae_config"
RECONSTRUCTIONS = 8  # images in the stage's progress grid (originals above, reconstructions below)


def fp32(posterior: DiagonalGaussian) -> DiagonalGaussian:
    """The same posterior with fp32 statistics (the KL of an autocast encoder is summed in fp32)."""
    return DiagonalGaussian(torch.cat([posterior.mean.float(), posterior.logvar.float()], dim=1))


class VAELoss(nn.Module):
    """The autoencoder being trained; forward(images, generator) is its stage-1 loss."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight

    def forward(self, images: Tensor, generator: torch.Generator) -> Tensor:
        posterior = fp32(self.vae.encode(images))  # over z (B, C, H/f, W/f)
        recon = self.vae.decode(posterior.sample(generator))  # (B, 3, H, W)
        reconstruction = (recon.float() - images).abs().mean()
        kl = posterior.kl().mean() / images[0].numel()
        return reconstruction + self.kl_weight * kl


def load_images(dataset: Dataset, indices: list[int]) -> Tensor:
    return torch.stack([dataset[i][0] for i in indices])  # (B, 3, H, W)


def image_batches(dataset: Dataset, stream: SampleStream, start: int, batch: int, workers: int) -> Iterator[Tensor]:
    """Image batches (B, 3, H, W) from stream position `start`; DataLoader workers keep the order."""
    loader = DataLoader(
        dataset,
        batch_sampler=_Batches(stream, start, batch),
        num_workers=workers,
        generator=torch.Generator(),  # worker seeds from here, not from the global RNG a checkpoint restores
    )
    return (images for images, _captions in loader)


@dataclass
class _Batches:
    stream: SampleStream
    start: int
    batch: int

    def __iter__(self) -> Iterator[list[int]]:
        return self.stream.batches(self.start, self.batch)


@dataclass
class VAEStage:
    """Stage 1 for the loop in `sdlab.train.loop`."""

    module: VAELoss
    dataset: Dataset
    stream: SampleStream
    batch: int
    workers: int
    device: torch.device
    samples: Path  # folder for progress grids
    name: str = "vae"

    def batches(self, start: int) -> Iterator[Tensor]:
        images = image_batches(self.dataset, self.stream, start * self.batch, self.batch, self.workers)
        return (x.to(self.device) for x in images)

    def loss(self, model: nn.Module, batch: Tensor, generator: torch.Generator) -> Tensor:
        return model(batch, generator)

    @torch.no_grad()
    def sample(self, step: int, ema: EMA | None) -> None:
        vae = self.module.vae
        images = load_images(self.dataset, list(range(min(RECONSTRUCTIONS, len(self.dataset)))))
        recon = vae.decode(vae.encode(images.to(self.device)).mode())  # (B, 3, H, W)
        write_grid(to_pil(images) + to_pil(recon), len(images), self.samples / f"vae-{step:06d}.png")


# --- the scaling factor ----------------------------------------------------------------------------
@torch.no_grad()
def latent_scale(moments: Tensor, generator: torch.Generator, chunk: int = 1024) -> float:
    """1 / std of one posterior sample z ~ q(z|x) per image, over all elements of all images.

    moments: (N, 2C, h, w) encoder outputs (mean and log-variance); the std is accumulated in float64.
    """
    total = squares = 0.0
    count = 0
    for start in range(0, len(moments), chunk):
        z = DiagonalGaussian(moments[start : start + chunk].float()).sample(generator).double()  # (n, C, h, w)
        total += z.sum().item()
        squares += z.square().sum().item()
        count += z.numel()
    mean = total / count
    var = (squares - count * mean**2) / (count - 1)
    if not var > 0:
        raise SdlabError("the VAE's latents have no variance; it did not learn (train it longer or check the data)")
    return 1.0 / var**0.5


@torch.no_grad()
def encode_moments(vae: AutoencoderKL, images: Iterator[Tensor], device: torch.device) -> Tensor:
    """The posterior moments (N, 2C, h, w) fp32 of every image batch, encoded in fp32."""
    vae.eval()
    out = []
    for x in images:
        p = vae.encode(x.to(device))
        out.append(torch.cat([p.mean, p.logvar], dim=1).float().cpu())  # (B, 2C, h, w)
    return torch.cat(out)


# --- VAE files -------------------------------------------------------------------------------------
def save_vae(vae: AutoencoderKL, path: Path) -> Path:
    """The VAE's weights with its VAEConfig (and so its scaling factor) in the metadata, atomically."""
    metadata = {"format": "pt", VAE_CONFIG_KEY: json.dumps(to_dict(vae.cfg))}
    formats.write_safetensors(path, vae.state_dict(), metadata)
    return path


def load_vae(path: Path) -> AutoencoderKL:
    """A VAE written by `save_vae`, or the VAE of any model sdlab loads (single file or diffusers folder)."""
    if path.is_file() and path.suffix == ".safetensors" and VAE_CONFIG_KEY in formats.safetensors_metadata(path):
        state, metadata = formats.read_weights(path, dtype=torch.float32)
        vae = AutoencoderKL(from_dict(VAEConfig, json.loads(metadata[VAE_CONFIG_KEY])))
        vae.load_state_dict(state)
        return vae
    from sdlab.checkpoints.load import load

    return load(path, dtype=torch.float32).vae


def set_scale(vae: AutoencoderKL, scale: float) -> AutoencoderKL:
    """Give `vae` (one this trainer made) a config with `scaling_factor = scale`; returns it."""
    vae.cfg = replace(vae.cfg, scaling_factor=scale)
    return vae
