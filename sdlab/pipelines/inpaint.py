"""Inpainting in latent space, both ways people use it.

Any model (the "blended" way, Lugmayr et al. 2022 / the seed's method): outside the mask x is, at every
call of the network, the original's latents noised to the current σ with the run's own noise, and the
network's x̂0 there is the original's latents, so every step of any sampler keeps that region on the
original's noised path; at the end the clean latents are put back. For samplers whose update is
elementwise this equals diffusers' blending of x after each step.

Inpainting models (9-channel U-Net): the mask (binarised, at latent size) and the latents of the image
with the masked area blanked are concatenated to the U-Net's input (see Runner._inpainting_condition).

The pixel side (blur, fills, only-masked crops, the final overlay) is in pipelines/masks.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from sdlab.diffusion.denoiser import Denoiser
from sdlab.pipelines.settings import Fill


@dataclass(frozen=True)
class Blend:
    """The original's latents kept outside the mask."""

    known: Tensor  # (1, 4, h, w) the original's scaled latents
    noise: Tensor  # (1, 4, h, w) ε of the run: x_T = known + σ_T·ε there
    keep: Tensor  # (1, 1, h, w) 1 outside the mask, 0 inside

    def noised(self, sigma: float) -> Tensor:
        return self.known + sigma * self.noise  # (1, 4, h, w) k-diffusion coordinates

    def denoiser(self, model: Denoiser) -> Denoiser:
        keep = self.keep

        def D(x: Tensor, sigma: float) -> Tensor:
            x = keep * self.noised(sigma) + (1 - keep) * x
            return keep * self.known + (1 - keep) * model(x, sigma)

        return D

    def final(self, latents: Tensor) -> Tensor:
        """VP latents at the end of the run -> the clean original outside the mask."""
        return self.keep * self.known + (1 - self.keep) * latents


def fill_latents(latents: Tensor, repaint: Tensor, noise: Tensor, fill: Fill) -> Tensor:
    """What the masked area starts from before noising (AUTOMATIC1111's "masked content"): the original
    ("original"; "fill" already replaced the pixels), the run's noise ("noise") or zeros ("nothing")."""
    if fill == "nothing":
        return latents * (1 - repaint)
    if fill == "noise":
        return latents * (1 - repaint) + noise * repaint
    return latents
