"""Progress images written while training: a grid of tiles, saved atomically as a PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image

from sdlab.pipelines.images import save_png


def image_grid(tiles: Sequence[Image.Image], columns: int) -> Image.Image:
    """Tiles of equal size, left to right and top to bottom, `columns` per row."""
    w, h = tiles[0].size
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * w, (i // columns) * h))
    return grid


def write_grid(tiles: Sequence[Image.Image], columns: int, path: Path, text: Mapping[str, str] | None = None) -> Path:
    return save_png(image_grid(tiles, columns), path, text or {})
