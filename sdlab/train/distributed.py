"""Running under `torchrun` / `accelerate launch`: the process group, this process's place in it, and
the few collectives the trainer needs. Without those launchers' environment it is one process.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from sdlab.errors import SdlabError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_environment() -> Dist:
    """RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE as torchrun and accelerate set them."""
    env = os.environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as e:
        raise SdlabError(f"bad distributed environment variable ({e})") from None
    return Dist(rank, world, local_rank, local_world)


def choose_device(name: str, d: Dist) -> torch.device:
    """'auto' -> this rank's GPU when CUDA is there, else the CPU; 'cuda' -> cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SdlabError("device 'cuda' asked for, but PyTorch sees no CUDA GPU here")
        if device.index is None:
            device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    return device


def init(d: Dist, device: torch.device) -> None:
    """Join the process group (nccl on CUDA, gloo on the CPU) when launched with more than one process."""
    if d.active and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=d.rank, world_size=d.world)


def close(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def launched(device_name: str, threads: int | None, work: Callable[[Dist, torch.device], T]) -> T:
    """Run `work(dist, device)` in this process's place of the launch (one process without a launcher):
    the process group joined, CPU threads set (`threads`, else the cores shared among local ranks), and
    both undone afterwards."""
    d = from_environment()
    device = choose_device(device_name, d)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    elif d.local_world > 1 and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.local_world))  # the cores, shared among ranks
    init(d, device)
    try:
        return work(d, device)
    finally:
        close(d)
        torch.set_num_threads(before)


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def main_first(d: Dist, work: Callable[[], T]) -> T | None:
    """Run `work` on the main process while the others wait; its SdlabError (one line) is raised on every
    rank, so no rank is left waiting for a main process that gave up. Returns the result on main."""
    result, error = None, None
    if d.main:
        try:
            result = work()
        except SdlabError as e:
            error = str(e)
    if d.active:
        error = gather_objects(d, error)[0]
    if error is not None:
        raise SdlabError(error)
    return result


def gather_objects(d: Dist, obj) -> list:
    """Every rank's `obj`, in rank order (a list of one without a process group)."""
    if not d.active:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors (names, dtypes, shapes and bytes): equal hashes, equal tensors."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def state_hash(module: nn.Module) -> str:
    return tensors_hash(module.state_dict())
