"""Pixels in and out: image files -> PIL -> tensors and back, and PNG files written atomically with their text chunks."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from sdlab.atomic import atomic_write
from sdlab.errors import SdlabError

BACKGROUND = (255, 255, 255)  # transparent pixels are flattened onto white, as A1111's img2img_background_color
LATENT_FACTOR = 8  # pixels per latent cell: encoded images need sides that are multiples of it


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB images, rounded as diffusers does ((x / 2 + 0.5) clamped, * 255, round)."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    arrays = (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)  # (B, H, W, 3)
    return [Image.fromarray(a) for a in arrays]


def image_grid(tiles: Sequence[Image.Image], columns: int) -> Image.Image:
    """Tiles of equal size, left to right and top to bottom, `columns` per row."""
    w, h = tiles[0].size
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * w, (i // columns) * h))
    return grid


def save_png(image: Image.Image, path: str | os.PathLike, text: Mapping[str, str]) -> Path:
    """Write `image` with tEXt/iTXt chunks; a temporary file and one rename, so never half a PNG."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of an image file, with a one-line error for anything unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            return {k: v for k, v in im.info.items() if isinstance(v, str)}
    except FileNotFoundError:
        raise SdlabError(f"{path}: no such file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SdlabError(f"{path}: not a readable image ({e})") from None


def load_image(path: str | os.PathLike) -> Image.Image:
    """An image file -> RGB, turned upright by its EXIF orientation, transparency flattened onto white."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
    except FileNotFoundError:
        raise SdlabError(f"{path}: no such file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SdlabError(f"{path}: not a readable image ({e})") from None
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        flat = Image.new("RGBA", im.size, BACKGROUND + (255,))
        flat.alpha_composite(im)
        return flat.convert("RGB")
    return im.convert("RGB")


def image_to_tensor(image: Image.Image, multiple: int = LATENT_FACTOR) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1], as diffusers' VaeImageProcessor.preprocess (x / 255 · 2 - 1).

    The sides must already be multiples of `multiple` (the VAE's downscale); resizing is the caller's choice.
    """
    if image.width % multiple or image.height % multiple:
        raise SdlabError(
            f"image is {image.width}x{image.height}; width and height must be multiples of {multiple} "
            "(resize or crop it first)"
        )
    x = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None] * 2.0 - 1.0  # (1, 3, H, W)
