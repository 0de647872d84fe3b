"""Schedules against diffusers: betas, ᾱ, σ, inference timesteps per spacing, Karras/exponential sigmas, t <-> σ."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from sdlab.config import ScheduleConfig
from sdlab.diffusion.samplers import prepare, to_vp
from sdlab.diffusion.schedules import (
    NoiseSchedule,
    alphas_cumprod,
    betas,
    exponential_sigmas,
    inference_timesteps,
    karras_sigmas,
)
from sdlab.errors import SdlabError
from tests.diffusion.test_samplers import SD_CONFIG

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy 2 warnings

SD = SD_CONFIG
SPACINGS = ("leading", "linspace", "trailing")
STEPS = (1, 5, 7, 20, 30, 50, 999)


def ours(spacing: str = "leading", **kw) -> ScheduleConfig:
    return ScheduleConfig(timestep_spacing=spacing, **kw)


def theirs(cls, spacing: str = "leading", **kw):
    return cls.from_config(dict(SD, timestep_spacing=spacing, **kw))


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_betas_alphas_sigmas_equal_diffusers(schedule):
    cfg = ScheduleConfig(beta_schedule=schedule)
    ref = DDPMScheduler.from_config(dict(SD, beta_schedule=schedule))
    assert torch.equal(betas(cfg), ref.betas)
    assert torch.equal(alphas_cumprod(cfg), ref.alphas_cumprod)
    ns = NoiseSchedule.from_config(cfg)
    assert torch.equal(ns.sigmas, ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5)
    assert ns.sigma_min == pytest.approx(0.0292, abs=1e-4) if schedule == "scaled_linear" else True
    assert ns.sigma_max == pytest.approx(14.6146, abs=1e-4) if schedule == "scaled_linear" else True


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize(
    "rule, cls",
    [("k-diffusion", EulerDiscreteScheduler), ("ddim", DDIMScheduler), ("dpm-solver", DPMSolverMultistepScheduler)],
)
def test_inference_timesteps_equal_diffusers(rule, cls, spacing):
    for steps in STEPS:
        for offset in (0, 1):
            ref = theirs(cls, spacing, steps_offset=offset)
            ref.set_timesteps(steps)
            got = inference_timesteps(ours(spacing, steps_offset=offset), steps, rule)
            assert torch.equal(got.to(torch.float32), ref.timesteps.to(torch.float32)), (steps, offset)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_pndm_and_unipc_use_the_ddim_and_dpm_solver_timesteps(spacing):
    for steps in (5, 20, 50):
        pndm, unipc = theirs(PNDMScheduler, spacing), theirs(UniPCMultistepScheduler, spacing)
        pndm.set_timesteps(steps)
        unipc.set_timesteps(steps)
        assert inference_timesteps(ours(spacing), steps, "ddim").tolist() == pndm._timesteps[::-1].tolist()
        assert inference_timesteps(ours(spacing), steps, "dpm-solver").tolist() == unipc.timesteps.tolist()


SIGMA_TWINS = [  # sampler key, diffusers class, extra config
    ("euler", EulerDiscreteScheduler, {}),
    ("lms", LMSDiscreteScheduler, {}),
    ("heun", HeunDiscreteScheduler, {}),
    ("dpm2", KDPM2DiscreteScheduler, {}),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {}),
    ("unipc", UniPCMultistepScheduler, {}),
]


def main_points(sched) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) at the network's main calls: Heun/KDPM2 repeat or interleave entries."""
    sigmas, timesteps = sched.sigmas, sched.timesteps
    if isinstance(sched, HeunDiscreteScheduler):  # σ0, σ1, σ1, ..., σ_{n-1}, σ_{n-1}, 0
        return torch.cat([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]]), torch.cat([timesteps[:1], timesteps[2::2]])
    if isinstance(sched, KDPM2DiscreteScheduler):  # σ0, σ1, σ1, ..., 0, 0, 0 with midpoint t between the main t
        return torch.cat([sigmas[:1], sigmas[1:-1:2]]), torch.cat([timesteps[:1], timesteps[2::2]])
    return sigmas, timesteps


@pytest.mark.parametrize("schedule", ["default", "karras", "exponential"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("key, cls, extra", SIGMA_TWINS)
def test_plan_sigmas_timesteps_and_init_equal_diffusers(key, cls, extra, spacing, schedule):
    flags = {"karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}.get(schedule, {})
    for steps in (5, 20, 50):
        ref = theirs(cls, spacing, **extra, **flags)
        ref.set_timesteps(steps)
        plan = prepare(key, ours(spacing), steps, schedule)
        sigmas, timesteps = main_points(ref)
        assert torch.equal(plan.sigmas, sigmas), (steps, plan.sigmas, sigmas)
        assert torch.allclose(plan.timesteps, timesteps.to(torch.float32), rtol=0, atol=1e-3), steps
        init = float(ref.init_noise_sigma)
        if cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):  # VP: latents start as ε
            init = math.sqrt(float(sigmas[0]) ** 2 + 1)
        assert plan.init_scale == pytest.approx(init, rel=1e-6)


@pytest.mark.parametrize("key, cls", [("ddim", DDIMScheduler), ("plms", PNDMScheduler)])
def test_ddim_and_plms_end_at_the_final_alpha(key, cls):
    ref = theirs(cls)
    ref.set_timesteps(20)
    plan = prepare(key, ours(), 20)
    ac = ref.alphas_cumprod
    expected = ((1 - ac[plan.timesteps.long()]) / ac[plan.timesteps.long()]) ** 0.5
    assert torch.equal(plan.sigmas[:-1], expected)
    final = ((1 - ref.final_alpha_cumprod) / ref.final_alpha_cumprod) ** 0.5
    assert float(plan.sigmas[-1]) == pytest.approx(float(final), rel=1e-6)
    assert plan.init_scale == pytest.approx(1 / math.sqrt(float(ac[951])), rel=1e-6)  # VP latents start as ε
    assert float(prepare("ddpm", ours(), 20).sigmas[-1]) == 0.0


def test_karras_and_exponential_formulas():
    k = karras_sigmas(10, 0.03, 14.6)
    assert float(k[0]) == pytest.approx(14.6) and float(k[-1]) == pytest.approx(0.03)
    steps = torch.diff(k ** (1 / 7))
    assert torch.allclose(steps, steps[0].expand_as(steps))
    e = exponential_sigmas(10, 0.03, 14.6)
    assert float(e[0]) == pytest.approx(14.6) and float(e[-1]) == pytest.approx(0.03)
    ratios = e[1:] / e[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios))


def test_sigma_to_t_equals_diffusers_and_inverts_t_to_sigma():
    ns = NoiseSchedule.from_config(ScheduleConfig())
    ref = EulerDiscreteScheduler.from_config(SD)
    log_sigmas = np.log(np.array(((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5))
    sigmas = torch.logspace(-2, 1.3, 200, dtype=torch.float64)
    sigmas = torch.cat([sigmas, torch.tensor([0.0, 1e-3, 100.0], dtype=torch.float64)])
    expected = np.array([ref._sigma_to_t(s, log_sigmas) for s in sigmas.numpy()])
    assert np.allclose(ns.sigma_to_t(sigmas).numpy(), expected, rtol=0, atol=1e-9)
    assert ns.sigma_to_t(torch.tensor([0.0, 100.0])).tolist() == [0.0, 999.0]  # clamped to the trained range

    t = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(ns.sigma_to_t(ns.t_to_sigma(t)), t, atol=1e-3)
    assert torch.equal(ns.t_to_sigma(t).to(torch.float32), ns.sigmas)
    half = ns.t_to_sigma(torch.tensor([10.5], dtype=torch.float64))
    assert float(half) == pytest.approx((float(ns.sigmas[10]) + float(ns.sigmas[11])) / 2)


def test_to_vp():
    x = torch.full((1, 4, 2, 2), 3.0)
    assert torch.equal(to_vp(x, 0.0), x)
    assert torch.allclose(to_vp(x, 2.0), x / math.sqrt(5))


def test_bad_schedule_config_is_an_sdlab_error():
    with pytest.raises(SdlabError, match="beta_schedule"):
        betas(ScheduleConfig(beta_schedule="cosine"))  # type: ignore[arg-type]
    with pytest.raises(SdlabError, match="timestep_spacing"):
        inference_timesteps(ScheduleConfig(timestep_spacing="uniform"), 10)  # type: ignore[arg-type]
    with pytest.raises(SdlabError, match="steps"):
        inference_timesteps(ScheduleConfig(), 0)
