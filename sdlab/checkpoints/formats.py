"""Reading and writing weight files: safetensors, weights-only pickles, sharded indexes.

Tensors are converted to the target dtype and device one at a time as they are read, so a
load never holds a second full copy of the model in memory. Pickled `.ckpt`/`.bin` files go
only through PyTorch's weights-only unpickler; anything that needs more is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import save_file

from sdlab.atomic import atomic_write
from sdlab.checkpoints.safetensors_read import read_header, read_tensors
from sdlab.config import from_dict
from sdlab.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
KeyFilter = Callable[[str], bool]
C = TypeVar("C")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'fp16' / 'bf16' / 'fp32' (or a torch.dtype, or None = keep the file's) -> torch.dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> 'fp16', the inverse of parse_dtype."""
    return {v: k for k, v in _DTYPES.items()}[dtype]


def _convert(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype=dtype)
    return t.to(device)


def safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with open(path, "rb") as f:
            return read_header(f, path)[1]
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({_first_line(e)})") from None


def _read_safetensors(path: Path, keep: KeyFilter, dtype, device) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        return read_tensors(path, keep, lambda t: _convert(t, dtype, device))
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({_first_line(e)})") from None


def read_pickle_object(path: Path) -> object:
    """A pickled file's object through PyTorch's weights-only unpickler: tensors, containers, numbers and
    strings only. A pickle that asks for anything else (a GLOBAL such as os.system) is refused, naming it;
    a damaged one is one line too."""
    try:
        with warnings.catch_warnings():  # torch's notes on odd protocols: the verdict below is what counts
            warnings.simplefilter("ignore")
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (pre-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).split("\n")
        culprit = next((line.strip() for line in detail if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(
            f"{path}: refused — this pickle needs more than tensors to load ({culprit or 'unsafe object'}); "
            "sdlab reads pickles only with PyTorch's weights-only unpickler. Convert it to .safetensors "
            "with a tool you trust."
        ) from None
    except Exception as e:  # noqa: BLE001 — any other failure to parse is a damaged file, said in one line
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None


def _read_pickle(path: Path, keep: KeyFilter, dtype, device) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights-only unpickling; returns (tensors, other top-level entries such as global_step)."""
    obj = read_pickle_object(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(state).__name__}, not a dict of tensors")
    tensors = {k: _convert(v, dtype, device) for k, v in state.items() if isinstance(v, torch.Tensor) and keep(k)}
    extras = {k: v for k, v in obj.items() if k != "state_dict" and not isinstance(v, (torch.Tensor, Mapping))}
    return tensors, extras


def read_weights(
    path: str | os.PathLike,
    *,
    keep: KeyFilter = lambda k: True,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of one weights file whose key passes `keep`, plus its non-tensor entries
    (safetensors metadata, or a pickle's `global_step` and the like)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path, keep, dtype, device)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path, keep, dtype, device)
    raise CheckpointError(
        f"{path}: unknown weights format {path.suffix!r}; expected one of "
        f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
    )


def read_sharded(
    index_path: Path, *, keep: KeyFilter = lambda k: True, dtype=None, device="cpu"
) -> dict[str, torch.Tensor]:
    """A `*.index.json` (`weight_map`: key -> shard file) read shard by shard."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{index_path}: unreadable shard index ({_first_line(e)})") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part, _ = read_weights(index_path.parent / shard, keep=keep, dtype=dtype, device=device)
        state.update(part)
    missing = [k for k, shard in weight_map.items() if keep(k) and k not in state]
    if missing:
        raise CheckpointError(f"{index_path}: {len(missing)} indexed keys missing from their shards ({missing[0]}, …)")
    return state


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically: a temporary file beside the target, then one rename."""
    atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def cast_all(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: _convert(v, dtype, v.device) for k, v in tensors.items()}


def with_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


def strip_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def any_key(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Write a new folder's files into the yielded temporary folder beside it; it becomes `folder` in one
    rename when the block succeeds and is removed when it fails. `folder` must not exist or be empty."""
    if folder.exists() and any(folder.iterdir()):
        raise CheckpointError(f"{folder}: exists and is not empty; choose a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def config_from_metadata(cls: type[C], extras: Mapping[str, str], key: str, source: str) -> C | None:
    """The config dataclass sdlab stored as JSON under `key` of a file's metadata, or None if absent."""
    raw = extras.get(key)
    if not raw:
        return None
    try:
        return from_dict(cls, json.loads(raw))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: unreadable '{key}' metadata ({e})") from None
