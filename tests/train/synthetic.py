"""A tiny captioned image set for the trainer's tests: coloured squares and discs on grey, written as a
folder (image + same-name .txt) or as WebDataset-style tar shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "disc")


def samples(count: int = 16, size: tuple[int, int] = (40, 36)) -> list[tuple[Image.Image, str]]:
    """`count` (image, caption) pairs; images are not square, so the sources must crop them."""
    out = []
    for i in range(count):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        image = Image.new("RGB", size, (128, 128, 128))
        draw = ImageDraw.Draw(image)
        offset = 2 * (i // (len(COLOURS) * len(SHAPES)))
        box = (8 + offset, 6, 30 + offset, 28)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
        out.append((image, f"a {colour} {shape}"))
    return out


def write_folder(root: Path, count: int = 16) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, (image, caption) in enumerate(samples(count)):
        folder = root / ("sub" if i % 2 else "")
        folder.mkdir(exist_ok=True)
        image.save(folder / f"{i:03d}.{'jpg' if i % 3 == 0 else 'png'}")
        (folder / f"{i:03d}.txt").write_text(caption + "\n")
    return root


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, count: int = 16, per_shard: int = 6) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    items = samples(count)
    for s in range(0, count, per_shard):
        path = folder / f"shard-{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(s + per_shard, count)):
                image, caption = items[i]
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                _add(tar, f"{i:06d}.png", buffer.getvalue())
                _add(tar, f"{i:06d}.txt", caption.encode())
        shards.append(path)
    return shards
