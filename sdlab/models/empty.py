"""Modules built for their shapes alone: on the meta device, with their weight initialisers skipped.

On the meta device an initialiser such as `nn.init.normal_` computes nothing, but the first one to run
imports PyTorch's Python reference kernels for meta tensors, about 1.4 s of a cold start on a small
CPU. The weights are replaced by loaded tensors (or only their shapes are read) anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn import init

_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                 "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


def _keep(tensor, *args, **kwargs):
    return tensor


@contextmanager
def empty_modules() -> Iterator[None]:
    """Within the block, modules are created on the meta device and their initialisers do nothing."""
    saved = {name: getattr(init, name) for name in _INITIALISERS}
    for name in _INITIALISERS:
        setattr(init, name, _keep)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)
