"""Pictures people would rather look at than read: prompts x seeds, each tile captioned."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

from sdlab.pipelines.images import image_grid

CAPTION_LINES = 3
LINE_HEIGHT = 12
CHARS_PER_LINE_AT_128 = 21  # PIL's default bitmap font, about 6 px a character


def captioned(tile: Image.Image, caption: str, scale: int = 2) -> Image.Image:
    """The tile enlarged `scale` times (nearest, so pixels stay honest) above a white strip with its caption."""
    w, h = tile.width * scale, tile.height * scale
    out = Image.new("RGB", (w, h + CAPTION_LINES * LINE_HEIGHT + 4), "white")
    out.paste(tile.resize((w, h), Image.NEAREST), (0, 0))
    lines = textwrap.wrap(caption, width=max(8, CHARS_PER_LINE_AT_128 * w // 128))[:CAPTION_LINES]
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    for i, line in enumerate(lines):
        draw.text((2, h + 2 + i * LINE_HEIGHT), line, fill="black", font=font)
    return out


def prompt_grid(
    generate: Callable[[str, int], Image.Image], prompts: Sequence[str], seeds: Sequence[int], scale: int = 2
) -> Image.Image:
    """One row per prompt, one column per seed; each tile captioned with its prompt and seed."""
    tiles = [captioned(generate(p, s), f"{p} (seed {s})", scale) for p in prompts for s in seeds]
    return image_grid(tiles, columns=len(seeds))
