"""Samplers: one function per algorithm, one signature, and the registry that prepares them as diffusers does.

Every sampler is `sample_x(model, x, sigmas, *, noise=None, callback=None, **options) -> x`, where
`model` is a denoiser D(x, σ) -> x̂0 (see denoiser.py), `x` the start in k-diffusion coordinates
(x = x0 + σ·ε), `sigmas` the (n+1,) noise levels to walk, highest first, and `noise(σ, σ_next)`
draws the standard normal noise of stochastic steps. Samplers never see how the network is
parameterised, never write into the caller's tensors, and compute their step coefficients in float64.

Which diffusers scheduler each one reproduces (tests/diffusion/test_samplers.py checks it, SD config
`scaled_linear` 0.00085-0.012, `steps_offset=1`, `set_alpha_to_one=False`, `skip_prk_steps=True`, `clip_sample=False`):

    key           A1111 name    algorithm                       diffusers twin (beyond the model's config)
    ddim          DDIM          DDIM, eta option                DDIMScheduler, step(eta=eta)
    ddpm          DDPM          DDPM ancestral                  DDPMScheduler (variance_type="fixed_small")
    plms          PLMS          PNDM's pseudo linear multistep  PNDMScheduler(skip_prk_steps=True)
    lms           LMS           linear multistep, order 4       LMSDiscreteScheduler
    euler         Euler         Euler                           EulerDiscreteScheduler
    euler_a       Euler a       Euler ancestral                 EulerAncestralDiscreteScheduler
    heun          Heun          Heun (2nd order)                HeunDiscreteScheduler
    dpm2          DPM2          DPM-Solver-2 (midpoint)         KDPM2DiscreteScheduler
    dpm2_a        DPM2 a        DPM-Solver-2 ancestral          KDPM2AncestralDiscreteScheduler
    dpmpp_2m      DPM++ 2M      DPM-Solver++(2M)                DPMSolverMultistepScheduler(solver_order=2,
                                                                    algorithm_type="dpmsolver++")
    dpmpp_2m_sde  DPM++ 2M SDE  SDE-DPM-Solver++(2M)            DPMSolverMultistepScheduler(solver_order=2,
                                                                    algorithm_type="sde-dpmsolver++")
    dpmpp_sde     DPM++ SDE     DPM-Solver++ SDE, r = 1/2       DPMSolverSDEScheduler (Brownian-tree noise,
                                                                    needs torchsde; not compared)
    dpmpp_2s_a    DPM++ 2S a    DPM-Solver++(2S) ancestral      none (DPMSolverSinglestep is not ancestral)
    unipc         UniPC         UniPC, B(h) = e^h - 1           UniPCMultistepScheduler(solver_order=2,
                                                                    solver_type="bh2")

A " Karras" suffix is diffusers' `use_karras_sigmas=True`, " Exponential" its `use_exponential_sigmas=True`.
diffusers supports neither for DDIM, DDPM, PNDM or Euler a; here they work there too, ending at σ = 0.

How a pipeline runs one (`prepare` returns a `Plan`):

    plan = prepare("DPM++ 2M Karras", model_cfg.schedule, steps)
    x = plan.init_scale * randn(shape, generator=g)            # diffusers' latents * init_noise_sigma, as x = x0 + σ·ε
    D = plan.denoiser(guided(net, cfg_scale), model_cfg.prediction_type)   # net(x_in (2B,...), t (2B,))
    x = plan.sample(D, x, noise=plan.noise_sampler(x, g))
    latents = plan.to_vp(x)                                     # x / sqrt(1 + σ_last²); then the VAE

Differences from diffusers left on purpose, where diffusers is inconsistent:
- DDIM and PNDM always step to t - T//steps, which with `linspace` (and `trailing` when steps does not
  divide T) is not the next timestep they evaluate; here every step ends at the next sigma of the plan.
- KDPM2 ancestral with Karras sigmas: its midpoint σ equals the next σ, which diffusers evaluates once at
  the unrounded and once at the rounded timestep; here one σ always gets one timestep (the rounded one).

PNDM with v-prediction combines raw v outputs of different steps and converts the mix to ε at the
current step; `sample_plms(mix="v_prediction")` does the same (the pipelines pass the model's
prediction type), while the default `mix="epsilon"` combines each step's own ε̂ as Stability's PLMS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor

from sdlab.config import PredictionType, ScheduleConfig
from sdlab.diffusion.denoiser import Denoiser, ModelFn, denoiser
from sdlab.diffusion.schedules import (
    NoiseSchedule,
    SigmaScheduleName,
    TimestepRule,
    exponential_sigmas,
    inference_timesteps,
    karras_sigmas,
    timestep_lookup,
)
from sdlab.errors import SdlabError

NoiseSampler = Callable[[float, float], Tensor]  # noise(σ, σ_next) -> N(0, I) shaped like x


@dataclass(frozen=True)
class Step:
    """What a callback sees after each step: the new x (at sigma_next) and the x̂0 it came from."""

    i: int
    x: Tensor
    denoised: Tensor
    sigma: float
    sigma_next: float


Callback = Callable[[Step], None]


def gaussian_noise(x: Tensor, generator: torch.Generator | None = None) -> NoiseSampler:
    """Draws randn(x.shape) in float32 on the generator's device, then moves it to x (diffusers' `randn_tensor`)."""
    device = generator.device if generator is not None else x.device

    def noise(sigma: float, sigma_next: float) -> Tensor:
        z = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
        return z.to(device=x.device, dtype=x.dtype)

    return noise


def brownian_noise(x: Tensor, generator: torch.Generator | None = None) -> NoiseSampler:
    """Normalised increments (W(σ_next) - W(σ)) / sqrt|σ_next - σ| of one Brownian motion W(σ), drawn lazily
    (new points beyond the known ones by a free increment, between them by a Brownian bridge), so calls that
    share an end get correlated noise, as with k-diffusion's Brownian tree (whose values these are not)."""
    draw = gaussian_noise(x, generator)
    path: dict[float, Tensor] = {}

    def at(s: float) -> Tensor:
        if s not in path:
            below = [k for k in path if k < s]
            above = [k for k in path if k > s]
            if not path:
                w = torch.zeros_like(x)
            elif not below or not above:
                nearest = max(below) if below else min(above)
                w = path[nearest] + math.sqrt(abs(s - nearest)) * draw(s, nearest)
            else:
                lo, hi = max(below), min(above)
                frac = (s - lo) / (hi - lo)
                mean = path[lo] + frac * (path[hi] - path[lo])
                w = mean + math.sqrt(frac * (hi - s)) * draw(lo, hi)
            path[s] = w
        return path[s]

    def noise(sigma: float, sigma_next: float) -> Tensor:
        w_sigma = at(sigma)
        return (at(sigma_next) - w_sigma) / math.sqrt(abs(sigma - sigma_next))

    return noise


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split σ -> σ_next into a deterministic step to σ_down and fresh noise of std σ_up (σ_down² + σ_up² = σ_next²)."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def _to_d(x: Tensor, denoised: Tensor, sigma: float) -> Tensor:
    """dx/dσ of the probability-flow ODE: (x - x̂0) / σ, which is also ε̂."""
    return (x - denoised) / sigma


def _toward(denoised: Tensor, x: Tensor, sigma: float, sigma_to: float) -> Tensor:
    """First-order DPM-Solver++ (= DDIM) from σ to σ_to: x̂0 + (σ_to / σ)·(x - x̂0)."""
    return denoised + (sigma_to / sigma) * (x - denoised)


def _report(callback: Callback | None, i: int, x: Tensor, denoised: Tensor, s: list[float]) -> None:
    if callback is not None:
        callback(Step(i, x, denoised, s[i], s[i + 1]))


def _need(noise: NoiseSampler | None, x: Tensor) -> NoiseSampler:
    return noise if noise is not None else gaussian_noise(x)


# --- one-step samplers: a deterministic step to σ_down, then fresh noise of std σ_up -----------------
StepFn = Callable[[Denoiser, Tensor, Tensor, float, float], Tensor]  # (D, x, x̂0 at σ, σ, σ_to) -> x at σ_to


def _step_and_renoise(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    step: StepFn,
    eta: float,
    noise: NoiseSampler | None,
    callback: Callback | None,
) -> Tensor:
    """The loop of every one-step sampler; eta = 0 leaves it deterministic, eta = 1 is fully ancestral."""
    s = sigmas.tolist()
    noise = _need(noise, x)
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        x = step(model, x, denoised, s[i], sigma_down)
        if sigma_up > 0:
            x = x + noise(s[i], s[i + 1]) * sigma_up
        _report(callback, i, x, denoised, s)
    return x


def _ddim_step(model: Denoiser, x: Tensor, denoised: Tensor, sigma: float, sigma_to: float) -> Tensor:
    """Keep x̂0, shrink the noise part to σ_to."""
    return _toward(denoised, x, sigma, sigma_to)


def _euler_step(model: Denoiser, x: Tensor, denoised: Tensor, sigma: float, sigma_to: float) -> Tensor:
    return x + _to_d(x, denoised, sigma) * (sigma_to - sigma)


def _heun_step(model: Denoiser, x: Tensor, denoised: Tensor, sigma: float, sigma_to: float) -> Tensor:
    """Trapezoidal rule: the mean of the slopes at both ends; Euler when σ_to = 0."""
    d = _to_d(x, denoised, sigma)
    x_euler = x + d * (sigma_to - sigma)
    if sigma_to == 0:
        return x_euler
    d_to = _to_d(x_euler, model(x_euler, sigma_to), sigma_to)
    return x + (d + d_to) / 2 * (sigma_to - sigma)


def _dpm2_step(model: Denoiser, x: Tensor, denoised: Tensor, sigma: float, sigma_to: float) -> Tensor:
    """DPM-Solver-2: the slope at the log-midpoint sqrt(σ·σ_to), over the whole step; Euler when σ_to = 0."""
    if sigma_to == 0:
        return _euler_step(model, x, denoised, sigma, sigma_to)
    sigma_mid = math.exp((math.log(sigma) + math.log(sigma_to)) / 2)
    x_mid = _euler_step(model, x, denoised, sigma, sigma_mid)
    return x + _to_d(x_mid, model(x_mid, sigma_mid), sigma_mid) * (sigma_to - sigma)


def _dpmpp_2s_step(model: Denoiser, x: Tensor, denoised: Tensor, sigma: float, sigma_to: float) -> Tensor:
    """DPM-Solver++(2S): a first-order step to the log-midpoint, then the whole step with x̂0 from there."""
    if sigma_to == 0:
        return denoised
    sigma_mid = math.sqrt(sigma * sigma_to)
    denoised_mid = model(_toward(denoised, x, sigma, sigma_mid), sigma_mid)
    return _toward(denoised_mid, x, sigma, sigma_to)


def sample_ddim(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"); eta = 0 deterministic, eta = 1 is DDPM."""
    return _step_and_renoise(model, x, sigmas, _ddim_step, eta, noise, callback)


def sample_ddpm(
    model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: NoiseSampler | None = None, callback: Callback | None = None
) -> Tensor:
    """DDPM ancestral sampling from q(x_prev | x, x̂0) (Ho et al. 2020, "Denoising Diffusion Probabilistic Models")."""
    return _step_and_renoise(model, x, sigmas, _ddim_step, 1.0, noise, callback)


def sample_euler(
    model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: NoiseSampler | None = None, callback: Callback | None = None
) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, "Elucidating the Design Space...", no churn)."""
    return _step_and_renoise(model, x, sigmas, _euler_step, 0.0, noise, callback)


def sample_euler_a(
    model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: NoiseSampler | None = None, callback: Callback | None = None
) -> Tensor:
    """Euler ancestral: Euler to σ_down, then fresh noise of std σ_up (k-diffusion's `sample_euler_ancestral`)."""
    return _step_and_renoise(model, x, sigmas, _euler_step, 1.0, noise, callback)


def sample_heun(
    model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: NoiseSampler | None = None, callback: Callback | None = None
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 1); Euler on the last step to σ = 0."""
    return _step_and_renoise(model, x, sigmas, _heun_step, 0.0, noise, callback)


def sample_dpm2(
    model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: NoiseSampler | None = None, callback: Callback | None = None
) -> Tensor:
    """DPM-Solver-2 in σ (Lu et al. 2022, "DPM-Solver", as k-diffusion's `sample_dpm_2`); Euler to σ = 0."""
    return _step_and_renoise(model, x, sigmas, _dpm2_step, 0.0, noise, callback)


def sample_dpm2_a(
    model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: NoiseSampler | None = None, callback: Callback | None = None
) -> Tensor:
    """Ancestral DPM-Solver-2 (k-diffusion's `sample_dpm_2_ancestral`): DPM2 to σ_down, then noise of std σ_up."""
    return _step_and_renoise(model, x, sigmas, _dpm2_step, 1.0, noise, callback)


def sample_dpmpp_2s_a(
    model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: NoiseSampler | None = None, callback: Callback | None = None
) -> Tensor:
    """Ancestral DPM-Solver++(2S) (Lu et al. 2022, "DPM-Solver++"; k-diffusion's `sample_dpmpp_2s_ancestral`)."""
    return _step_and_renoise(model, x, sigmas, _dpmpp_2s_step, 1.0, noise, callback)


# --- multistep samplers --------------------------------------------------------------------------
_ADAMS_BASHFORTH = {  # coefficients of the newest, next newest, ... ε̂
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _v_from_denoised(x: Tensor, denoised: Tensor, sigma: float) -> Tensor:
    """The v a v-network gives for this x̂0 at σ: v = (x / (1 + σ²) - x̂0) · sqrt(1 + σ²) / σ."""
    return (x / (1 + sigma**2) - denoised) * (math.sqrt(1 + sigma**2) / sigma)


def _eps_from_v(v: Tensor, x: Tensor, sigma: float) -> Tensor:
    """ε = sqrt(ᾱ)·v + sqrt(1 - ᾱ)·x_vp, written in σ coordinates."""
    return v / math.sqrt(1 + sigma**2) + x * (sigma / (1 + sigma**2))


def sample_plms(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
    mix: PredictionType = "epsilon",
) -> Tensor:
    """PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"): Adams-Bashforth on ε̂,
    started with one pseudo-improved-Euler step; n + 1 network calls.

    `mix` is the network output the multistep history combines: "epsilon" (Stability's PLMS) or
    "v_prediction" (diffusers' PNDM on a v model: the raw v of earlier steps are combined, then
    turned into ε with the current step's x and σ)."""
    s = sigmas.tolist()
    as_output = (lambda x_, d, sig: _to_d(x_, d, sig)) if mix == "epsilon" else _v_from_denoised
    to_eps = (lambda out, x_, sig: out) if mix == "epsilon" else _eps_from_v
    history: list[Tensor] = []  # network outputs at the accepted points, newest last
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        history = (history + [as_output(x, denoised, s[i])])[-4:]
        dt = s[i + 1] - s[i]
        if i == 0 and len(s) > 2:
            x_pred = x + dt * _to_d(x, denoised, s[i])
            mixed = (history[-1] + as_output(x_pred, model(x_pred, s[1]), s[1])) / 2
        else:
            coeffs = _ADAMS_BASHFORTH[len(history)]
            mixed = sum(c * e for c, e in zip(coeffs, reversed(history)))
        x = x + dt * to_eps(mixed, x, s[i])
        _report(callback, i, x, denoised, s)
    return x


def _lms_coefficient(s: list[float], i: int, order: int, j: int) -> float:
    """∫ from σ_i to σ_{i+1} of the Lagrange basis polynomial that is 1 at σ_{i-j}, 0 at the other σ_{i-k}."""
    others = [s[i - k] for k in range(order) if k != j]
    roots = np.polynomial.Polynomial.fromroots(others) if others else np.polynomial.Polynomial([1.0])
    basis = roots / math.prod(s[i - j] - o for o in others)
    integral = basis.integ()
    return float(integral(s[i + 1]) - integral(s[i]))


def sample_lms(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep in σ over the last `order` derivatives (k-diffusion's `sample_lms`; Karras et al. 2022)."""
    s = sigmas.tolist()
    ds: list[Tensor] = []  # newest last
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        ds = (ds + [_to_d(x, denoised, s[i])])[-order:]
        k = len(ds)
        x = x + sum(_lms_coefficient(s, i, k, j) * d for j, d in enumerate(reversed(ds)))
        _report(callback, i, x, denoised, s)
    return x


def sample_dpmpp_2m(
    model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: NoiseSampler | None = None, callback: Callback | None = None
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Models")."""
    s = sigmas.tolist()
    old_denoised, h_last = None, 0.0
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])  # λ_next - λ with λ = -log σ
            d = denoised if old_denoised is None else denoised + (denoised - old_denoised) * (h / h_last / 2)
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, denoised, s)
    return x


def sample_dpmpp_2m_sde(
    model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: NoiseSampler | None = None, callback: Callback | None = None
) -> Tensor:
    """SDE-DPM-Solver++(2M), midpoint form (Lu et al. 2022, "DPM-Solver++", §5), one noise draw per step."""
    s = sigmas.tolist()
    noise = _need(noise, x)
    old_denoised, h_last = None, 0.0
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            decay = -math.expm1(-2 * h)  # 1 - e^{-2h}
            x = (s[i + 1] / s[i] * math.exp(-h)) * x + decay * denoised
            if old_denoised is not None:
                x = x + (decay * h / h_last / 2) * (denoised - old_denoised)
            x = x + noise(s[i], s[i + 1]) * (s[i + 1] * math.sqrt(decay))
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, denoised, s)
    return x


def sample_dpmpp_sde(
    model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: NoiseSampler | None = None, callback: Callback | None = None
) -> Tensor:
    """DPM-Solver++ SDE with a midpoint stage, r = 1/2 (k-diffusion's `sample_dpmpp_sde`, after Lu et al. 2022);
    its two draws per step should be increments of one path: give it `brownian_noise` (Plan.noise_sampler does)."""
    s = sigmas.tolist()
    noise = _need(noise, x)
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            sigma_mid = math.sqrt(s[i] * s[i + 1])  # λ halfway
            sigma_down, sigma_up = ancestral_step(s[i], sigma_mid)
            x_mid = _toward(denoised, x, s[i], sigma_down) + noise(s[i], sigma_mid) * sigma_up
            denoised_mid = model(x_mid, sigma_mid)
            sigma_down, sigma_up = ancestral_step(s[i], s[i + 1])
            x = _toward(denoised_mid, x, s[i], sigma_down) + noise(s[i], s[i + 1]) * sigma_up
        _report(callback, i, x, denoised, s)
    return x


# --- UniPC ---------------------------------------------------------------------------------------
def _unipc_rhs(hh: float, order: int) -> np.ndarray:
    """The right-hand side b_k = k!·φ_{k+1}(hh) / B(h), k = 1..order, of UniPC's order conditions (B(h) = e^hh - 1)."""
    b_h = math.expm1(hh)
    phi = math.expm1(hh) / hh - 1
    b, factorial = [], 1
    for k in range(1, order + 1):
        b.append(phi * factorial / b_h)
        factorial *= k + 1
        phi = phi / hh - 1 / factorial
    return np.array(b)


def _unipc_update(
    x: Tensor,
    sigma: float,
    sigma_to: float,
    history: list[Tensor],
    lambdas: list[float],
    rhos: np.ndarray,
    d_new: Tensor | None = None,
) -> Tensor:
    """x̂0-form UniPC update from σ to σ_to: the first-order step, then B(h)·Σ ρ_k·D_k.

    `history`/`lambdas` hold x̂0 and λ = -log σ up to σ (newest last); D_k = (x̂0_{-k} - x̂0_0) / r_k.
    The corrector also passes `d_new` = x̂0(σ_to) - x̂0(σ), weighted by the last ρ."""
    h = math.log(sigma / sigma_to)
    b_h = math.expm1(-h)  # B(h) = φ_1 for the x̂0 form
    m0 = history[-1]
    x_next = (sigma_to / sigma) * x - b_h * m0
    for k in range(1, len(rhos) - (d_new is not None) + 1):
        r = (lambdas[-1 - k] - lambdas[-1]) / h
        x_next = x_next - (b_h * float(rhos[k - 1]) / r) * (history[-1 - k] - m0)
    if d_new is not None:
        x_next = x_next - (b_h * float(rhos[-1])) * d_new
    return x_next


def _unipc_rhos(lambdas: list[float], h: float, order: int, corrector: bool) -> np.ndarray:
    """ρ solving R·ρ = b with R_jk = r_k^(j-1); the predictor drops the last (r = 1) column, order 2 uses ρ = 1/2."""
    rks = [(lambdas[-1 - k] - lambdas[-1]) / h for k in range(1, order)] + [1.0]
    b = _unipc_rhs(-h, order)
    if not corrector:
        if order <= 1:
            return np.zeros(0)
        if order == 2:
            return np.array([0.5])
        R = np.array([[r ** (j - 1) for r in rks[:-1]] for j in range(1, order)])
        return np.linalg.solve(R, b[:-1])
    if order == 1:
        return np.array([0.5])
    R = np.array([[r ** (j - 1) for r in rks] for j in range(1, order + 1)])
    return np.linalg.solve(R, b)


def sample_unipc(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    callback: Callback | None = None,
    order: int = 2,
) -> Tensor:
    """UniPC, x̂0 prediction with B(h) = e^h - 1 (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework
    for Fast Sampling of Diffusion Models"); the corrector reuses each new network call, lower order at the end."""
    s = sigmas.tolist()
    n = len(s) - 1
    history: list[Tensor] = []  # x̂0 at s[i-order+1..i]
    lambdas: list[float] = []  # -log σ at the same points
    x_last, last_order = x, 0
    for i in range(n):
        denoised = model(x, s[i])
        if i > 0:  # UniC: correct the step just taken with the network call at its end
            h = math.log(s[i - 1] / s[i])
            rhos = _unipc_rhos(lambdas, h, last_order, corrector=True)
            x = _unipc_update(x_last, s[i - 1], s[i], history, lambdas, rhos, d_new=denoised - history[-1])
        history = (history + [denoised])[-order:]
        lambdas = (lambdas + [-math.log(s[i])])[-order:]
        last_order = min(order, n - i, len(history))
        x_last = x
        if s[i + 1] == 0:
            x = denoised
        else:  # UniP
            h = math.log(s[i] / s[i + 1])
            rhos = _unipc_rhos(lambdas, h, last_order, corrector=False)
            x = _unipc_update(x, s[i], s[i + 1], history, lambdas, rhos)
        _report(callback, i, x, denoised, s)
    return x


# --- registry: what a pipeline needs to run each sampler as its diffusers twin ---------------------
Sampler = Callable[..., Tensor]


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler and the conventions of its diffusers twin.

    family:       "k-diffusion" (EulerDiscrete & co.): diffusers' k-diffusion timesteps; x_T = σ_max·ε,
                  or sqrt(σ_max² + 1)·ε with `leading` spacing; Karras/exponential span the chosen timesteps' σ.
                  "ddim" (DDIM, DDPM, PNDM) and "dpm-solver" (DPM-Solver++, UniPC): their timesteps; the VP
                  latent starts as ε (x_T = sqrt(σ_max² + 1)·ε); Karras/exponential span the model's σ range.
    round_karras: the network gets round(t(σ)) at Karras sigmas (diffusers' DPM-Solver, UniPC, KDPM2).
    integer_t:    timesteps are stored as integers, so fractional ones are truncated (DPM-Solver, UniPC).
    final_sigma:  "sigma_min" ends at σ(t=0) instead of 0 (diffusers' DDIM/PNDM with set_alpha_to_one=False).
    noise:        "brownian" for samplers whose noise should be increments of one Brownian motion.
    """

    fn: Sampler
    family: TimestepRule
    round_karras: bool = False
    integer_t: bool = False
    final_sigma: Literal["zero", "sigma_min"] = "zero"
    noise: Literal["gaussian", "brownian"] = "gaussian"
    twin: str = ""  # the diffusers scheduler it reproduces ("" when none)


_DPM_SOLVER = dict(family="dpm-solver", round_karras=True, integer_t=True)
_DDPM = dict(family="ddim", round_karras=True, integer_t=True)
SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(sample_ddim, **_DDPM, final_sigma="sigma_min", twin="DDIMScheduler"),
    "ddpm": SamplerSpec(sample_ddpm, **_DDPM, twin="DDPMScheduler"),
    "plms": SamplerSpec(sample_plms, **_DDPM, final_sigma="sigma_min", twin="PNDMScheduler(skip_prk_steps=True)"),
    "lms": SamplerSpec(sample_lms, "k-diffusion", twin="LMSDiscreteScheduler"),
    "euler": SamplerSpec(sample_euler, "k-diffusion", twin="EulerDiscreteScheduler"),
    "euler_a": SamplerSpec(sample_euler_a, "k-diffusion", twin="EulerAncestralDiscreteScheduler"),
    "heun": SamplerSpec(sample_heun, "k-diffusion", twin="HeunDiscreteScheduler"),
    "dpm2": SamplerSpec(sample_dpm2, "k-diffusion", round_karras=True, twin="KDPM2DiscreteScheduler"),
    "dpm2_a": SamplerSpec(sample_dpm2_a, "k-diffusion", round_karras=True, twin="KDPM2AncestralDiscreteScheduler"),
    "dpmpp_2m": SamplerSpec(
        sample_dpmpp_2m, **_DPM_SOLVER, twin='DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")'
    ),
    "dpmpp_2m_sde": SamplerSpec(
        sample_dpmpp_2m_sde, **_DPM_SOLVER, twin='DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")'
    ),
    "dpmpp_sde": SamplerSpec(sample_dpmpp_sde, "k-diffusion", noise="brownian"),
    "dpmpp_2s_a": SamplerSpec(sample_dpmpp_2s_a, "k-diffusion"),
    "unipc": SamplerSpec(sample_unipc, **_DPM_SOLVER, twin="UniPCMultistepScheduler"),
}

# AUTOMATIC1111 display names and k-diffusion function names -> keys
SAMPLER_NAMES: dict[str, str] = {
    "ddim": "ddim", "ddpm": "ddpm", "plms": "plms", "pndm": "plms", "lms": "lms", "euler": "euler",
    "euler a": "euler_a", "euler_ancestral": "euler_a", "heun": "heun", "dpm2": "dpm2", "dpm_2": "dpm2",
    "dpm2 a": "dpm2_a", "dpm_2_ancestral": "dpm2_a", "dpm++ 2m": "dpmpp_2m", "dpm++ 2m sde": "dpmpp_2m_sde",
    "dpm++ sde": "dpmpp_sde", "dpm++ 2s a": "dpmpp_2s_a", "dpmpp_2s_ancestral": "dpmpp_2s_a", "unipc": "unipc",
}  # fmt: skip
A1111_NAMES = ("Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE",
               "DPM++ 2M SDE", "DDIM", "PLMS", "UniPC", "DDPM")  # fmt: skip
SCHEDULE_SUFFIXES: dict[str, SigmaScheduleName] = {"karras": "karras", "exponential": "exponential"}


def display_name(key: str) -> str:
    """The AUTOMATIC1111 name of a sampler key ("euler_a" -> "Euler a"), as infotexts write it."""
    names = {SAMPLER_NAMES[n.lower()]: n for n in A1111_NAMES}
    return names[resolve_sampler(key)[0]]


def resolve_sampler(name: str) -> tuple[str, SigmaScheduleName]:
    """("DPM++ 2M Karras" | "dpmpp_2m_karras" | "k_dpmpp_2m" | ...) -> ("dpmpp_2m", "karras")."""
    key = name.strip().lower()
    schedule: SigmaScheduleName = "default"
    for suffix, sched in SCHEDULE_SUFFIXES.items():
        for sep in (" ", "_"):
            if key.endswith(sep + suffix):
                key, schedule = key[: -len(sep + suffix)], sched
    key = key.removeprefix("k_")
    key = SAMPLER_NAMES.get(key, key)
    if key not in SAMPLERS:
        raise SdlabError(
            f"unknown sampler {name!r}; use one of {', '.join(A1111_NAMES)} (optionally + ' Karras' or "
            f"' Exponential') or a key: {', '.join(SAMPLERS)}"
        )
    return key, schedule


@dataclass(frozen=True, eq=False)
class Plan:
    """One sampler run laid out as its diffusers twin lays it out."""

    sampler: str  # key in SAMPLERS
    schedule_name: SigmaScheduleName
    sigmas: Tensor  # (n+1,) float32, highest first; the last is 0 or σ(t=0)
    timesteps: Tensor  # (n,) float32: the network timestep at sigmas[:-1]
    init_scale: float  # x_T = init_scale · ε in k-diffusion coordinates
    schedule: NoiseSchedule
    _timestep: Callable[[float], float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_timestep", timestep_lookup(self.sigmas[:-1], self.timesteps, self.schedule))

    def timestep(self, sigma: float) -> float:
        """The network timestep for σ: diffusers' own for the plan's sigmas, log-σ interpolation between them."""
        return self._timestep(sigma)

    def denoiser(self, net: ModelFn, prediction_type: PredictionType) -> Denoiser:
        return denoiser(net, prediction_type, self.timestep)

    def noise_sampler(self, x: Tensor, generator: torch.Generator | None = None) -> NoiseSampler:
        """The noise this sampler's twin draws: plain randn per step, or Brownian increments (DPM++ SDE)."""
        make = brownian_noise if SAMPLERS[self.sampler].noise == "brownian" else gaussian_noise
        return make(x, generator)

    def sample(
        self,
        model: Denoiser,
        x: Tensor,
        *,
        noise: NoiseSampler | None = None,
        callback: Callback | None = None,
        **options,
    ) -> Tensor:
        """Run the sampler from x (already scaled by init_scale); options such as DDIM's eta pass through."""
        return SAMPLERS[self.sampler].fn(model, x, self.sigmas, noise=noise, callback=callback, **options)

    def to_vp(self, x: Tensor) -> Tensor:
        return to_vp(x, float(self.sigmas[-1]))


def to_vp(x: Tensor, sigma: float | Tensor) -> Tensor:
    """k-diffusion x at noise level σ -> the VP latent: x / sqrt(1 + σ²)."""
    return x / math.sqrt(1.0 + float(sigma) ** 2)


def _sigmas_and_timesteps(
    spec: SamplerSpec, schedule: NoiseSchedule, steps: int, name: SigmaScheduleName
) -> tuple[Tensor, Tensor]:
    """The n sigmas (float64) at which the network is called, and its timesteps there."""
    timesteps = inference_timesteps(schedule.config, steps, spec.family)
    sigmas = schedule.t_to_sigma(timesteps)
    if name == "default":
        return sigmas, timesteps
    if spec.family == "k-diffusion":  # diffusers spans the sigmas of the chosen timesteps
        lo, hi = float(sigmas[-1]), float(sigmas[0])
    else:
        lo, hi = schedule.sigma_min, schedule.sigma_max
    make = karras_sigmas if name == "karras" else exponential_sigmas
    sigmas = make(steps, lo, hi)
    timesteps = schedule.sigma_to_t(sigmas)
    if name == "karras" and spec.round_karras:
        timesteps = timesteps.round()
    if spec.integer_t:
        timesteps = timesteps.trunc()
    return sigmas, timesteps


def prepare(
    sampler: str, schedule: ScheduleConfig, steps: int, schedule_name: SigmaScheduleName | None = None
) -> Plan:
    """Sigmas, network timesteps and initial noise scale for `sampler` (a key or an A1111 name) at `steps` steps.

    `schedule_name` ("default" | "karras" | "exponential") overrides a suffix in the name."""
    key, suffix_schedule = resolve_sampler(sampler)
    name = schedule_name.lower() if schedule_name is not None else suffix_schedule
    if name not in ("default", "karras", "exponential"):
        raise SdlabError(f"unknown sigma schedule {schedule_name!r}; use default, karras or exponential")
    spec = SAMPLERS[key]
    noise_schedule = NoiseSchedule.from_config(schedule)
    sigmas, timesteps = _sigmas_and_timesteps(spec, noise_schedule, steps, name)
    last = noise_schedule.sigma_min if spec.final_sigma == "sigma_min" and name == "default" else 0.0
    sigmas = torch.cat([sigmas, sigmas.new_tensor([last])]).to(torch.float32)
    sigma_max = float(sigmas[0])
    use_sigma = spec.family == "k-diffusion" and schedule.timestep_spacing != "leading"
    init_scale = sigma_max if use_sigma else math.sqrt(sigma_max**2 + 1)
    return Plan(key, name, sigmas, timesteps.to(torch.float32), init_scale, noise_schedule)
