"""Will an image fit? The memory one generation needs beyond the loaded weights, estimated before any
work, against what the device has free.

Images of a batch are made one after another, so the peak is one image's: the U-Net's activations on
the guided pair of latents, then the VAE decoding (or encoding) the full image. The allocator keeps
much of what sampling freed, so the two are added.
Both grow with the pixel count; the constants are peak-memory growths measured with 2 CPU threads in
fp32, rounded up by a fifth or more:

    U-Net  2 x h x w x C0 x itemsize x 48    SD 1.5 (C0 = 320): 352 MiB at 512², 670 MiB at 768²;
                                             sdlab's own (C0 = 64): 337 MiB at 512²
    VAE    H x W x C0 x itemsize x 12        SD 1.5 (C0 = 128): 0.95 GiB at 512²;
                                             sdlab's own (C0 = 32): 272 MiB at 512², 725 MiB at 768²

A tiled decode (`vae_tiling`) holds one window of at most 96 latents a side at a time, plus the output.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sdlab.config import ModelConfig
from sdlab.pipelines.settings import Settings

UNET_FACTOR = 48
VAE_FACTOR = 12
TILE_LATENTS = 96  # models/vae_tiling.decode_tiled: a 64-latent window with 16 latents of margin each side
HEADROOM = 0.9  # refuse when the estimate passes this share of the free memory
GIB = 2**30


def activation_bytes(cfg: ModelConfig, s: Settings, unet_dtype: torch.dtype, vae_dtype: torch.dtype,
                     tiled: bool) -> int:
    """Bytes one image of resolved settings `s` needs beyond the weights, at its peak."""
    f = cfg.vae.downscale
    h, w = s.height // f, s.width // f
    unet = 2 * h * w * cfg.unet.block_out_channels[0] * unet_dtype.itemsize * UNET_FACTOR
    tile_h, tile_w = (min(h, TILE_LATENTS) * f, min(w, TILE_LATENTS) * f) if tiled else (s.height, s.width)
    vae = tile_h * tile_w * cfg.vae.block_out_channels[0] * vae_dtype.itemsize * VAE_FACTOR
    output = 3 * s.height * s.width * 4  # the decoded image, (3, H, W) float32
    return unet + vae + output  # the sum: what the allocator keeps from sampling is still held while decoding


def free_bytes(device: torch.device) -> int | None:
    """Memory free for this process on `device`: CUDA's free plus what PyTorch holds unused; on the CPU
    Linux's MemAvailable. None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def fits(needed: int, free: int | None) -> bool:
    return free is None or needed <= HEADROOM * free


def too_big_message(s: Settings, needed: int, free: int, tiled: bool) -> str:
    advice = "a smaller size" if tiled else "--vae-tiling (decode in tiles), --low-memory or a smaller size"
    return (f"a {s.width}x{s.height} image needs about {needed / GIB:.1f} GiB beyond the weights and "
            f"{free / GIB:.1f} GiB are free; try {advice}")
