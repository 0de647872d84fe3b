"""Noise schedules: the discrete training schedule, inference timesteps and the sigmas a sampler walks.

Coordinates are k-diffusion's (Karras et al. 2022): x = x0 + σ·ε with σ_t = sqrt((1 - ᾱ_t) / ᾱ_t);
the VP latent a U-Net sees is x / sqrt(1 + σ²).

The arithmetic follows diffusers' schedulers on purpose, so a sampler here walks the same sigmas:
ᾱ in float32 (torch), interpolation and Karras/exponential formulas in float64 (numpy),
results rounded to float32. Three timestep layouts exist there, named here by `TimestepRule`:

    "k-diffusion"  Euler, Euler a, Heun, LMS, KDPM2(a), DPM-SDE: linspace is left fractional
    "ddim"         DDIM, DDPM, PNDM: linspace is rounded to integers
    "dpm-solver"   DPM-Solver(++) multistep, UniPC: steps+1 grid points, t = 0 dropped
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor

from sdlab.config import ScheduleConfig
from sdlab.errors import SdlabError

TimestepRule = Literal["k-diffusion", "ddim", "dpm-solver"]
SigmaScheduleName = Literal["default", "karras", "exponential"]
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5


def betas(cfg: ScheduleConfig) -> Tensor:
    """β_1..β_T (float32): `linear` in β, or `scaled_linear` (linear in sqrt β, the ldm schedule)."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    if cfg.beta_schedule == "scaled_linear":
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float32) ** 2
    raise SdlabError(f"unknown beta_schedule {cfg.beta_schedule!r}; expected 'scaled_linear' or 'linear'")


def alphas_cumprod(cfg: ScheduleConfig) -> Tensor:
    """ᾱ_t = Π_{s<=t} (1 - β_s), float32, shape (T,)."""
    return torch.cumprod(1.0 - betas(cfg), dim=0)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The discrete training schedule: ᾱ_t and σ_t for t = 0..T-1 (σ increases with t)."""

    config: ScheduleConfig
    alphas_cumprod: Tensor  # (T,) float32
    sigmas: Tensor  # (T,) float32, sqrt((1 - ᾱ) / ᾱ)

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> NoiseSchedule:
        ac = alphas_cumprod(cfg)
        return cls(cfg, ac, ((1 - ac) / ac) ** 0.5)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """σ at fractional timesteps: linear interpolation in σ (diffusers' `np.interp`), float64."""
        grid = np.arange(len(self.sigmas))
        sigma = np.interp(_numpy(t), grid, self.sigmas.numpy())
        return torch.from_numpy(sigma).to(t.device)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep of σ: linear interpolation in log σ, clamped to [0, T-1], float64."""
        log_sigmas = np.log(self.sigmas.numpy())  # float32, as diffusers computes it
        log_sigma = np.log(np.maximum(_numpy(sigma), 1e-10))
        low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
        w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0.0, 1.0)
        return torch.from_numpy(low + w).to(sigma.device)


def _numpy(x: Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def inference_timesteps(cfg: ScheduleConfig, steps: int, rule: TimestepRule = "k-diffusion") -> Tensor:
    """The `steps` timesteps, highest first, that diffusers' schedulers of `rule` choose (float64)."""
    if steps < 1:
        raise SdlabError(f"steps must be at least 1, got {steps}")
    T = cfg.num_train_timesteps
    grid = steps + 1 if rule == "dpm-solver" else steps  # DPM-Solver/UniPC lay out one more point, then drop t=0
    if cfg.timestep_spacing == "linspace":
        t = np.linspace(0, T - 1, grid)
        t = t.astype(np.float32).astype(np.float64) if rule == "k-diffusion" else t.round()
    elif cfg.timestep_spacing == "leading":
        t = np.arange(grid) * (T // grid) + 0.0
    elif cfg.timestep_spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / steps))[::-1] - 1  # the same for every rule; ascending like the others
    else:
        raise SdlabError(f"unknown timestep_spacing {cfg.timestep_spacing!r}; expected leading, trailing or linspace")
    if rule == "dpm-solver" and cfg.timestep_spacing != "trailing":
        t = t[1:]
    if cfg.timestep_spacing == "leading":
        t = t + cfg.steps_offset
    return torch.from_numpy(t[::-1].copy())


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> Tensor:
    """n sigmas from sigma_max to sigma_min, evenly spaced in σ^(1/ρ) (Karras et al. 2022, eq. 5), float64."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.from_numpy((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n sigmas from sigma_max to sigma_min, evenly spaced in log σ, float64."""
    return torch.from_numpy(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)))


def timestep_lookup(sigmas: Tensor, timesteps: Tensor, schedule: NoiseSchedule) -> Callable[[float], float]:
    """σ -> network timestep: the given t for σ within float32 rounding of a given σ, else `schedule.sigma_to_t`."""
    table_sigmas, table_t = _numpy(sigmas), timesteps.tolist()

    def timestep(sigma: float) -> float:
        k = int(np.argmin(np.abs(table_sigmas - sigma)))
        if abs(table_sigmas[k] - sigma) <= 1e-6 * table_sigmas[k]:
            return table_t[k]
        return float(schedule.sigma_to_t(torch.tensor([sigma], dtype=torch.float64)))

    return timestep
