"""A corpus of hostile and malformed weight files, built on demand in a folder.

Malicious pickles would, if unpickled by a permissive loader, create a marker file: by `os.system`,
`posix.system`, `builtins.eval`, `builtins.exec`, `subprocess.Popen` and `subprocess.check_call`, each
reached through the GLOBAL opcode (protocols 0–3) and the STACK_GLOBAL opcode (protocol 4+), as a bare
pickle, inside a PyTorch zip archive (`archive/data.pkl`) and nested in a state dict, under the
extensions people download (.ckpt, .pt, .pth, .bin) and disguised ones (.safetensors, .png).
Malformed safetensors files break the header (length, JSON, type), the offsets (past the end,
overlapping, wrong span), the dtype and the shape, and the file's length.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

TRIED: dict[str, int] = {}  # what the tests tried, for the summary at the end of the run (conftest.py)


def count(kind: str, n: int = 1) -> None:
    TRIED[kind] = TRIED.get(kind, 0) + n


# --- pickles that run code --------------------------------------------------------------------------
def _calls(marker: Path) -> list[tuple[str, str, str, object]]:
    """(label, module, name, argument) of calls that would create `marker`."""
    m = str(marker)
    return [
        ("os.system", "os", "system", f"touch {m}"),
        ("posix.system", "posix", "system", f"touch {m}"),
        ("builtins.eval", "builtins", "eval", f"open({m!r}, 'w').close()"),
        ("builtins.exec", "builtins", "exec", f"open({m!r}, 'w').close()"),
        ("subprocess.Popen", "subprocess", "Popen", ["touch", m]),
        ("subprocess.check_call", "subprocess", "check_call", ["touch", m]),
    ]


def _unicode(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data if len(data) < 256 else b"X" + struct.pack("<I", len(data)) + data


def _argument(value: object) -> bytes:
    """Protocol-2+ opcodes pushing a str or a list of str."""
    if isinstance(value, str):
        return b"X" + struct.pack("<I", len(value.encode())) + value.encode()
    return b"]" + b"(" + b"".join(_argument(v) for v in value) + b"e"  # EMPTY_LIST MARK items APPENDS


def call_pickle(module: str, name: str, argument: object, opcode: str, nested: bool) -> bytes:
    """A pickle whose loading calls module.name(argument): via GLOBAL or STACK_GLOBAL, bare or inside
    {"state_dict": {"model.weight": <call>}}."""
    if opcode == "GLOBAL":
        head, callee = b"\x80\x02", b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    else:
        head, callee = b"\x80\x04", _unicode(module) + _unicode(name) + b"\x93"
    call = callee + _argument(argument) + b"\x85R"  # TUPLE1, REDUCE
    if nested:
        body = b"}" + _argument("state_dict") + b"}" + _argument("model.weight") + call + b"s" + b"s"
    else:
        body = call
    return head + body + b"."


def torch_zip(data_pkl: bytes) -> bytes:
    """A PyTorch zip archive (torch.save's format) whose data.pkl is `data_pkl`."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return out.getvalue()


@dataclass(frozen=True)
class Hostile:
    label: str
    path: Path


def malicious_pickles(folder: Path, marker: Path) -> list[Hostile]:
    """Every call x opcode x nesting x container, under several extensions."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    suffixes = [".ckpt", ".pt", ".pth", ".bin", ".safetensors", ".png"]
    k = 0
    for label, module, name, argument in _calls(marker):
        for opcode in ("GLOBAL", "STACK_GLOBAL"):
            for nested in (False, True):
                raw = call_pickle(module, name, argument, opcode, nested)
                for container, data in (("bare", raw), ("zip", torch_zip(raw))):
                    suffix = suffixes[k % len(suffixes)]
                    k += 1
                    path = folder / f"{k:03d}-{name}-{opcode}-{'nested' if nested else 'top'}-{container}{suffix}"
                    path.write_bytes(data)
                    out.append(Hostile(f"{label} {opcode} {'nested' if nested else 'top'} {container} {suffix}", path))
    return out


# --- malformed safetensors ------------------------------------------------------------------------------
def _with_header(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def malformed_safetensors(folder: Path) -> list[Hostile]:
    folder.mkdir(parents=True, exist_ok=True)
    good = save({"w": torch.ones(2, 3)})
    n = struct.unpack("<Q", good[:8])[0]
    entry = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    cases = {
        "empty file": b"",
        "shorter than its length field": b"\x01\x02",
        "header length past the end": _with_header({"w": entry}, b"\0" * 24, length=10**6),
        "header length of 2**63": struct.pack("<Q", 2**63) + b"{}",
        "header not JSON": _with_header(b"\xff\xfe not json at all"),
        "header a JSON list": _with_header(b"[1, 2, 3]"),
        "metadata not strings": _with_header({"__metadata__": {"a": 1}, "w": entry}, b"\0" * 24),
        "tensor entry not an object": _with_header({"w": [1, 2]}, b"\0" * 24),
        "unknown dtype": _with_header({"w": {**entry, "dtype": "Q7"}}, b"\0" * 24),
        "negative shape": _with_header({"w": {**entry, "shape": [-2, 3]}}, b"\0" * 24),
        "shape and offsets disagree": _with_header({"w": {**entry, "shape": [4, 3]}}, b"\0" * 24),
        "dtype and offsets disagree": _with_header({"w": {**entry, "dtype": "F64"}}, b"\0" * 24),
        "offsets past the data": _with_header({"w": {**entry, "data_offsets": [24, 48]}}, b"\0" * 24),
        "offsets reversed": _with_header({"w": {**entry, "data_offsets": [24, 0]}}, b"\0" * 24),
        "overlapping tensors": _with_header({"a": entry, "b": {**entry, "data_offsets": [12, 36]}}, b"\0" * 36),
        "huge shape, tiny data": _with_header({"w": {**entry, "shape": [2**31, 2**31]}}, b"\0" * 24),
        "data cut short": good[: 8 + n + 10],
        "a pickle named .safetensors": torch_zip(b"\x80\x02}."),
    }
    out = []
    for i, (label, data) in enumerate(cases.items()):
        path = folder / f"{i:02d}.safetensors"
        path.write_bytes(data)
        out.append(Hostile(label, path))
    return out
