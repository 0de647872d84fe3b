"""The network as samplers see it: a denoiser D(x, σ) -> x̂0, and classifier-free guidance.

A raw network (`ModelFn`) maps a VP input and a timestep to ε or v. Samplers work in k-diffusion
coordinates (x = x0 + σ·ε) and only ever call D(x, σ) = c_skip·x + c_out·net(c_in·x, t(σ))
(Karras et al. 2022, table 1; sgm's `EpsScaling` / `VScaling`).

Guidance acts on the raw output, before the wrapper, exactly where diffusers applies it:
the pipeline hands `guided` one batched function over [uncond, cond] and keeps the conditioning.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from sdlab.config import PredictionType
from sdlab.errors import SdlabError

ModelFn = Callable[[Tensor, Tensor], Tensor]  # net(x_in (B, C, H, W), t (B,)) -> ε or v, shaped like x_in
Denoiser = Callable[[Tensor, float], Tensor]  # D(x (B, C, H, W), σ) -> x̂0
TimestepFn = Callable[[float], float]  # σ -> the timestep the network is trained on
Scalings = tuple[float, float, float]  # c_skip, c_out, c_in


def eps_scalings(sigma: float) -> Scalings:
    """ε-prediction: x̂0 = x - σ·ε̂, the network sees x / sqrt(σ² + 1)."""
    return 1.0, -sigma, 1.0 / math.sqrt(sigma**2 + 1.0)


def v_scalings(sigma: float) -> Scalings:
    """v-prediction (Salimans & Ho 2022): x̂0 = x / (σ² + 1) - σ·v̂ / sqrt(σ² + 1)."""
    c_in = 1.0 / math.sqrt(sigma**2 + 1.0)
    return c_in**2, -sigma * c_in, c_in


SCALINGS: dict[str, Callable[[float], Scalings]] = {"epsilon": eps_scalings, "v_prediction": v_scalings}


def denoiser(net: ModelFn, prediction_type: PredictionType, timestep: TimestepFn) -> Denoiser:
    """Wrap an ε- or v-predicting network as D(x, σ); `timestep` maps σ to the network's t."""
    if prediction_type not in SCALINGS:
        raise SdlabError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(SCALINGS)}")
    scalings = SCALINGS[prediction_type]

    def D(x: Tensor, sigma: float) -> Tensor:
        c_skip, c_out, c_in = scalings(sigma)
        t = torch.full((x.shape[0],), timestep(sigma), dtype=torch.float32, device=x.device)  # (B,)
        return c_skip * x + c_out * net(c_in * x, t)

    return D


def rescale_guidance(guided: Tensor, cond: Tensor, rescale: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", §3.4):
    give the guided output the per-sample std of the conditional one, blended by `rescale`."""
    dims = list(range(1, cond.ndim))
    matched = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * matched + (1 - rescale) * guided


def cfg_combine(uncond: Tensor, cond: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale·(cond - uncond), optionally rescaled."""
    out = uncond + scale * (cond - uncond)
    return rescale_guidance(out, cond, rescale) if rescale > 0 else out


def guided(net: ModelFn, scale: float, rescale: float = 0.0) -> ModelFn:
    """A ModelFn over B samples that runs `net` once on 2B: [uncond, cond], diffusers' order.

    `net(x_in (2B, ...), t (2B,))` must pair the first B with the negative conditioning and the last
    B with the positive one. diffusers skips guidance when scale <= 1; a pipeline that wants the same
    passes its conditional-only network instead of this one.
    """

    def model(x_in: Tensor, t: Tensor) -> Tensor:
        out = net(torch.cat([x_in, x_in]), torch.cat([t, t]))  # (2B, C, H, W)
        uncond, cond = out.chunk(2)
        return cfg_combine(uncond, cond, scale, rescale)

    return model
