"""Weight updates of Linear and Conv2d layers: LoRA (Hu et al. 2021) and LyCORIS's LoCon, LoHa and LoKr.

Every update is a ΔW of its layer's weight shape (out, in) or (out, in, kh, kw), times `scale`
(the file's alpha / rank, or 1) and the user's weight w:

    LoRA   ΔW = up · down                  up (out, r [,1,1]), down (r, in [,kh,kw])
    Tucker ΔW = up · mid · down            LoCon with a core: down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1)
    LoHa   ΔW = (w1a · w1b) ⊙ (w2a · w2b)  Hadamard product of two low-rank products
    LoKr   ΔW = w1 ⊗ w2                    Kronecker product; either factor may itself be a · b
    Full   ΔW = diff

Two ways to apply updates to a network:

    patch  a forward hook adds w · scale · branch(x) to the layer's output; the weights are not touched, so
           removing the hooks gives back the network exactly. LoRA's branch is two thin layers,
           up(down(x)), far cheaper than forming ΔW.
    fuse   W ← W + w · scale · ΔW (summed in float32), after keeping a copy of W; `restore` puts the copy
           back, bit for bit. Faster to run, slower to switch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

Layer = nn.Linear | nn.Conv2d


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)  # (out, in * kh * kw)


def _shape_to(delta: Tensor, shape: torch.Size, what: str) -> Tensor:
    """A ΔW of the same size, reshaped to the layer's weight: a Linear update on a 1x1 convolution
    (SD1's proj_in against SD2's) or the reverse."""
    if delta.shape == shape:
        return delta
    if delta.numel() != shape.numel():
        raise ValueError(f"{what}: its update has shape {tuple(delta.shape)}, the layer's weight {tuple(shape)}")
    return delta.reshape(shape)


@dataclass
class Update:
    """One layer's update: `delta(shape)` forms ΔW; `branch` applies it to the layer's input."""

    scale: float
    _delta: Tensor | None = field(default=None, init=False, repr=False, compare=False)  # `branch`'s ΔW

    def delta(self, shape: torch.Size) -> Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def branch(self, layer: Layer, x: Tensor) -> Tensor:
        """ΔW applied to x as the layer applies W (no bias): what the update adds to the layer's output.
        ΔW is formed once per dtype, not on every call."""
        if self._delta is None or self._delta.dtype != x.dtype:
            self._delta = self.delta(layer.weight.shape).to(x.device, x.dtype)
        if isinstance(layer, nn.Conv2d):
            return layer._conv_forward(x, self._delta, None)  # the layer's stride, padding (mode) and dilation
        return F.linear(x, self._delta)


@dataclass
class LowRank(Update):
    """LoRA: ΔW = up · down, or up · mid · down with a Tucker core (LyCORIS LoCon)."""

    down: Tensor  # (r, in) | (r, in, kh, kw) | (r, in, 1, 1) with mid
    up: Tensor  # (out, r) | (out, r, 1, 1)
    mid: Tensor | None = None  # (r, r, kh, kw)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size) -> Tensor:
        up, down = _flat(self.up).float(), _flat(self.down).float()  # (out, r), (r, in·kh·kw)
        if self.mid is None:
            return _shape_to(up @ down, shape, "LoRA")
        core = torch.einsum("abhw,bi->aihw", self.mid.float(), down)  # (r, in, kh, kw)
        return _shape_to(torch.einsum("oa,aihw->oihw", up, core), shape, "LoRA")

    def branch(self, layer: Layer, x: Tensor) -> Tensor:
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if isinstance(layer, nn.Linear):
            return F.linear(F.linear(x, _flat(down)), _flat(up))  # (…, in) -> (…, r) -> (…, out)
        if down.dim() == 2:  # a Linear LoRA on a 1x1 convolution
            down, up = down[..., None, None], up[..., None, None]
        if self.mid is None:
            h = layer._conv_forward(x, down, None)  # (B, r, H', W'): the layer's own stride and padding
        else:
            h = layer._conv_forward(F.conv2d(x, down), self.mid.to(x.dtype), None)
        return F.conv2d(h, up.reshape(up.shape[0], -1, 1, 1))  # (B, out, H', W')


@dataclass
class Hadamard(Update):
    """LoHa: ΔW = (w1a · w1b) ⊙ (w2a · w2b), each product optionally through a Tucker core t1 / t2."""

    w1a: Tensor  # (out, r)
    w1b: Tensor  # (r, in·kh·kw)
    w2a: Tensor
    w2b: Tensor
    t1: Tensor | None = None  # (r, r, kh, kw)
    t2: Tensor | None = None

    def delta(self, shape: torch.Size) -> Tensor:
        return _shape_to(_product(self.w1a, self.w1b, self.t1, shape) * _product(self.w2a, self.w2b, self.t2, shape),
                         shape, "LoHa")


def _product(a: Tensor, b: Tensor, core: Tensor | None, shape: torch.Size) -> Tensor:
    """a · b, or with a Tucker core: core (r, r', kh, kw) joined to a (r, out) and b (r', in)."""
    if core is None:
        return (a.float() @ b.float()).reshape(shape)
    return torch.einsum("ijhw,io,jc->ochw", core.float(), a.float(), b.float()).reshape(shape)


@dataclass
class Kronecker(Update):
    """LoKr: ΔW = w1 ⊗ w2, either factor given whole or as a product a · b (w2 optionally through a core)."""

    w1: Tensor | None = None  # (out1, in1)
    w1a: Tensor | None = None
    w1b: Tensor | None = None
    w2: Tensor | None = None  # (out2, in2 [, kh, kw])
    w2a: Tensor | None = None
    w2b: Tensor | None = None
    t2: Tensor | None = None

    def delta(self, shape: torch.Size) -> Tensor:
        w1 = self.w1.float() if self.w1 is not None else self.w1a.float() @ self.w1b.float()  # (o1, i1)
        if self.w2 is not None:
            w2 = self.w2.float()
        elif self.t2 is not None:
            w2 = torch.einsum("ijhw,io,jc->ochw", self.t2.float(), self.w2a.float(), self.w2b.float())
        else:
            w2 = self.w2a.float() @ self.w2b.float()  # (o2, i2·kh·kw)
            if len(shape) == 4:
                w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        if w2.dim() == 4:
            w1 = w1[..., None, None]  # kron over (out, in), the kernel from w2
        return _shape_to(torch.kron(w1, w2), shape, "LoKr")


@dataclass
class Full(Update):
    """A whole ΔW stored as it is (LyCORIS "full" / `diff`)."""

    diff: Tensor

    def delta(self, shape: torch.Size) -> Tensor:
        return _shape_to(self.diff.float(), shape, "full update")


# --- applying updates --------------------------------------------------------------------------------
Targets = Mapping[str, Update]  # module name in `root` -> its update


def layer(root: nn.Module, name: str) -> Layer:
    module = root.get_submodule(name)
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"{name} is a {type(module).__name__}; updates apply to Linear and Conv2d layers")
    return module


def _hook(update: Update, weight: float) -> Callable[[nn.Module, tuple, Tensor], Tensor]:
    factor = weight * update.scale

    def add_branch(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output + factor * update.branch(module, args[0])  # type: ignore[arg-type]

    return add_branch


def patch(root: nn.Module, updates: Targets, weight: float = 1.0) -> list[RemovableHandle]:
    """Add each update's branch to its layer's output; remove the returned handles to undo exactly."""
    return [layer(root, name).register_forward_hook(_hook(u, weight)) for name, u in updates.items()]


@dataclass
class Fused:
    """Original weights of the layers fused into, to put back exactly."""

    originals: dict[str, Tensor] = field(default_factory=dict)


@torch.no_grad()
def fuse(root: nn.Module, updates: Targets, weight: float = 1.0, into: Fused | None = None) -> Fused:
    """W ← W + weight · scale · ΔW for each update; the first fuse into a layer keeps its original weight."""
    fused = Fused() if into is None else into
    for name, update in updates.items():
        w = layer(root, name).weight
        fused.originals.setdefault(name, w.detach().clone())
        w.copy_((w.float() + (weight * update.scale) * update.delta(w.shape).to(w.device)).to(w.dtype))
    return fused


@torch.no_grad()
def restore(root: nn.Module, fused: Fused) -> None:
    """Every fused layer's weight back to the copy taken before its first fuse."""
    for name, original in fused.originals.items():
        layer(root, name).weight.copy_(original)
    fused.originals.clear()


def remove(handles: Sequence[RemovableHandle]) -> None:
    for h in handles:
        h.remove()
