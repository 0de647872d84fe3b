"""Bounded fuzzing of the weight-file readers: mutated safetensors files, random headers and mutated
PyTorch archives either load or are refused with one CheckpointError line — never another exception,
a hang (an alarm after 10 s, and hypothesis's 2 s deadline) or a large allocation (files are kilobytes;
no case may grow the process by 256 MB)."""

from __future__ import annotations

import io
import json
import resource
import signal
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from sdlab.checkpoints import formats
from sdlab.checkpoints.embeddings import read_embedding
from sdlab.errors import CheckpointError
from tests.hostile import count

CASES = settings(max_examples=250, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
SEED_FILE = save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)},
                 metadata={"format": "pt"})
buffer = io.BytesIO()
torch.save({"state_dict": {"w": torch.arange(8.0)}, "global_step": 3}, buffer)
SEED_PICKLE = buffer.getvalue()
FOLDER = Path(tempfile.mkdtemp(prefix="sdlab-fuzz-"))


def _mutated(seed: bytes, data: st.DataObject) -> bytes:
    out = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "header-length"]))
        if kind == "flip" and out:
            out[data.draw(st.integers(0, len(out) - 1))] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del out[data.draw(st.integers(0, len(out))):]
        elif kind == "insert":
            at = data.draw(st.integers(0, len(out)))
            out[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif len(out) >= 8:
            out[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    return bytes(out)


class Hung(BaseException):
    """Raised by the alarm: a BaseException, so no reader's `except Exception` can swallow it."""


def _on_alarm(signum, frame):
    raise Hung("a reader took more than 10 s on a file of a few kilobytes")


def _read(data: bytes, suffix: str, reader=formats.read_weights) -> None:
    path = FOLDER / f"case{suffix}"
    path.write_bytes(data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(10)  # a hang fails the case instead of stalling the run
    try:
        reader(path)
    except CheckpointError as e:
        assert "\n" not in str(e)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 256, f"a {len(data)}-byte file made the process grow by {grown_mb:.0f} MB"


@CASES
@given(st.data())
def test_mutated_safetensors(data):
    _read(_mutated(SEED_FILE, data), ".safetensors")
    count("fuzz: mutated safetensors")


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=12)
ENTRY = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "X"]),
                               "shape": st.lists(st.integers(-2, 2**40), max_size=3),
                               "data_offsets": st.lists(st.integers(-4, 2**40), min_size=0, max_size=3)})


@CASES
@given(header=st.dictionaries(st.text(max_size=6), ENTRY | JSON, max_size=4), tail=st.binary(max_size=64))
def test_random_headers(header, tail):
    raw = json.dumps(header).encode()
    _read(struct.pack("<Q", len(raw)) + raw + tail, ".safetensors")
    count("fuzz: random safetensors headers")


@CASES
@given(st.data())
def test_mutated_pytorch_archives(data):
    _read(_mutated(SEED_PICKLE, data), ".ckpt")
    count("fuzz: mutated .ckpt archives")


@CASES
@given(st.data())
def test_mutated_embeddings(data):
    seed = save({"emb_params": torch.ones(2, 8)})
    _read(_mutated(seed, data), ".safetensors", lambda p: read_embedding(p, [8]))
    count("fuzz: mutated embeddings")
