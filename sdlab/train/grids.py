"""Progress images written while training: a grid of tiles, saved atomically as a PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image

from sdlab.pipelines.images import image_grid, save_png


def write_grid(tiles: Sequence[Image.Image], columns: int, path: Path, text: Mapping[str, str] | None = None) -> Path:
    return save_png(image_grid(tiles, columns), path, text or {})
