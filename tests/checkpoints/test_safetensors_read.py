"""sdlab's own safetensors reader: the same tensors and metadata as the safetensors library, and every
malformed header refused with a one-line reason before any tensor is read."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from sdlab.checkpoints.formats import read_weights
from sdlab.checkpoints.safetensors_read import DTYPES, MAPPED_STAGING_BYTES
from sdlab.errors import CheckpointError


def test_reads_every_dtype_exactly_like_the_library(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{name}": (torch.randn(3, 5, generator=g) * 50).to(dtype) for name, dtype in DTYPES.items()}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    state, metadata = read_weights(path)
    assert metadata == {"format": "pt", "note": "x"}
    assert state.keys() == tensors.keys()
    for k, t in tensors.items():
        assert state[k].dtype == t.dtype and state[k].shape == t.shape
        assert torch.equal(state[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k



@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_small_and_mapped_tensors_read_the_same(tmp_path, dtype):
    # under the threshold a tensor is read straight into its own buffer, from it on through a staging map
    n = MAPPED_STAGING_BYTES // 4
    tensors = {"small": torch.randn(n - 1), "edge": torch.randn(n), "large": torch.randn(2, n)}
    path = tmp_path / "sizes.safetensors"
    save_file(tensors, str(path))
    state, _ = read_weights(path, dtype=dtype)
    for k, t in tensors.items():
        assert torch.equal(state[k], t.to(dtype or t.dtype)), k
    assert state["edge"].untyped_storage().data_ptr() != state["small"].untyped_storage().data_ptr()

def test_converts_and_filters_while_reading(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a.weight": torch.randn(4, 4), "b.weight": torch.randn(2), "steps": torch.tensor([7])}, str(path))
    state, _ = read_weights(path, keep=lambda k: k != "b.weight", dtype=torch.bfloat16)
    assert set(state) == {"a.weight", "steps"}
    assert state["a.weight"].dtype == torch.bfloat16 and state["steps"].dtype == torch.int64  # ints keep their dtype


def _file(tmp_path, header, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _raw(tmp_path, data: bytes):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    return path


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
MALFORMED = [
    ("short", lambda p: _raw(p, b"\x01\x02"), "8-byte header"),
    ("huge header", lambda p: _file(p, {}, length=2**62), "does not fit the file"),
    ("header past the end", lambda p: _file(p, {}, length=1000), "does not fit the file"),
    ("not json", lambda p: _file(p, b"{not json"), "not JSON"),
    ("not utf-8", lambda p: _file(p, b"\xff\xfe{}"), "not JSON"),
    ("a list", lambda p: _file(p, [1, 2]), "not a JSON object"),
    ("metadata not strings", lambda p: _file(p, {"__metadata__": {"a": 1}}), "__metadata__"),
    ("entry not an object", lambda p: _file(p, {"w": 5}), "not an object"),
    ("unknown dtype", lambda p: _file(p, {"w": {**F32_2, "dtype": "F128"}}, bytes(8)), "unknown dtype"),
    ("negative shape", lambda p: _file(p, {"w": {**F32_2, "shape": [-2]}}, bytes(8)), "bad shape"),
    ("float shape", lambda p: _file(p, {"w": {**F32_2, "shape": [2.0]}}, bytes(8)), "bad shape"),
    ("reversed offsets", lambda p: _file(p, {"w": {**F32_2, "data_offsets": [8, 0]}}, bytes(8)), "bad data offsets"),
    ("size mismatch", lambda p: _file(p, {"w": {**F32_2, "shape": [3]}}, bytes(8)), "needs 12 bytes"),
    ("huge shape", lambda p: _file(p, {"w": {**F32_2, "shape": [2**40, 2**40]}}, bytes(8)), "needs"),
    ("past the end", lambda p: _file(p, {"w": {**F32_2, "data_offsets": [8, 16]}}, bytes(8)), "past the data"),
    ("overlap", lambda p: _file(p, {"w": F32_2, "v": {**F32_2, "data_offsets": [4, 12]}}, bytes(12)), "overlap"),
    ("truncated data", lambda p: _file(p, {"w": F32_2}, bytes(5)), "past the data"),
]


@pytest.mark.parametrize("name, make, reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_files_are_refused_with_a_reason(tmp_path, name, make, reason):
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as e:
        read_weights(path)
    message = str(e.value)
    assert "\n" not in message and "bad.safetensors" in message and "corrupt safetensors" in message
    assert reason in message
