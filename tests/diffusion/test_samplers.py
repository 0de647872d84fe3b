"""Samplers against diffusers' schedulers on the same fake network, plus the samplers without a twin.

Each parity case runs diffusers' scheduler loop as its pipeline does (init_noise_sigma, scale_model_input,
step with a seeded generator) and ours (prepare -> init_scale -> denoiser -> sample -> to_vp) on one
deterministic nonlinear network, in float32, and compares every network input, every timestep and the
final latents. Stochastic samplers draw from two generators seeded alike, in the same order and shapes.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from sdlab.config import ScheduleConfig
from sdlab.diffusion.denoiser import cfg_combine, denoiser, guided
from sdlab.diffusion.samplers import (
    A1111_NAMES,
    SAMPLERS,
    display_name,
    gaussian_noise,
    prepare,
    resolve_sampler,
)
from sdlab.errors import SdlabError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy 2 warnings

ATOL = 1e-5  # final latents and every network input, float32
T_ATOL = 5e-3  # network timesteps: diffusers computes midpoint timesteps (KDPM2) in float32, up to ~1.3e-3 off
SHAPE = (2, 4, 8, 8)

# SD1.x/2.x scheduler_config.json (shared/REFERENCE-configs.md §4); the SDXL Euler config adds the fields it sets
SD_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    clip_sample=False,
    trained_betas=None,
)
SDXL_EULER = dict(
    SD_CONFIG, interpolation_type="linear", use_karras_sigmas=False, sample_max_value=1.0, timestep_spacing="leading"
)

TWINS = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "plms": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpm2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {"solver_order": 2, "solver_type": "bh2"}),
}
# KDPM2 ancestral + Karras is left out: its midpoint σ equals the next σ, which diffusers evaluates once at the
# unrounded and once at the rounded timestep; here one σ has one timestep (see test_dpm2_a_karras_differs_only_in_t).
VP_SCHEDULERS = (DDIMScheduler, DDPMScheduler, PNDMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler)
KARRAS_TWINS = ("lms", "euler", "heun", "dpm2", "dpmpp_2m", "dpmpp_2m_sde", "unipc")


# --- the fake network and the two loops ----------------------------------------------------------
_W = torch.randn(4, 4, generator=torch.Generator().manual_seed(7)) * 0.6
_ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)


def fake_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear function of (x, t) that mixes channels and behaves like a trained network:
    unit-scale output, and a bounded x̂0 whether it is read as ε or as v."""
    t = t.to(torch.float64).reshape(-1).expand(x.shape[0])
    a = torch.from_numpy(np.interp(t.numpy(), np.arange(1000), _ALPHAS_CUMPROD.numpy()))
    a = a.to(torch.float32).view(-1, 1, 1, 1)  # ᾱ(t)
    phase = 0.5 * torch.sin(6 * t / 1000).to(torch.float32).view(-1, 1, 1, 1)
    mixed = torch.einsum("oc,bchw->bohw", _W, x)
    return (1 - a).sqrt() * x + 0.3 * a.sqrt() * torch.tanh(mixed + phase)


@dataclass
class Recorder:
    """The fake network, remembering every input it was called with."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    timesteps: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        self.timesteps.append(t.to(torch.float32).reshape(-1).expand(x.shape[0]).clone())
        return fake_net(x, t)


def v_as_eps(net):
    """The ε-network equivalent to a v-network: ε = sqrt(ᾱ)·v + sqrt(1 - ᾱ)·x_in (integer t)."""

    def eps_net(x, t):
        a = _ALPHAS_CUMPROD[int(t)].to(torch.float32)
        return a.sqrt() * net(x, t) + (1 - a).sqrt() * x

    return eps_net


def run_diffusers(cls, config: dict, steps: int, noise0: torch.Tensor, seed: int, wrap=None, adjust=None, **step_kw):
    sched = cls.from_config(config)
    sched.set_timesteps(steps)
    if adjust:
        adjust(sched)
    gen = torch.Generator().manual_seed(seed)
    recorder = Recorder()
    net = wrap(recorder) if wrap else recorder
    takes_generator = "generator" in inspect.signature(sched.step).parameters
    latents = noise0 * sched.init_noise_sigma
    for t in sched.timesteps:
        out = net(sched.scale_model_input(latents, t), t)
        kwargs = dict(step_kw, generator=gen) if takes_generator else step_kw
        latents = sched.step(out, t, latents, **kwargs).prev_sample
    return latents, recorder, float(sched.init_noise_sigma)


def run_ours(key: str, cfg: ScheduleConfig, steps: int, schedule: str, noise0: torch.Tensor, seed: int, **options):
    plan = prepare(key, cfg, steps, schedule)
    net, gen = Recorder(), torch.Generator().manual_seed(seed)
    x = noise0 * plan.init_scale
    x = plan.sample(plan.denoiser(net, cfg.prediction_type), x, noise=plan.noise_sampler(x, gen), **options)
    return plan.to_vp(x), net, plan


def schedule_config(config: dict, prediction: str) -> ScheduleConfig:
    return ScheduleConfig(
        num_train_timesteps=config["num_train_timesteps"],
        beta_start=config["beta_start"],
        beta_end=config["beta_end"],
        beta_schedule=config["beta_schedule"],
        prediction_type=prediction,
        timestep_spacing=config.get("timestep_spacing", "leading"),
        steps_offset=config["steps_offset"],
    )


def compare(key: str, steps: int, prediction: str, schedule: str = "default", base: dict = SD_CONFIG,
            ddim_eta: float | None = None, seed: int = 0) -> float:  # fmt: skip
    """Max |difference| of final latents between diffusers and sdlab; asserts the per-call agreement."""
    cls, extra = TWINS[key]
    flags = {"karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}.get(schedule, {})
    config = dict(base, prediction_type=prediction, **extra, **flags)
    if "timestep_spacing" not in config:
        config["timestep_spacing"] = "leading"
    noise0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234 + steps))
    eta = {"eta": ddim_eta} if ddim_eta is not None else {}
    ours_options = dict(eta)
    if key == "plms":  # diffusers' PNDM mixes the raw network outputs (see test_plms_mixing)
        ours_options["mix"] = prediction
    ref, ref_net, init_sigma = run_diffusers(cls, config, steps, noise0, seed, **eta)
    out, our_net, plan = run_ours(key, schedule_config(config, prediction), steps, schedule, noise0, seed, **ours_options)

    if cls in VP_SCHEDULERS:  # their latents start as ε: x_T = sqrt(σ_max² + 1)·ε in σ coordinates
        init_sigma = math.sqrt(float(plan.sigmas[0]) ** 2 + 1)
    assert plan.init_scale == pytest.approx(init_sigma, rel=1e-6)
    assert len(our_net.inputs) == len(ref_net.inputs), "number of network calls"
    for i, (a, b) in enumerate(zip(our_net.timesteps, ref_net.timesteps)):
        assert (a - b).abs().max() <= T_ATOL, f"timestep of call {i}: {a[0]} vs {b[0]}"
    for i, (a, b) in enumerate(zip(our_net.inputs, ref_net.inputs)):
        assert (a - b).abs().max() <= ATOL, f"network input of call {i} differs by {(a - b).abs().max():.2e}"
    diff = float((out - ref).abs().max())
    assert diff <= ATOL, f"{key} {schedule} {prediction} {steps} steps: final latents differ by {diff:.2e}"
    return diff


# --- parity ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [5, 20, 50])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("key", list(TWINS))
def test_matches_diffusers_sd_config(key, prediction, steps):
    compare(key, steps, prediction)


@pytest.mark.parametrize("steps", [5, 20, 50])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("key", KARRAS_TWINS)
def test_matches_diffusers_karras(key, prediction, steps):
    compare(key, steps, prediction, "karras")


@pytest.mark.parametrize("key", KARRAS_TWINS)
def test_matches_diffusers_exponential(key):
    compare(key, 20, "epsilon", "exponential")


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("key", [k for k in TWINS if k not in ("ddim", "plms")])
def test_matches_diffusers_other_spacings(key, spacing):
    compare(key, 20, "v_prediction", base=dict(SD_CONFIG, timestep_spacing=spacing))
    compare(key, 7, "epsilon", base=dict(SD_CONFIG, timestep_spacing=spacing))


@pytest.mark.parametrize("key", ["ddim", "plms"])
def test_matches_diffusers_trailing_ddim_pndm(key):
    """DDIM/PNDM step to t - T//steps; with trailing spacing that is the next timestep when steps divides T."""
    for steps in (5, 20, 50):
        compare(key, steps, "epsilon", base=dict(SD_CONFIG, timestep_spacing="trailing"))


@pytest.mark.parametrize("steps", [5, 20, 50])
def test_matches_diffusers_sdxl_euler(steps):
    compare("euler", steps, "epsilon", base=SDXL_EULER)
    compare("euler", steps, "epsilon", "karras", base=SDXL_EULER)


def test_plms_mixing():
    """On a v model the two PLMS variants differ: mixing v (diffusers' PNDM) equals diffusers' v mode,
    mixing ε̂ (Stability's PLMS) equals diffusers' PNDM run on the equivalent ε-network."""
    noise0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    config = dict(SD_CONFIG, timestep_spacing="leading", prediction_type="v_prediction")
    theirs_v, _, _ = run_diffusers(PNDMScheduler, config, 20, noise0, 0)
    theirs_eps, _, _ = run_diffusers(PNDMScheduler, dict(config, prediction_type="epsilon"), 20, noise0, 0, v_as_eps)
    v_cfg = ScheduleConfig(prediction_type="v_prediction")
    mixing_eps, _, _ = run_ours("plms", v_cfg, 20, "default", noise0, 0)
    mixing_v, _, _ = run_ours("plms", v_cfg, 20, "default", noise0, 0, mix="v_prediction")
    assert (mixing_eps - theirs_eps).abs().max() <= ATOL
    assert (mixing_v - theirs_v).abs().max() <= ATOL
    assert (mixing_eps - mixing_v).abs().max() > 1e-3


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_unipc_order_3_matches_diffusers(prediction):
    for steps in (5, 8, 20):
        noise0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        config = dict(SD_CONFIG, timestep_spacing="leading", solver_order=3, prediction_type=prediction)
        ref, _, _ = run_diffusers(UniPCMultistepScheduler, config, steps, noise0, 0)
        out, _, _ = run_ours("unipc", ScheduleConfig(prediction_type=prediction), steps, "default", noise0, 0, order=3)
        assert (out - ref).abs().max() <= ATOL


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_matches_diffusers(eta):
    for steps in (5, 20):
        compare("ddim", steps, "epsilon", ddim_eta=eta, seed=3)


@pytest.mark.parametrize("steps", [5, 20])
def test_dpm2_a_karras_differs_only_in_t(steps):
    """diffusers' KDPM2 ancestral + Karras evaluates its midpoint (mathematically the next σ) at the unrounded t,
    the next step at the rounded one; with the midpoints' t rounded too it matches ours to ATOL."""
    cls, extra = TWINS["dpm2_a"]
    config = dict(SD_CONFIG, timestep_spacing="leading", use_karras_sigmas=True)
    noise0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))

    def round_midpoints(sched):
        sched.timesteps[1::2] = sched.timesteps[1::2].round()

    ref, ref_net, _ = run_diffusers(cls, config, steps, noise0, 0, adjust=round_midpoints)
    plain, plain_net, _ = run_diffusers(cls, config, steps, noise0, 0)
    out, net, _ = run_ours("dpm2_a", ScheduleConfig(), steps, "karras", noise0, 0)
    assert (out - ref).abs().max() <= ATOL
    assert all(torch.equal(a, b) for a, b in zip(net.timesteps, ref_net.timesteps))
    assert max((a - b).abs().max() for a, b in zip(net.timesteps, plain_net.timesteps)) <= 0.5
    assert (out - plain).abs().max() <= 1e-2


def test_stochastic_parity_depends_on_the_seed_alike():
    """Seeding both sides alike is what makes them agree: another seed on our side moves the result."""
    noise0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    cls, extra = TWINS["euler_a"]
    ref, _, _ = run_diffusers(cls, dict(SD_CONFIG, timestep_spacing="leading", **extra), 10, noise0, seed=5)
    same, _, _ = run_ours("euler_a", ScheduleConfig(), 10, "default", noise0, seed=5)
    other, _, _ = run_ours("euler_a", ScheduleConfig(), 10, "default", noise0, seed=6)
    assert (same - ref).abs().max() <= ATOL
    assert (other - ref).abs().max() > 1e-2


# --- samplers without a twin, and properties of all --------------------------------------------------
def constant_model(c: torch.Tensor):
    return lambda x, sigma: c.expand_as(x).clone()


@pytest.mark.parametrize("key", list(SAMPLERS))
def test_exact_denoiser_converges(key):
    """With D(x, σ) = c every sampler must end at c (VP latents; DDIM/PLMS end at σ(0), with their residual noise)."""
    c = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    plan = prepare(key, ScheduleConfig(), 12)
    x = plan.init_scale * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    out = plan.to_vp(plan.sample(constant_model(c), x, noise=gaussian_noise(x, torch.Generator().manual_seed(2))))
    if float(plan.sigmas[-1]) == 0:
        assert (out - c).abs().max() <= 1e-5
    else:  # x = c + σ(0)·ε̂ at σ(0) ≈ 0.029, then scaled to VP
        assert (out - c).abs().max() <= 0.2


@pytest.mark.parametrize("key", ["dpmpp_sde", "dpmpp_2s_a", "euler_a", "dpm2_a", "dpmpp_2m_sde", "ddpm"])
def test_stochastic_samplers_reproducible_and_seeded(key):
    plan = prepare(key, ScheduleConfig(), 10, "karras")
    D = plan.denoiser(fake_net, "epsilon")
    x = plan.init_scale * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))

    def run(seed: int) -> torch.Tensor:
        return plan.sample(D, x, noise=gaussian_noise(x, torch.Generator().manual_seed(seed)))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


@pytest.mark.parametrize("key", list(SAMPLERS))
def test_samplers_leave_inputs_alone_and_report_each_step(key):
    plan = prepare(key, ScheduleConfig(), 6)
    x = plan.init_scale * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    x_copy, sigmas_copy = x.clone(), plan.sigmas.clone()
    steps = []
    plan.sample(plan.denoiser(fake_net, "v_prediction"), x, noise=gaussian_noise(x), callback=steps.append)
    assert torch.equal(x, x_copy) and torch.equal(plan.sigmas, sigmas_copy)
    assert [s.i for s in steps] == list(range(6))
    assert [s.sigma for s in steps] == plan.sigmas[:-1].tolist()


def test_samplers_on_gaussian_data():
    """Data ~ N(0, s²) has the exact denoiser D(x, σ) = x·s² / (s² + σ²) and the exact ODE end x_T·s / sqrt(s² + σ_T²):
    second-order samplers land closer to it than Euler, and the stochastic ones reproduce the data's std."""
    s2 = 0.25
    D = lambda x, sigma: x * (s2 / (s2 + sigma**2))  # noqa: E731
    plan = prepare("euler", ScheduleConfig(timestep_spacing="linspace"), 32, "karras")  # σ(999) .. σ(0)
    x = plan.init_scale * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    exact = x * math.sqrt(s2) / math.sqrt(s2 + float(plan.sigmas[0]) ** 2)
    error = {k: float((SAMPLERS[k].fn(D, x, plan.sigmas) - exact).abs().max()) for k in SAMPLERS if k != "ddpm"}
    for key in ("heun", "dpm2", "lms", "plms", "dpmpp_2m", "unipc"):
        assert error[key] < error["euler"] / 10, (key, error)
    assert error["ddim"] == pytest.approx(error["euler"], rel=1e-5)  # DDIM(eta=0) is Euler in σ

    big = plan.init_scale * torch.randn(64, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    for key in ("dpmpp_sde", "dpmpp_2s_a", "dpm2_a", "dpmpp_2m_sde"):  # Euler a, DDPM: first order, further off
        noise = prepare(key, ScheduleConfig(), 1).noise_sampler(big, torch.Generator().manual_seed(3))
        out = SAMPLERS[key].fn(D, big, plan.sigmas, noise=noise)
        assert out.std().item() == pytest.approx(math.sqrt(s2), rel=0.03), key


def test_brownian_noise_is_one_path():
    """Increments over [a, b] and [b, c] add up to the one over [a, c], in any order of asking."""
    x = torch.zeros(4096)
    noise = prepare("dpmpp_sde", ScheduleConfig(), 1).noise_sampler(x, torch.Generator().manual_seed(0))
    a, b, c = 10.0, 4.0, 1.0
    ac = noise(a, c) * math.sqrt(a - c)
    ab, bc = noise(a, b) * math.sqrt(a - b), noise(b, c) * math.sqrt(b - c)  # b comes from a bridge
    assert torch.allclose(ab + bc, ac, atol=1e-5)
    assert noise(a, b).std().item() == pytest.approx(1.0, rel=0.05)
    assert torch.corrcoef(torch.stack([ab, ac]))[0, 1].item() == pytest.approx(math.sqrt(6 / 9), abs=0.05)


# --- names -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expected",
    [
        ("Euler a", ("euler_a", "default")),
        ("DPM++ 2M Karras", ("dpmpp_2m", "karras")),
        ("DPM++ 2M SDE Karras", ("dpmpp_2m_sde", "karras")),
        ("DPM++ SDE", ("dpmpp_sde", "default")),
        ("DPM++ 2S a Exponential", ("dpmpp_2s_a", "exponential")),
        ("DPM2 a Karras", ("dpm2_a", "karras")),
        ("dpm2", ("dpm2", "default")),
        ("PLMS", ("plms", "default")),
        ("pndm", ("plms", "default")),
        ("k_dpmpp_2m", ("dpmpp_2m", "default")),
        ("dpmpp_2m_karras", ("dpmpp_2m", "karras")),
        ("UniPC", ("unipc", "default")),
    ],
)
def test_resolve_sampler(name, expected):
    assert resolve_sampler(name) == expected


@pytest.mark.parametrize("name", A1111_NAMES)
def test_every_a1111_name_resolves_with_each_suffix(name):
    for suffix in ("", " Karras", " Exponential"):
        key, schedule = resolve_sampler(name + suffix)
        assert key in SAMPLERS and schedule == (suffix.strip().lower() or "default")


def test_display_names_round_trip():
    assert display_name("euler_a") == "Euler a" and display_name("dpmpp_2m_sde") == "DPM++ 2M SDE"
    assert {resolve_sampler(display_name(k))[0] for k in SAMPLERS} == set(SAMPLERS)


def test_bad_sampler_name_is_one_line_listing_names():
    with pytest.raises(SdlabError) as err:
        resolve_sampler("Euler b")
    message = str(err.value)
    assert "\n" not in message and "'Euler b'" in message
    assert "DPM++ 2M" in message and "Karras" in message and "dpmpp_2m" in message


def test_bad_schedule_and_steps_are_sdlab_errors():
    with pytest.raises(SdlabError):
        prepare("euler", ScheduleConfig(), 20, "cosine")
    with pytest.raises(SdlabError):
        prepare("euler", ScheduleConfig(), 0)
    with pytest.raises(SdlabError):
        denoiser(fake_net, "sample", lambda s: 0.0)


# --- guidance --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guidance_matches_diffusers_formula_in_one_call(rescale):
    calls = []
    cond_shift = torch.linspace(-1, 1, 4).view(1, 4, 1, 1)

    def batched(x_in, t):  # first half unconditional, second conditional, as diffusers batches them
        calls.append(x_in.shape[0])
        out = fake_net(x_in, t)
        b = x_in.shape[0] // 2
        return torch.cat([out[:b], 1.7 * out[b:] + cond_shift])

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.full((SHAPE[0],), 500.0)
    got = guided(batched, 7.5, rescale)(x, t)
    assert calls == [2 * SHAPE[0]]

    uncond, cond = fake_net(x, t), 1.7 * fake_net(x, t) + cond_shift
    expected = uncond + 7.5 * (cond - uncond)
    if rescale > 0:
        expected = rescale_noise_cfg(expected, cond, guidance_rescale=rescale)
    assert (got - expected).abs().max() <= 1e-5
    assert (cfg_combine(uncond, cond, 7.5, rescale) - expected).abs().max() <= 1e-5


def test_ddpm_is_ddim_eta_1_is_euler_ancestral():
    """DDPM's posterior step is DDIM with eta = 1, which in σ coordinates is the Euler ancestral step."""
    plan = prepare("euler_a", ScheduleConfig(), 10)
    D = plan.denoiser(fake_net, "epsilon")
    x = plan.init_scale * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    outs = [
        SAMPLERS[k].fn(D, x, plan.sigmas, noise=gaussian_noise(x, torch.Generator().manual_seed(4)), **kw)
        for k, kw in (("ddpm", {}), ("ddim", {"eta": 1.0}), ("euler_a", {}))
    ]
    assert (outs[0] - outs[2]).abs().max() <= 1e-5 and torch.equal(outs[0], outs[1])
