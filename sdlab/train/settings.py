"""The settings of a training run: plain data (no torch), so the command line can show its defaults cheaply."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import TypeVar
from pathlib import Path

from sdlab.errors import SdlabError


CHOICES = {
    "precision": ("bf16", "fp16", "fp32"),
    "lr_schedule": ("cosine", "constant"),
    "dtype": ("fp32", "fp16", "bf16"),
    "prediction_type": (None, "epsilon", "v_prediction"),
}


@dataclass(frozen=True)
class TrainSettings:
    """Everything a run depends on; `SESSION_FIELDS` may change when it is resumed."""

    out: str
    preset: str = "shapes-64"
    data: tuple[str, ...] = ("shapes",)  # 'shapes', one folder, or .tar shards / globs
    limit: int | None = None  # first N samples (the shapes dataset's length; default 20,000)
    size: int | None = None  # pixels; default: the preset's
    prediction_type: str | None = None  # default: the preset's
    vae: str | None = None  # a trained VAE, or a model whose VAE to use: no stage 1
    seed: int = 0
    precision: str = "bf16"  # autocast dtype: bf16 (CPU, CUDA), fp16 (CUDA), fp32
    # stage 1: the VAE
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 5e-4
    kl_weight: float = 1e-6
    # stage 2: U-Net + text encoder
    steps: int = 6000
    batch: int = 32  # per process; samples per step = batch * accumulate * processes
    lr: float = 3e-4
    warmup: int = 300  # steps of linear warm-up (stage 1: at most a tenth of its steps)
    lr_schedule: str = "cosine"
    weight_decay: float = 0.01
    accumulate: int = 1
    clip: float = 1.0
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    min_snr_gamma: float | None = None  # weight the stage-2 loss by min(SNR, γ) (None: plain MSE)
    min_snr_floor: float = 0.0  # ... but never by less than this (the noisiest timesteps)
    # this session only
    save_every: int = 500
    sample_every: int = 1000
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    sample_guidance: float = 5.0
    stop_at: int | None = None  # stop after this stage-2 step (checkpointed), as if interrupted
    workers: int = 0  # DataLoader worker processes for reading images
    threads: int | None = None  # torch CPU threads (default: all cores, shared among local ranks)
    device: str = "auto"
    dtype: str = "fp32"  # storage dtype of model.safetensors: fp32, fp16, bf16

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise SdlabError(f"{name} must be one of {', '.join(map(str, allowed))}, got {getattr(self, name)!r}")
        if not 0 <= self.cfg_dropout <= 1:
            raise SdlabError(f"caption dropout must be in [0, 1], got {self.cfg_dropout}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise SdlabError(f"min-SNR gamma must be positive, got {self.min_snr_gamma}")
        if not 0 <= self.min_snr_floor <= 1:
            raise SdlabError(f"min-SNR floor must be in [0, 1], got {self.min_snr_floor}")
        if self.min_snr_floor and self.min_snr_gamma is None:
            raise SdlabError("a min-SNR floor needs --min-snr-gamma")
        if self.kl_weight < 0:
            raise SdlabError(f"KL weight must not be negative, got {self.kl_weight}")
        if self.stop_at is not None and self.stop_at < 1:
            raise SdlabError(f"stop-at must be at least 1, got {self.stop_at}")
        if not self.data:
            raise SdlabError("data is required: 'shapes', a folder of images with .txt captions, or .tar shards")


SESSION_FIELDS = frozenset(
    {"out", "save_every", "sample_every", "sample_prompts", "sample_steps", "sample_guidance", "stop_at",
     "workers", "threads", "device", "dtype"}
)


S = TypeVar("S")


def read_settings(path: Path, cls: type[S] = TrainSettings) -> S:  # type: ignore[assignment]
    """A run's stored settings (train.json, finetune.json) as `cls`; lists become tuples, unknown keys are dropped."""
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**data)
    except (OSError, ValueError, TypeError) as e:
        raise SdlabError(f"{path}: unreadable run settings ({e})") from None


def check_kept(stored: Path, now, session_fields: frozenset[str]) -> None:
    """A resumed run keeps the settings stored at `stored`, except `session_fields`; one line otherwise."""
    before, after = asdict(read_settings(stored, type(now))), asdict(now)
    changed = [k for k in before if k not in session_fields and before[k] != after[k]]
    if changed:
        detail = ", ".join(f"{k}: {before[k]!r} -> {after[k]!r}" for k in changed[:4])
        raise SdlabError(f"a resumed run keeps its settings, but these differ: {detail}; start a new --out to change them")
