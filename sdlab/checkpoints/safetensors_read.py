"""Reading a .safetensors file tensor by tensor with plain reads, every part of its header checked first.

The format: an 8-byte little-endian header length N, N bytes of JSON
(name -> {"dtype", "shape", "data_offsets": [begin, end]}, plus an optional "__metadata__" of strings),
then the data, each tensor's bytes at [begin, end) of it.

Why not memory-map it (as the safetensors library does): every page of a mapped file that was read
stays resident until the file is closed, so converting SD 1.5's 3.4 GB fp32 U-Net to bf16 peaked at
the whole fp32 file plus the bf16 copy (5.3 GB for the pipeline); read one tensor at a time, the peak
is the bf16 copy plus the largest single tensor.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import torch

from sdlab.errors import CheckpointError

MAX_HEADER = 100 * 2**20  # the safetensors library's own limit on the JSON header
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
Entry = tuple[torch.dtype, tuple[int, ...], int, int]  # dtype, shape, begin, end (in the data section)


def read_header(f, path: Path) -> tuple[dict[str, Entry], dict[str, str], int]:
    """(tensors, metadata, where the data starts) of an open file; a CheckpointError naming what is wrong."""
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
        raise _corrupt(path, "shorter than its 8-byte header length")
    n = int.from_bytes(prefix, "little")
    if n > MAX_HEADER or 8 + n > size:
        raise _corrupt(path, f"header length {n} does not fit the file ({size} bytes)")
    try:
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError):
        raise _corrupt(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "its __metadata__ is not a map of strings")
    data_size = size - 8 - n
    entries = {name: _entry(name, value, path) for name, value in header.items()}
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items())
    last_end, last_name = 0, None
    for begin, end, name in spans:
        if end > data_size:
            raise _corrupt(path, f"tensor {name!r} ends at byte {end}, past the data's {data_size}")
        if begin < last_end:
            raise _corrupt(path, f"tensors {last_name!r} and {name!r} overlap")
        last_end, last_name = end, name
    return entries, metadata, 8 + n


def _entry(name: str, value, path: Path) -> Entry:
    if not isinstance(value, dict):
        raise _corrupt(path, f"tensor {name!r} is described by a {type(value).__name__}, not an object")
    dtype = DTYPES.get(value.get("dtype"))
    shape, offsets = value.get("shape"), value.get("data_offsets")
    if dtype is None:
        raise _corrupt(path, f"tensor {name!r} has an unknown dtype {value.get('dtype')!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _corrupt(path, f"tensor {name!r} has a bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _corrupt(path, f"tensor {name!r} has bad data offsets {offsets!r}")
    expected = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise _corrupt(path, f"tensor {name!r} of shape {shape} in {value['dtype']} needs {expected} bytes, "
                             f"its offsets span {offsets[1] - offsets[0]}")
    return dtype, tuple(shape), offsets[0], offsets[1]


MAPPED_STAGING_BYTES = 1 << 20  # tensors this large or larger are staged in their own anonymous map


def read_tensors(
    path: Path, keep: Callable[[str], bool], convert: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors whose name passes `keep`, each through `convert` as soon as it is read, in file order."""
    with open(path, "rb") as f:
        entries, metadata, start = read_header(f, path)
        out = {}
        for name, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda e: e[1][2]):
            if not keep(name):
                continue
            f.seek(start + begin)
            out[name] = _read_one(f, dtype, shape, end - begin, convert, lambda: _corrupt(path, f"tensor {name!r} is cut short"))
    return out, metadata


def _read_one(f, dtype, shape, nbytes: int, convert, cut_short) -> torch.Tensor:
    """One tensor, staged in an anonymous memory map: unmapped as soon as it is converted, it goes back
    to the system at once (a heap buffer would leave the process's resident size at its high-water mark).
    Small tensors are read straight into a tensor: a map for each would cost more than the bytes."""
    if nbytes < MAPPED_STAGING_BYTES:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes and f.readinto(memoryview(buffer.numpy())) != nbytes:
            raise cut_short()
        return convert(buffer.view(dtype).reshape(shape))
    with mmap.mmap(-1, nbytes) as staging:
        if f.readinto(staging) != nbytes:
            raise cut_short()
        raw = torch.frombuffer(staging, dtype=dtype).reshape(shape)
        out = convert(raw)
        if out.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
            out = out.clone()  # the same dtype: a copy that outlives the staging map
        del raw
    return out


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: truncated or corrupt safetensors file ({why})")
