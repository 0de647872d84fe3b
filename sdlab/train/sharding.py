"""Fully sharded data parallelism (PyTorch's FSDP2, `fully_shard`) for full fine-tuning of big models.

Each rank keeps 1/world of every parameter, its gradient and its optimizer state; a block's weights are
gathered just before it runs and freed after. The blocks are the U-Net's input/middle/output entries and
the text encoders' layers; the rest shards with the root. What is trained and the loss are unchanged: with
the same global batch, FSDP and DDP take the same steps up to the order of floating-point sums.

Checkpoints and results hold full tensors: they are gathered (a collective every rank joins) and the
main process writes them; a resumed run scatters them back to the shards.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from sdlab.models.clip import CLIPEncoderLayer
from sdlab.models.layers import ConditionedSequential

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on the main rank's CPU


def shard(module: nn.Module) -> nn.Module:
    """Shard every U-Net block and text-encoder layer, then the root, in place."""
    for block in [m for m in module.modules() if isinstance(m, (ConditionedSequential, CLIPEncoderLayer))]:
        fully_shard(block)
    fully_shard(module)
    return module


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of whole tensors on the main rank (empty elsewhere); every rank calls it."""
    return get_state_dict(module, optimizer, options=FULL)


def load_full_state(module: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Scatter whole-tensor state dicts (every rank holds them) back into the shards."""
    set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))


def gathered(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Sharded tensors made whole (a collective, in name order), others as they are; on the CPU."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in sorted(tensors.items())}


def scattered(full: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Whole tensors sharded the way the tensors of the same names in `like` are."""
    out = {}
    for name, value in full.items():
        ref = like[name]
        if isinstance(ref, DTensor):
            out[name] = distribute_tensor(value.to(ref.dtype), ref.device_mesh, ref.placements)
        else:
            out[name] = value.to(ref.device, ref.dtype)
    return out
