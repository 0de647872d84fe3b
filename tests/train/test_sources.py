"""Training data sources (folder, tar shards) and the sample stream's order and sharding."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch

from sdlab.errors import SdlabError
from sdlab.train.sources import ImageFolder, SampleStream, TarShards, open_source
from tests.train.synthetic import samples, write_folder, write_shards


def test_folder_yields_cropped_images_in_range_with_captions(tmp_path):
    data = open_source(str(write_folder(tmp_path / "data")), size=32)
    assert isinstance(data, ImageFolder) and len(data) == 16
    captions = sorted(caption for _, caption in samples(16))
    assert sorted(data[i][1] for i in range(len(data))) == captions
    image, caption = data[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert -1.0 <= image.min() and image.max() <= 1.0 and image.min() < 0 < image.max()
    assert caption == "a red square"  # 000.jpg, no trailing newline


def test_tar_shards_match_the_folder(tmp_path):
    shards = write_shards(tmp_path / "shards", count=16, per_shard=6)
    data = open_source(str(tmp_path / "shards" / "*.tar"), size=32)
    assert isinstance(data, TarShards) and len(data) == 16 and len(shards) == 3
    assert [data[i][1] for i in range(16)] == [caption for _, caption in samples(16)]
    folder = open_source([str(write_folder(tmp_path / "folder", 16))], size=32)
    png = next(i for i, (path, _) in enumerate(folder.items) if path.name == "004.png")
    assert torch.equal(data[4][0], folder[png][0])  # same PNG pixels, same crop and resize


def test_limit_keeps_the_first_samples(tmp_path):
    write_shards(tmp_path, count=10, per_shard=10)
    data = open_source([str(tmp_path / "shard-00000.tar")], size=16, limit=4)
    assert len(data) == 4 and data[3][1] == samples(10)[3][1]
    with pytest.raises(IndexError):
        data[4]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: [str(p / "nothing-here")], "no such file or folder"),
        (lambda p: [str(p / "*.tar")], "matches no files"),
        (lambda p: [str(p)], "no images"),
    ],
)
def test_bad_data_is_one_line(tmp_path, make, message):
    with pytest.raises(SdlabError, match=message) as e:
        open_source(make(tmp_path), size=32)
    assert "\n" not in str(e.value)


def test_missing_captions_are_named(tmp_path):
    root = write_folder(tmp_path / "data", count=4)
    (root / "002.txt").unlink()
    with pytest.raises(SdlabError, match=r"1 images have no same-name \.txt caption \(002\.png\)"):
        open_source(str(root), size=32)
    shard = write_shards(tmp_path / "shards", count=2, per_shard=2)[0]
    with tarfile.open(shard, "a") as tar:
        tar.add(root / "000.jpg", arcname="extra.jpg")
    with pytest.raises(SdlabError, match="image but no .txt caption"):
        open_source(str(shard), size=32)


def test_compressed_tar_is_refused(tmp_path):
    path = tmp_path / "data.tar"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(write_folder(tmp_path / "f", 2) / "000.jpg", arcname="000.jpg")
    with pytest.raises(SdlabError, match="uncompressed tar"):
        open_source(str(path), size=32)


def test_stream_epochs_are_permutations_and_ranks_are_disjoint():
    n, world = 10, 3
    streams = [SampleStream(n, seed=5, rank=r, world=world) for r in range(world)]
    per = n // world
    for epoch in range(3):
        seen = [s.indices(epoch * per, per) for s in streams]
        flat = [i for part in seen for i in part]
        assert len(set(flat)) == len(flat) == world * per  # disjoint within an epoch
    one = SampleStream(n, seed=5)
    assert sorted(one.indices(0, n)) == list(range(n)) and sorted(one.indices(n, n)) == list(range(n))
    assert one.indices(0, n) != one.indices(n, n)  # a new order each epoch
    assert SampleStream(n, seed=5).indices(13, 4) == one.indices(13, 4)  # a position is all the state
    batches = one.batches(7, 3)
    assert [next(batches) for _ in range(2)] == [one.indices(7, 3), one.indices(10, 3)]
    assert np.array_equal(one.permutation(0), SampleStream(n, seed=5).permutation(0))
    with pytest.raises(SdlabError, match="cannot be shared among 4"):
        SampleStream(3, seed=0, world=4)
