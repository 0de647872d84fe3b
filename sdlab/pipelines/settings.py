"""Generation settings: one frozen record, checked once, written into every image and read back to replay it."""

from __future__ import annotations

import inspect
import math
import os
import random
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal, get_args

from sdlab.config import ModelConfig
from sdlab.errors import SdlabError

SCHEDULES = ("default", "karras", "exponential")
MAX_SEED = 2**32 - 1  # A1111 seeds are unsigned 32-bit
MAX_TOKEN_MERGING = 0.75  # ToMe merges at most 3 of each 4 tokens: one destination per 2x2 cell
Fill = Literal["original", "noise", "nothing", "fill"]  # A1111 "masked content": 1, 2, 3, 0
FILLS: tuple[str, ...] = get_args(Fill)
Preprocess = Literal["none", "canny"]
PREPROCESSORS: tuple[str, ...] = get_args(Preprocess)


@dataclass(frozen=True)
class ControlSettings:
    """One ControlNet of a run; its hint image is an input, not a setting."""

    model: str  # path or repo id of the ControlNet
    strength: float = 1.0  # scale of its residuals
    start: float = 0.0  # active for steps whose fraction of the run lies in [start, end]
    end: float = 1.0
    preprocess: Preprocess = "none"  # what turns the control image into the hint
    guess_mode: bool = False  # residuals only on the conditional half, scaled down toward the input blocks

    def check(self, index: int) -> None:
        name = f"controlnet {index}"
        if not math.isfinite(self.strength):
            raise SdlabError(f"{name}: strength must be a finite number, got {self.strength}")
        if not 0 <= self.start < self.end <= 1:
            raise SdlabError(f"{name}: need 0 <= start < end <= 1, got start {self.start} and end {self.end}")
        if self.preprocess not in PREPROCESSORS:
            raise SdlabError(f"{name}: unknown preprocess {self.preprocess!r}; use one of {', '.join(PREPROCESSORS)}")


@dataclass(frozen=True)
class LoraSettings:
    """One LoRA file of a run (besides the `<lora:name:w>` tags of its prompt) and its weight."""

    path: str
    weight: float = 1.0

    def check(self) -> None:
        if not math.isfinite(self.weight):
            raise SdlabError(f"LoRA {self.path}: the weight must be a finite number, got {self.weight}")


@dataclass(frozen=True)
class Settings:
    """Everything that decides an image, besides the model. Names are the CLI's long options."""

    prompt: str
    negative: str = ""
    steps: int | None = None  # None: the model's default_steps (20 for the SD families)
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
    tiling: bool = False  # circular padding: the image wraps around without a seam
    vae_tiling: bool = False  # decode in overlapping windows: big images in little memory (models/vae_tiling.py)
    # approximate speed-ups, off by default: they change the image
    cfg_end: float = 1.0  # guidance for this fraction of the steps, then the conditional pass alone (CFG truncation)
    token_merging: float = 0.0  # fraction of full-resolution tokens merged before self-attention (ToMe for SD)
    control: tuple[ControlSettings, ...] = ()
    lora: tuple[LoraSettings, ...] = ()  # LoRA files applied to the text encoders and the U-Net
    # editing an image (img2img, inpaint, outpaint); strength None: text to image
    strength: float | None = None  # 0 keeps the image, 1 starts from pure noise
    mask_blur: int = 4  # pixels; softens the mask's edge where result and original meet
    fill: Fill = "original"  # what the masked area starts from
    only_masked: bool = False  # inpaint a crop around the mask at full size, paste it back
    padding: int = 32  # pixels of context around the mask in only-masked mode
    composite: bool = True  # keep the original's pixels outside the (blurred) mask exactly

    def resolved(self, cfg: ModelConfig) -> Settings:
        """Defaults filled in from the model, every value checked; a one-line SdlabError otherwise."""
        from sdlab.diffusion.samplers import SAMPLERS, resolve_sampler

        width = cfg.default_size if self.width is None else self.width
        height = cfg.default_size if self.height is None else self.height
        f = cfg.vae.downscale
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % f:
                raise SdlabError(f"{name} {value} must be a positive multiple of {f} (the VAE's downscale factor)")
        steps = cfg.default_steps if self.steps is None else self.steps
        if steps < 1:
            raise SdlabError(f"steps must be at least 1, got {steps}")
        if not math.isfinite(self.guidance):
            raise SdlabError(f"guidance must be a finite number, got {self.guidance}")
        if not math.isfinite(self.guidance_rescale) or not 0 <= self.guidance_rescale <= 1:
            raise SdlabError(f"guidance rescale must be in [0, 1], got {self.guidance_rescale}")
        if not (math.isfinite(self.cfg_end) and 0 <= self.cfg_end <= 1):
            raise SdlabError(f"cfg end must be in [0, 1] (the fraction of steps with guidance), got {self.cfg_end}")
        if not (math.isfinite(self.token_merging) and 0 <= self.token_merging <= MAX_TOKEN_MERGING):
            raise SdlabError(f"token merging must be in [0, {MAX_TOKEN_MERGING}], got {self.token_merging}")
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
        self._check_editing()
        for i, unit in enumerate(self.control):
            unit.check(i)
        for one in self.lora:
            one.check()
        seed = random.randint(0, MAX_SEED) if self.seed is None or self.seed < 0 else self.seed
        if seed > MAX_SEED:
            raise SdlabError(f"seed must be at most {MAX_SEED}, got {seed}")
        return replace(
            self, width=width, height=height, seed=seed, steps=steps, sampler=sampler, schedule=schedule
        )

    def sized_for(self, size: tuple[int, int], multiple: int) -> Settings:
        """An edit's settings: a width or height not given is the image's (W, H) `size`, rounded down to `multiple`."""
        sides = {}
        for name, value in (("width", size[0]), ("height", size[1])):
            if getattr(self, name) is None:
                if value < multiple:
                    raise SdlabError(f"the image is {size[0]}x{size[1]}; it needs at least {multiple} pixels a side")
                sides[name] = value - value % multiple
        return replace(self, **sides)

    def _check_editing(self) -> None:
        if self.strength is not None and not (math.isfinite(self.strength) and 0 <= self.strength <= 1):
            raise SdlabError(f"strength must be in [0, 1], got {self.strength}")
        if self.mask_blur < 0 or self.padding < 0:
            raise SdlabError(f"mask blur and padding must be >= 0 pixels, got {self.mask_blur} and {self.padding}")
        if self.fill not in FILLS:
            raise SdlabError(f"unknown fill {self.fill!r}; use one of {', '.join(FILLS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Settings:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["control"] = tuple(
            c if isinstance(c, ControlSettings) else ControlSettings(**c) for c in values.get("control", ())
        )
        values["lora"] = tuple(as_lora(x) for x in values.get("lora", ()))
        return cls(**values)


def as_lora(x: LoraSettings | dict | str | tuple) -> LoraSettings:
    """A LoRA as the API takes it: a path, (path, weight), {"path": …, "weight": …} or LoraSettings."""
    if isinstance(x, LoraSettings):
        return x
    if isinstance(x, dict):
        return LoraSettings(**x)
    if isinstance(x, (str, os.PathLike)):
        return LoraSettings(str(x))
    if isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[1], (int, float)):
        return LoraSettings(str(x[0]), float(x[1]))
    raise SdlabError(f"a LoRA is a path or (path, weight), got {x!r}")
