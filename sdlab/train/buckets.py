"""Aspect-ratio bucketing (NovelAI's, as kohya-ss trains): images keep their shape instead of being
cropped square.

The buckets are the (width, height) pairs with sides multiples of `multiple`, area at most size², and
aspect ratio at most `max_ratio`, as wide as the area allows. Each image goes to the bucket nearest its
aspect ratio (in log ratio), is scaled to cover it and centre-cropped. A batch holds one bucket only.

The order is a `BucketStream`: epoch e shuffles the samples (numpy SeedSequence([seed, e])), cuts each
bucket's samples, in that order, into batches, and shuffles the batches; rank r of w takes batches
r, r + w, …. Position p of the stream — all a checkpoint needs — is a function of (seed, rank, world, p).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from sdlab.errors import SdlabError

MAX_RATIO = 2.0  # the widest bucket is twice as wide as high (kohya's default limit is similar)


def bucket_sizes(size: int, multiple: int, max_ratio: float = MAX_RATIO) -> list[tuple[int, int]]:
    """(width, height) buckets of at most size² pixels, sides multiples of `multiple`, sorted by aspect ratio."""
    if size % multiple:
        raise SdlabError(f"size {size} is not a multiple of {multiple}")
    area = size * size
    buckets = set()
    width = multiple
    while width <= size * max_ratio:
        height = (area // width) // multiple * multiple
        if height >= multiple and max(width, height) / min(width, height) <= max_ratio:
            buckets.add((width, height))
        width += multiple
    buckets.add((size, size))
    return sorted(buckets, key=lambda b: b[0] / b[1])


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log ratio) that of a width x height image."""
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ratio))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Scale (Lanczos) to cover the bucket, then centre-crop to it."""
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if scaled != image.size:
        image = image.resize(scaled, Image.Resampling.LANCZOS)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


@dataclass
class BucketStream:
    """One process's endless stream of batches of sample indices, each batch from a single bucket."""

    buckets: Sequence[int]  # the bucket of each sample
    batch: int
    seed: int
    rank: int = 0
    world: int = 1
    _cache: dict[int, list[list[int]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise SdlabError(f"batch must be at least 1, got {self.batch}")
        if len(self._epoch(0)) < self.world:
            raise SdlabError(
                f"{len(self.buckets)} samples make {len(self._epoch(0))} batches of {self.batch}, fewer than the "
                f"{self.world} processes; use more data or a smaller batch"
            )

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.buckets))
            batches: list[list[int]] = []
            for b in sorted(set(self.buckets)):
                members = [int(i) for i in order if self.buckets[i] == b]
                batches += [members[k : k + self.batch] for k in range(0, len(members), self.batch)]
            self._cache = {epoch: [batches[i] for i in rng.permutation(len(batches))]}
        return self._cache[epoch]

    @property
    def per_epoch(self) -> int:
        return len(self._epoch(0)) // self.world

    def at(self, position: int) -> list[int]:
        epoch, j = divmod(position, self.per_epoch)
        return self._epoch(epoch)[self.rank + j * self.world]

    def batches(self, start: int) -> Iterator[list[int]]:
        """Batches from stream position `start` on, forever."""
        position = start
        while True:
            yield self.at(position)
            position += 1
