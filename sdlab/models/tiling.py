"""Seamless tiling (AUTOMATIC1111's "Tiling"): every padded convolution pads circularly, so the image is
drawn on a torus and its right edge continues its left one, its bottom edge its top one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def circular_padding(*modules: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, the padded Conv2d layers of `modules` pad circularly; restored afterwards."""
    convs = [m for module in modules for m in module.modules() if isinstance(m, nn.Conv2d) and any(m.padding)]
    before = [m.padding_mode for m in convs]
    if enabled:
        for m in convs:
            m.padding_mode = "circular"
    try:
        yield
    finally:
        for m, mode in zip(convs, before):
            m.padding_mode = mode
