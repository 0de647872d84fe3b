"""Aspect-ratio buckets: the sizes, the choice of bucket, the crop, and a batch order that is a function
of (seed, rank, world, position) with one bucket per batch and disjoint shares per rank."""

from __future__ import annotations

import pytest
from PIL import Image

from sdlab.errors import SdlabError
from sdlab.train.buckets import BucketStream, bucket_sizes, fit_to_bucket, nearest_bucket


def test_sd_buckets_are_multiples_of_64_within_the_area_and_ratio():
    buckets = bucket_sizes(512, 64)
    assert (512, 512) in buckets and (640, 384) in buckets and (384, 640) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert all(max(w, h) / min(w, h) <= 2 for w, h in buckets)
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)
    with pytest.raises(SdlabError):
        bucket_sizes(500, 64)


def test_nearest_bucket_and_fit():
    buckets = bucket_sizes(512, 64)
    wide = buckets[nearest_bucket(1920, 1080, buckets)]
    assert wide[0] > wide[1] and abs(wide[0] / wide[1] - 16 / 9) < 0.2
    image = Image.new("RGB", (1920, 1080))
    assert fit_to_bucket(image, wide).size == wide
    assert buckets[nearest_bucket(100, 100, buckets)] == (512, 512)


def test_stream_batches_hold_one_bucket_and_ranks_share_disjointly():
    buckets = [0, 1, 2] * 10  # 30 samples in three buckets
    streams = [BucketStream(buckets, batch=4, seed=3, rank=r, world=2) for r in range(2)]
    per_epoch = streams[0].per_epoch
    first = [[streams[r].at(p) for p in range(per_epoch)] for r in range(2)]
    for batches in first:
        assert all(len({buckets[i] for i in b}) == 1 for b in batches)
    seen = [{i for b in batches for i in b} for batches in first]
    assert not seen[0] & seen[1]
    again = BucketStream(buckets, batch=4, seed=3, rank=1, world=2)
    assert [again.at(p) for p in range(3 * per_epoch)] == [streams[1].at(p) for p in range(3 * per_epoch)]
    assert streams[0].at(per_epoch) != streams[0].at(0) or streams[0].at(per_epoch + 1) != streams[0].at(1)


def test_too_little_data_for_the_processes_is_refused():
    with pytest.raises(SdlabError, match="fewer than"):
        BucketStream([0, 0], batch=2, seed=0, rank=0, world=2)
