"""Captioned prompt x seed grids."""

from __future__ import annotations

from PIL import Image

from sdlab.analysis.grids import CAPTION_LINES, LINE_HEIGHT, prompt_grid


def test_grid_layout_and_tiles_are_the_generated_images():
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    calls = []

    def generate(prompt: str, seed: int) -> Image.Image:
        calls.append((prompt, seed))
        return Image.new("RGB", (16, 16), colours[prompt])

    grid = prompt_grid(generate, ["red", "blue"], [0, 1, 2], scale=2)
    tile_h = 32 + CAPTION_LINES * LINE_HEIGHT + 4
    assert grid.size == (3 * 32, 2 * tile_h)
    assert calls == [("red", 0), ("red", 1), ("red", 2), ("blue", 0), ("blue", 1), ("blue", 2)]
    assert grid.getpixel((5, 5)) == (255, 0, 0) and grid.getpixel((2 * 32 + 5, tile_h + 5)) == (0, 0, 255)
    assert grid.getpixel((5, 32 + CAPTION_LINES * LINE_HEIGHT)) == (255, 255, 255)  # the caption strip
    strip = grid.crop((0, 32, 32, tile_h))
    assert any(p != (255, 255, 255) for p in strip.getdata()), "the caption is drawn"
