"""ControlNet in a run: each unit's residuals, scaled and switched on for a window of the steps, summed
over units and added to the U-Net's skip connections and middle block (diffusers' ControlNet pipelines).

A unit is active at step i of n unless i/n < start or (i+1)/n > end. In guess mode (or for a ControlNet
with global pooling) it sees only the conditional half of a guided batch; the unconditional half gets
no residuals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sdlab.models.controlnet import ControlNet
from sdlab.models.unet import ControlResiduals


@dataclass(frozen=True)
class ControlUnit:
    net: ControlNet
    hint: Tensor  # (1, 3, H, W) in [0, 1], at the generation size
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False

    def active(self, step: int, steps: int) -> bool:
        return not (step / steps < self.start or (step + 1) / steps > self.end)


def _zeros_then(r: ControlResiduals) -> ControlResiduals:
    """Residuals of the conditional half -> a guided batch's: zeros for the unconditional half first."""
    pad = lambda t: torch.cat([torch.zeros_like(t), t])  # noqa: E731
    return ControlResiduals(tuple(pad(d) for d in r.down), pad(r.mid))


def _sum(a: ControlResiduals | None, b: ControlResiduals) -> ControlResiduals:
    if a is None:
        return b
    return ControlResiduals(tuple(x + y for x, y in zip(a.down, b.down)), a.mid + b.mid)


def control_residuals(
    units: tuple[ControlUnit, ...], x_in: Tensor, t: Tensor, context: Tensor, y: Tensor | None,
    step: int, steps: int, guided: bool,
) -> ControlResiduals | None:
    """x_in (B, 4, h, w) as the U-Net sees it, t (B,), context (B, L, D); `guided`: B = [uncond, cond]."""
    total = None
    for unit in units:
        if not unit.active(step, steps):
            continue
        guess = unit.guess_mode or unit.net.cfg.global_pool_conditions
        hint = unit.hint.to(x_in)
        if guess and guided:
            half = x_in.shape[0] // 2
            r = unit.net(x_in[half:], t[half:], context[half:], hint.expand(half, -1, -1, -1),
                         None if y is None else y[half:], scale=unit.strength, guess_mode=True)
            r = _zeros_then(r)
        else:
            r = unit.net(x_in, t, context, hint.expand(x_in.shape[0], -1, -1, -1), y,
                         scale=unit.strength, guess_mode=guess)
        total = _sum(total, r)
    return total
