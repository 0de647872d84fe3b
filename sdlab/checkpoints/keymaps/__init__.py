"""Rename tables between sdlab's parameter names and other layouts, applied with full checks.

sdlab's U-Net and VAE use the original (ldm / "single file") names, its text encoders the
transformers CLIP names; each submodule here maps one other layout onto those.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from functools import lru_cache
from typing import TypeVar

from torch import nn

from sdlab.errors import CheckpointError, shorten
from sdlab.models.empty import empty_modules

T = TypeVar("T")
C = TypeVar("C", bound=Hashable)
Pairs = Sequence[tuple[str, str]]  # (our name, their name)


def rename(state: Mapping[str, T], mapping: Mapping[str, str], *, source: str) -> dict[str, T]:
    """Apply `mapping` (source key -> target key) to every key of `state`.

    The key sets must agree exactly: a key the table does not know, or a table key the
    state lacks, raises a CheckpointError naming both lists (shortened) and `source`.
    """
    missing = [k for k in mapping if k not in state]
    unexpected = [k for k in state if k not in mapping]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({shorten(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({shorten(unexpected)})")
        raise CheckpointError(f"{source}: {'; '.join(parts)}")
    return {mapping[k]: v for k, v in state.items()}


def check_shapes(state: Mapping[str, object], expected: Mapping[str, tuple[int, ...]], *, source: str) -> None:
    """Every key present in both, and every shape equal; otherwise one CheckpointError line."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}"  # type: ignore[attr-defined]
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])  # type: ignore[attr-defined]
    ]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys ({shorten(missing)})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys ({shorten(unexpected)})")
    if wrong:
        parts.append(f"{len(wrong)} shapes differ ({shorten(wrong, 3)})")
    if parts:
        raise CheckpointError(f"{source}: {'; '.join(parts)}")


def meta_shapes(factory: Callable[[C], nn.Module], cfg: C) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape under our names, read off `factory(cfg)` built on the meta device."""
    return dict(_meta_shapes(factory, cfg))


@lru_cache(maxsize=32)
def _meta_shapes(factory: Callable[[C], nn.Module], cfg: C) -> dict[str, tuple[int, ...]]:
    with empty_modules():
        model = factory(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def from_theirs(state: Mapping[str, T], pairs: Pairs, shapes: Mapping[str, tuple[int, ...]], *, source: str) -> dict[str, T]:
    """Their names -> ours; every key and shape checked (against ours, `shapes`) before anything is renamed."""
    check_shapes(state, {theirs: shapes[ours] for ours, theirs in pairs}, source=source)
    return rename(state, {theirs: ours for ours, theirs in pairs}, source=source)


def to_theirs(state: Mapping[str, T], pairs: Pairs, shapes: Mapping[str, tuple[int, ...]], *, source: str) -> dict[str, T]:
    """Our names -> theirs; every key and shape checked first."""
    check_shapes(state, shapes, source=source)
    return rename(state, dict(pairs), source=source)
