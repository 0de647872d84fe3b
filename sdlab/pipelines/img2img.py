"""img2img: start part-way down the schedule from the image's own latents (SDEdit, Meng et al. 2021).

With `strength` s of n steps the run keeps the last int(n·s) of them, diffusers' `get_timesteps`, and
starts at x = latents + σ_start·ε (k-diffusion coordinates; the VP form is diffusers' `add_noise`).
s = 0 takes no step and returns the image through the VAE; s = 1 starts from pure noise.
"""

from __future__ import annotations

from dataclasses import replace

from sdlab.diffusion.samplers import Plan


def truncate(plan: Plan, strength: float) -> Plan:
    """The last int(n·strength) steps of `plan` (none for strength 0)."""
    n = len(plan.timesteps)
    first = n - min(int(n * strength), n)
    return replace(plan, sigmas=plan.sigmas[first:], timesteps=plan.timesteps[first:])
