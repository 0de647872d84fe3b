"""Heat maps people can look at: values in [0, 1] -> viridis colours, laid over an image, captioned in a strip.

PIL only. The colour map is viridis read off at nine evenly spaced points and interpolated linearly
between them, close enough to matplotlib's 256-entry table for a picture, and like it, perceptually
ordered and readable in grey.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sdlab.analysis.grids import captioned
from sdlab.atomic import atomic_write
from sdlab.errors import SdlabError
from sdlab.pipelines.images import image_grid

VIRIDIS_ANCHORS = np.array(  # RGB at 0, 1/8, …, 1
    [
        (68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
        (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37),
    ],
    dtype=np.float64,
)
OVERLAY_ALPHA = 0.6  # weight of the heat map's colour over the image (in grey, so its hues do not mix in)
GIF_FRAME_MS = 250


def colourise(values: torch.Tensor) -> Image.Image:
    """(H, W) values in [0, 1] -> RGB image through the viridis colour map (outside [0, 1] is clipped)."""
    v = values.detach().float().cpu().clamp(0, 1).numpy() * (len(VIRIDIS_ANCHORS) - 1)  # (H, W)
    low = np.minimum(np.floor(v).astype(np.int64), len(VIRIDIS_ANCHORS) - 2)
    t = (v - low)[..., None]  # (H, W, 1)
    rgb = (1 - t) * VIRIDIS_ANCHORS[low] + t * VIRIDIS_ANCHORS[low + 1]  # (H, W, 3)
    return Image.fromarray(rgb.round().astype(np.uint8))


def overlay(image: Image.Image, values: torch.Tensor, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The image in grey with the colourised (H, W) values blended over it; values must be at the image's size."""
    if tuple(values.shape) != (image.height, image.width):
        raise SdlabError(f"heat map is {tuple(values.shape)} but the image is {image.height}x{image.width} (H x W)")
    return Image.blend(image.convert("L").convert("RGB"), colourise(values), alpha)


def mark(image: Image.Image, xy: tuple[int, int], arm: int = 2) -> Image.Image:
    """A copy with a small white cross, outlined in black, at pixel (x, y)."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    x, y = xy
    for colour, width in (("black", 3), ("white", 1)):
        draw.line([(x - arm, y), (x + arm, y)], fill=colour, width=width)
        draw.line([(x, y - arm), (x, y + arm)], fill=colour, width=width)
    return out


def strip(tiles: Sequence[Image.Image], labels: Sequence[str], scale: int = 4) -> Image.Image:
    """Tiles of one size side by side, each enlarged `scale` times (nearest) above its caption."""
    return image_grid([captioned(t, label, scale) for t, label in zip(tiles, labels, strict=True)], len(tiles))


def save_gif(frames: Sequence[Image.Image], path: str | os.PathLike, frame_ms: int | Sequence[int] = GIF_FRAME_MS) -> Path:
    """An endlessly looping animation, written atomically; `frame_ms` for every frame, or one per frame."""
    first, *rest = frames
    duration = frame_ms if isinstance(frame_ms, int) else list(frame_ms)
    return atomic_write(
        path, lambda tmp: first.save(tmp, format="GIF", save_all=True, append_images=rest, duration=duration, loop=0)
    )
