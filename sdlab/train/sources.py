"""Training data: (image (3, S, S) float32 in [-1, 1], caption) pairs, and the order samples are seen in.

    a folder   a.png + a.txt, sub/b.jpg + sub/b.txt, ...   searched recursively
    tar shards key.png|jpg|jpeg|webp + key.txt members    WebDataset's layout, read with the stdlib `tarfile`
    "shapes"   sdlab.train.shapes.ShapesDataset            drawn on demand

Images are centre-cropped to a square and resized (Lanczos) to the model's size. The order is a
`SampleStream`: a pure function of (seed, epoch, rank), so a position in it is all a checkpoint needs.
"""

from __future__ import annotations

import glob
import io
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset

from sdlab.errors import SdlabError, shorten

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SHAPES = "shapes"
SHAPES_DEFAULT_LENGTH = 20_000
Sample = tuple[Tensor, str]  # (image (3, S, S) float32 in [-1, 1], caption)


# --- pixels ----------------------------------------------------------------------------------------
def square(image: Image.Image, size: int) -> Image.Image:
    """Centre crop to the shorter side, then resize to size x size (Lanczos), in RGB."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), Image.Resampling.LANCZOS)


def to_tensor(image: Image.Image) -> Tensor:
    """RGB image -> (3, H, W) float32 in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)


def open_image(data: bytes | Path, name: str) -> Image.Image:
    """An image file's pixels in RGB, or a one-line SdlabError."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise SdlabError(f"{name}: not a readable image ({e})") from None


def decode_image(data: bytes | Path, size: int, name: str) -> Tensor:
    return to_tensor(square(open_image(data, name), size))


# --- a folder of images with same-name captions ----------------------------------------------------
class ImageFolder(Dataset):
    """Every image under `root` (recursively) with the caption in the .txt file of the same name."""

    def __init__(self, root: Path, size: int):
        self.root, self.size = root, size
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise SdlabError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder or below it")
        missing = [str(p.relative_to(root)) for p in images if not p.with_suffix(".txt").is_file()]
        if missing:
            raise SdlabError(
                f"{root}: {len(missing)} images have no same-name .txt caption ({shorten(missing, 3)}); "
                "write one per image (it may be empty)"
            )
        self.items = [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        path, caption = self.items[i]
        return decode_image(path, self.size, str(path)), caption

    def read(self, i: int) -> tuple[Image.Image, str]:
        """Sample i as it is stored: the RGB image at its own size, and its caption."""
        path, caption = self.items[i]
        return open_image(path, str(path)), caption


# --- WebDataset-style tar shards -------------------------------------------------------------------
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset: key = folders + name up to its first dot


@dataclass(frozen=True)
class TarMember:
    shard: Path
    name: str
    offset: int  # where the member's bytes start in the (uncompressed) tar file
    size: int


def index_shard(shard: Path) -> list[tuple[TarMember, str]]:
    """(image member, caption) of every sample of one uncompressed tar, in the order they appear."""
    images: dict[str, TarMember] = {}
    captions: dict[str, str] = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for m in tar:
                match = _KEY.match(m.name)
                if not m.isfile() or not match:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if f".{ext}" in IMAGE_SUFFIXES:
                    images[key] = TarMember(shard, m.name, m.offset_data, m.size)
                elif ext == "txt":
                    captions[key] = tar.extractfile(m).read().decode("utf-8").strip()
    except (tarfile.TarError, OSError) as e:
        raise SdlabError(f"{shard}: not a readable uncompressed tar shard ({e})") from None
    missing = [k for k in images if k not in captions]
    if missing:
        raise SdlabError(f"{shard}: {len(missing)} samples have an image but no .txt caption ({shorten(missing, 3)})")
    return [(member, captions[key]) for key, member in images.items()]


class TarShards(Dataset):
    """Samples of WebDataset-style shards: members `key.png|jpg|jpeg|webp` + `key.txt`, shards in order."""

    def __init__(self, shards: Sequence[Path], size: int):
        self.size = size
        self.items = [item for shard in shards for item in index_shard(shard)]
        if not self.items:
            raise SdlabError(f"no samples (key.png + key.txt) in {shorten(map(str, shards), 3)}")

    def __len__(self) -> int:
        return len(self.items)

    def _bytes(self, member: TarMember) -> bytes:
        with open(member.shard, "rb") as f:
            f.seek(member.offset)
            return f.read(member.size)

    def __getitem__(self, i: int) -> Sample:
        member, caption = self.items[i]
        return decode_image(self._bytes(member), self.size, f"{member.shard}:{member.name}"), caption

    def read(self, i: int) -> tuple[Image.Image, str]:
        """Sample i as it is stored: the RGB image at its own size, and its caption."""
        member, caption = self.items[i]
        return open_image(self._bytes(member), f"{member.shard}:{member.name}"), caption


# --- choosing a source -----------------------------------------------------------------------------
def shapes_dataset(size: int, length: int | None) -> Dataset:
    try:
        from sdlab.train.shapes import ShapesDataset  # written alongside; imported only when asked for
    except ImportError as e:
        raise SdlabError(f"the procedural shapes dataset is not available in this sdlab ({e})") from None
    return ShapesDataset("train", length or SHAPES_DEFAULT_LENGTH, seed=0, size=size)


def expand(spec: Sequence[str]) -> list[Path]:
    """Paths and glob patterns -> existing paths, in order; a pattern that matches nothing is an error."""
    paths: list[Path] = []
    for item in spec:
        if glob.has_magic(item):
            found = sorted(glob.glob(item))
            if not found:
                raise SdlabError(f"{item}: matches no files")
            paths.extend(Path(p) for p in found)
        else:
            paths.append(Path(item))
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise SdlabError(f"no such file or folder: {shorten(missing, 3)}")
    return paths


def open_source(spec: str | Sequence[str], size: int, limit: int | None = None) -> Dataset:
    """'shapes', one folder, or .tar shards (paths or globs) -> a dataset of `Sample`s at `size` pixels.

    `limit` keeps the first N samples (and is the length of the shapes dataset, default 20,000).
    """
    spec = [spec] if isinstance(spec, str) else list(spec)
    if limit is not None and limit < 1:
        raise SdlabError(f"limit must be at least 1, got {limit}")
    if spec == [SHAPES]:
        return shapes_dataset(size, limit)
    dataset = open_pictures(spec, size)
    return dataset if limit is None else Subset(dataset, range(min(limit, len(dataset))))


def open_pictures(spec: Sequence[str], size: int) -> ImageFolder | TarShards:
    """One folder, or .tar shards (paths or globs): images with captions, each readable as stored (`read`)."""
    paths = expand(spec)
    if len(paths) == 1 and paths[0].is_dir():
        return ImageFolder(paths[0], size)
    if all(p.is_file() and p.suffix == ".tar" for p in paths):
        return TarShards(paths, size)
    raise SdlabError(
        f"data must be 'shapes', one folder of images with .txt captions, or .tar shards; got {shorten(spec, 3)}"
    )


def data_key(spec: str | Sequence[str], size: int, limit: int | None) -> str:
    """What identifies the data in a latent cache: the resolved sources, their sizes and times, size, limit."""
    spec = [spec] if isinstance(spec, str) else list(spec)
    if spec == [SHAPES]:
        return f"shapes|{size}|{limit or SHAPES_DEFAULT_LENGTH}"
    parts = []
    for p in expand(spec):
        stat = p.stat()
        parts.append(f"{p.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join([*parts, str(size), str(limit)])


# --- the order samples are seen in ------------------------------------------------------------------
@dataclass
class SampleStream:
    """One process's endless stream of sample indices.

    Epoch e is a permutation of all n samples drawn from numpy's SeedSequence([seed, e]); rank r of w
    takes positions r, r + w, r + 2w, ... of it, n // w of them, so within an epoch the ranks see
    disjoint samples. Position p of the stream is therefore a function of (seed, rank, world, p) only:
    the data-order state a checkpoint keeps is the position.
    """

    n: int
    seed: int
    rank: int = 0
    world: int = 1
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.n < self.world:
            raise SdlabError(f"{self.n} samples cannot be shared among {self.world} processes; use more data")

    @property
    def per_epoch(self) -> int:
        return self.n // self.world

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        """The sample indices at stream positions start .. start + count - 1."""
        out = []
        for p in range(start, start + count):
            epoch, j = divmod(p, self.per_epoch)
            out.append(int(self.permutation(epoch)[self.rank + j * self.world]))
        return out

    def batches(self, start: int, batch: int) -> Iterator[list[int]]:
        """Index batches from position `start` on, forever."""
        position = start
        while True:
            yield self.indices(position, batch)
            position += batch
