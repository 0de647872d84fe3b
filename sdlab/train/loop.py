"""The optimisation loop both stages share: AdamW with a warm-up schedule, mixed precision, gradient
accumulation and clipping, EMA weights, a progress bar, and checkpoints that resume bit-exactly.

A stage supplies the module to train, its micro-batches from a stream position, and its loss; all
training randomness (posterior samples, timesteps, noise, caption dropout) comes from one generator
per process whose state is checkpointed with everything else:

    checkpoint = {module, ema, optimizer, scheduler, grad scaler, step,
                  per rank: {training generator, torch, cuda, numpy and python RNG states}}

The data order needs no state of its own: it is a function of the step (see `SampleStream`).
"""

from __future__ import annotations

import math
import random
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from sdlab.atomic import atomic_write
from sdlab.errors import SdlabError
from sdlab.train import distributed
from sdlab.train.distributed import Dist

Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
EMA_WARMUP = 10.0  # decay_n = min(decay, (1 + n) / (EMA_WARMUP + n)), ldm's LitEma warm-up
LOSS_SMOOTHING = 0.98  # the progress bar's loss: exponential moving average, bias-corrected


@dataclass(frozen=True)
class LoopConfig:
    steps: int  # optimizer steps in the whole run
    batch: int  # micro-batch per process; samples per step = batch * accumulate * processes
    lr: float
    warmup: int = 0  # steps of linear warm-up from lr / warmup to lr
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warm-up; cosine decays to 0 at `steps`
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    accumulate: int = 1  # micro-batches per optimizer step
    clip: float | None = 1.0  # max global gradient norm; None: no clipping
    ema_decay: float | None = None  # None: no EMA weights
    precision: Precision = "bf16"  # autocast dtype; the weights stay fp32
    save_every: int = 0  # checkpoint every N steps (and always at the last step of a session)
    sample_every: int = 0  # the stage's `sample` every N steps (main process); 0: never
    stop_at: int | None = None  # end this session after step N (a checkpoint is written), as if interrupted
    seed: int = 0
    fsdp: bool = False  # with several processes: shard parameters, gradients and optimizer state (sharding.py)

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "accumulate"):
            if getattr(self, name) < 1:
                raise SdlabError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "save_every", "sample_every"):
            if getattr(self, name) < 0:
                raise SdlabError(f"{name} must not be negative, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SdlabError(f"learning rate must be a positive number, got {self.lr}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise SdlabError(f"EMA decay must be in (0, 1), got {self.ema_decay}")
        if self.clip is not None and self.clip <= 0:
            raise SdlabError(f"gradient clipping norm must be positive, got {self.clip}")


class Stage(Protocol):
    name: str
    module: nn.Module  # what is trained; its forward (through DDP) is what `loss` calls

    def batches(self, start: int) -> Iterator[Any]:
        """Micro-batches from the `start`-th on (this process's share of the data)."""

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> Tensor:
        """Scalar fp32 loss of one micro-batch; `model` is `module` or its DDP wrapper."""

    def sample(self, step: int, ema: EMA | None) -> None:
        """Write a progress image (called on the main process only)."""


# --- learning rate and EMA ---------------------------------------------------------------------------
@dataclass
class WarmupSchedule:
    """LambdaLR factor: linear warm-up over `warmup` steps, then constant or a cosine to 0 at `total`."""

    warmup: int
    total: int
    shape: str = "constant"

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.shape == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """fp32 exponential moving average of a module's parameters, with ldm's warm-up of the decay."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in module.named_parameters()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (EMA_WARMUP + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, p in module.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), weight)  # s += (1 - d) (p - s)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> nn.Module:
        """Write the averaged weights into `module` (a copy of the trained one) and return it."""
        for name, p in module.named_parameters():
            p.copy_(self.shadow[name])
        return module

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


# --- randomness --------------------------------------------------------------------------------------
def generator_seed(seed: int, stage: str, rank: int) -> int:
    """A distinct, reproducible seed for each (run seed, stage, rank)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(stage.encode()), rank]).generate_state(1)[0])


def rng_state(generator: torch.Generator) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# --- checkpoints -------------------------------------------------------------------------------------
@dataclass
class Trainer:
    """Everything a checkpoint holds for one stage."""

    stage: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    ema: EMA | None
    generator: torch.Generator
    step: int = 0
    sharded: bool = False  # the module is sharded (FSDP): its state is gathered to save and scattered to load

    def state(self, rngs: list[dict]) -> dict:
        """What a checkpoint holds; every rank calls it (a sharded module's tensors are gathered)."""
        if self.sharded:
            from sdlab.train import sharding

            module, optimizer = sharding.full_state(self.module, self.optimizer)
            ema = None if self.ema is None else {**self.ema.state_dict(), "shadow": sharding.gathered(self.ema.shadow)}
        else:
            module, optimizer = self.module.state_dict(), self.optimizer.state_dict()
            ema = None if self.ema is None else self.ema.state_dict()
        return {
            "stage": self.stage,
            "step": self.step,
            "module": module,
            "ema": ema,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
        }

    def load(self, state: dict, d: Dist, source: Path) -> None:
        if state["stage"] != self.stage:
            raise SdlabError(f"{source}: a {state['stage']} checkpoint, expected {self.stage}")
        if len(state["rng"]) != d.world:
            raise SdlabError(
                f"{source}: written by {len(state['rng'])} processes, resumed with {d.world}; an exact resume "
                f"needs the same number (torchrun --nproc_per_node {len(state['rng'])})"
            )
        if self.sharded:
            from sdlab.train import sharding

            sharding.load_full_state(self.module, self.optimizer, state["module"], state["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict({**state["ema"], "shadow": sharding.scattered(state["ema"]["shadow"], self.ema.shadow)})
        else:
            self.module.load_state_dict(state["module"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][d.rank], self.generator)
        self.step = state["step"]


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then one rename: never half a checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(trainer: Trainer, path: Path, d: Dist) -> None:
    rngs = distributed.gather_objects(d, rng_state(trainer.generator))
    state = trainer.state(rngs)  # on every rank: gathering shards is collective
    if d.main:
        atomic_torch_save(state, path)
    distributed.barrier(d)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — a damaged checkpoint becomes one line
        raise SdlabError(f"{path}: unreadable training checkpoint ({type(e).__name__}: {e}); delete it to start over") from None


# --- the loop ----------------------------------------------------------------------------------------
def autocast(device: torch.device, precision: Precision) -> AbstractContextManager:
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def make_trainer(stage: Stage, cfg: LoopConfig, d: Dist, device: torch.device) -> Trainer:
    module = stage.module.to(device)
    sharded = cfg.fsdp and d.active
    if sharded:  # before the optimizer and the EMA see the parameters: they hold the shards
        from sdlab.train import sharding

        sharding.shard(module)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = LambdaLR(optimizer, WarmupSchedule(cfg.warmup, cfg.steps, cfg.lr_schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    ema = EMA(module, cfg.ema_decay) if cfg.ema_decay else None
    generator = torch.Generator().manual_seed(generator_seed(cfg.seed, stage.name, d.rank))
    return Trainer(stage.name, module, optimizer, scheduler, scaler, ema, generator, sharded=sharded)


def train_step(
    t: Trainer, model: nn.Module, stage: Stage, batches: Iterator, cfg: LoopConfig, device: torch.device
) -> float:
    """One optimizer step over `accumulate` micro-batches; returns the mean micro-batch loss."""
    total = 0.0
    for k in range(cfg.accumulate):
        last = k == cfg.accumulate - 1
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()
        with sync:
            with autocast(device, cfg.precision):
                loss = stage.loss(model, next(batches), t.generator)
            t.scaler.scale(loss / cfg.accumulate).backward()
        total += loss.item() / cfg.accumulate
    if not math.isfinite(total) and not t.scaler.is_enabled():
        raise SdlabError(f"{stage.name}: the loss became {total} at step {t.step + 1}; lower the learning rate")
    t.scaler.unscale_(t.optimizer)
    if cfg.clip is not None:
        nn.utils.clip_grad_norm_([p for p in t.module.parameters() if p.grad is not None], cfg.clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()
    if t.ema is not None:
        t.ema.update(t.module)
    return total


@dataclass
class Smoothed:
    """Bias-corrected exponential moving average of the loss, for the progress bar."""

    value: float = 0.0
    count: int = 0

    def add(self, x: float) -> float:
        self.value = LOSS_SMOOTHING * self.value + (1 - LOSS_SMOOTHING) * x
        self.count += 1
        return self.value / (1 - LOSS_SMOOTHING**self.count)


@dataclass
class FitResult:
    trainer: Trainer
    steps: int  # the whole run's
    losses: list[float] = field(default_factory=list)  # this session's, one per step

    @property
    def finished(self) -> bool:
        return self.trainer.step >= self.steps


def fit(
    stage: Stage,
    cfg: LoopConfig,
    d: Dist,
    device: torch.device,
    checkpoint: Path,
    resume: bool,
    log: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train `stage` to `cfg.steps` (or `cfg.stop_at`), resuming from `checkpoint` when asked and present."""
    t = make_trainer(stage, cfg, d, device)
    if resume and checkpoint.exists():
        t.load(load_checkpoint(checkpoint), d, checkpoint)
    model = t.module
    if d.active and not t.sharded:
        model = DistributedDataParallel(t.module, device_ids=[device] if device.type == "cuda" else None)
    result = FitResult(t, cfg.steps)
    stop = min(cfg.steps, cfg.stop_at or cfg.steps)
    if t.step >= stop:
        return result
    batches = stage.batches(t.step * cfg.accumulate)
    bar = tqdm(total=cfg.steps, initial=t.step, desc=stage.name, unit="step", disable=not d.main, file=sys.stderr)
    smooth = Smoothed()
    model.train()
    while t.step < stop:
        lr = t.scheduler.get_last_lr()[0]  # the rate of this step
        loss = train_step(t, model, stage, batches, cfg, device)
        t.step += 1
        result.losses.append(loss)
        bar.set_postfix(loss=f"{smooth.add(loss):.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
        if log is not None and d.main:
            log({"stage": stage.name, "step": t.step, "loss": loss, "lr": lr})
        if cfg.sample_every and t.step % cfg.sample_every == 0 and d.main:
            with torch.random.fork_rng(devices=[]):
                stage.sample(t.step, t.ema)
        if t.step == stop or (cfg.save_every and t.step % cfg.save_every == 0):
            save_checkpoint(t, checkpoint, d)
    bar.close()
    model.eval()
    return result
