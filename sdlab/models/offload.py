"""Sequential offload: the weights live in host memory and visit the accelerator one layer at a time.

Every module that holds tensors of its own (parameters, buffers) gets a hook around its forward: just
before, those tensors are copied to the compute device, and just after, the module points back at its
host copies, so at most one layer's weights (plus the activations) occupy the device at once. The host
copies are never written; nothing is copied back. On CUDA they are pinned, so the copies can overlap.

It trades speed for memory, as diffusers' `enable_sequential_cpu_offload` does: every step moves all
the weights across the bus once. Inputs reaching a hooked module on another device are moved too, so
callers may build token ids or masks on the host.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def _own_tensors(module: nn.Module) -> dict[str, Tensor]:
    return {**{k: p for k, p in module._parameters.items() if p is not None},
            **{k: b for k, b in module._buffers.items() if b is not None}}


def _point_at(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Make `module` hold `tensors` (the host originals, or fresh device copies of them)."""
    for name, t in tensors.items():
        if name in module._parameters:
            module._parameters[name] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
        else:
            module._buffers[name] = t


def _to(x, device: torch.device):
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def sequential_offload(module: nn.Module, device: torch.device | str) -> list[RemovableHandle]:
    """Keep `module`'s weights on the host and run each layer on `device`. Returns the hook handles
    (remove them, and the module stays on the host)."""
    device = torch.device(device)
    pin = device.type == "cuda"
    handles = []
    for sub in module.modules():
        host = _own_tensors(sub)
        if not host:
            continue
        for t in host.values():
            t.data = t.data.cpu().pin_memory() if pin else t.data.cpu()

        def before(m, args, kwargs, host=host):
            _point_at(m, {name: t.detach().to(device, non_blocking=True) for name, t in host.items()})
            return _to(args, device), _to(kwargs, device)

        def after(m, args, output, host=host):
            _point_at(m, host)  # the device copies are dropped; the host ones were never changed

        handles.append(sub.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(sub.register_forward_hook(after))
    return handles


@contextmanager
def offloaded(module: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """`sequential_offload` for the duration of a block."""
    handles = sequential_offload(module, device)
    try:
        yield module
    finally:
        for h in handles:
            h.remove()
