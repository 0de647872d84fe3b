"""Generation settings: one frozen record, checked once, written into every image and read back to replay it."""

from __future__ import annotations

import inspect
import math
import random
from dataclasses import asdict, dataclass, fields, replace

from sdlab.config import ModelConfig
from sdlab.errors import SdlabError

SCHEDULES = ("default", "karras", "exponential")
MAX_SEED = 2**32 - 1  # A1111 seeds are unsigned 32-bit


@dataclass(frozen=True)
class Settings:
    """Everything that decides an image, besides the model. Names are the CLI's long options."""

    prompt: str
    negative: str = ""
    steps: int = 20
    guidance: float = 7.0
    sampler: str = "dpmpp_2m"
    schedule: str = "karras"
    width: int | None = None  # None: the model's default size
    height: int | None = None
    seed: int | None = None  # None: random, then recorded
    batch: int = 1
    clip_skip: int = 1
    guidance_rescale: float = 0.0
    eta: float | None = None  # DDIM / ancestral noise amount; None: the sampler's default
    refiner_switch: float = 0.8  # with a refiner: the fraction of the schedule the base model denoises

    def resolved(self, cfg: ModelConfig) -> Settings:
        """Defaults filled in from the model, every value checked; a one-line SdlabError otherwise."""
        from sdlab.diffusion.samplers import SAMPLERS, resolve_sampler

        width = cfg.default_size if self.width is None else self.width
        height = cfg.default_size if self.height is None else self.height
        f = cfg.vae.downscale
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % f:
                raise SdlabError(f"{name} {value} must be a positive multiple of {f} (the VAE's downscale factor)")
        if self.steps < 1:
            raise SdlabError(f"steps must be at least 1, got {self.steps}")
        if not math.isfinite(self.guidance):
            raise SdlabError(f"guidance must be a finite number, got {self.guidance}")
        if not math.isfinite(self.guidance_rescale) or not 0 <= self.guidance_rescale <= 1:
            raise SdlabError(f"guidance rescale must be in [0, 1], got {self.guidance_rescale}")
        if not 0 < self.refiner_switch <= 1:
            raise SdlabError(f"refiner switch must be in (0, 1], got {self.refiner_switch}")
        if self.batch < 1:
            raise SdlabError(f"batch must be at least 1, got {self.batch}")
        if self.clip_skip < 1:
            raise SdlabError(f"clip skip must be at least 1, got {self.clip_skip}")
        max_skip = min(t.encoder.num_layers for t in cfg.text)
        if self.clip_skip >= max_skip:
            raise SdlabError(f"clip skip {self.clip_skip} leaves no layer of a {max_skip}-layer text encoder")
        if self.schedule not in SCHEDULES:
            raise SdlabError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        sampler, named_schedule = resolve_sampler(self.sampler)  # "DPM++ 2M Karras" names its schedule
        schedule = self.schedule if named_schedule == "default" else named_schedule
        if self.eta is not None and "eta" not in inspect.signature(SAMPLERS[sampler].fn).parameters:
            raise SdlabError(f"the {sampler} sampler takes no eta")
        seed = random.randint(0, MAX_SEED) if self.seed is None or self.seed < 0 else self.seed
        if seed > MAX_SEED:
            raise SdlabError(f"seed must be at most {MAX_SEED}, got {seed}")
        return replace(
            self, width=width, height=height, seed=seed, sampler=sampler, schedule=schedule
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Settings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
