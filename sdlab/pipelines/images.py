"""Pixels in and out: decoded tensors -> PIL images, and PNG files written atomically with their text chunks."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from sdlab.errors import SdlabError


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
