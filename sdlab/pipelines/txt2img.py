"""Text to image for SD 1.x, 2.x and SDXL, composed from the layers below:

    prompt --prompts--> context (2, 77n, D) [negative, positive], SDXL pooled + micro-conditioning
    seed   --Generator--> noise (1, 4, H/f, W/f) --sampler over D(x, σ) with CFG--> latents
    latents / scaling_factor --VAE decoder--> image (1, 3, H, W)

One image at a time, each from its own generator seeded `seed + i`: the initial noise first,
then any ancestral/SDE noise, in diffusers' order, so a batch of one reproduces diffusers' image
for the same seed and any image of a batch can be made again alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from PIL import Image

from sdlab.checkpoints.load import Components
from sdlab.diffusion.denoiser import guided
from sdlab.diffusion.samplers import Plan, prepare
from sdlab.models.unet import added_condition
from sdlab.pipelines.images import to_pil
from sdlab.pipelines.settings import Settings
from sdlab.prompts import encode_prompt_pair

StepCallback = Callable[[int, int], None]  # (step done, total steps)

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # SDXL refiner defaults (diffusers, ComfyUI)


@dataclass
class Conditioning:
    """Both halves of classifier-free guidance, batched as [negative, positive]."""

    context: torch.Tensor  # (2, 77n, D)
    y: torch.Tensor | None  # (2, addition_embed_dim) for SDXL, else None

    def positive(self) -> Conditioning:
        return Conditioning(self.context[1:], None if self.y is None else self.y[1:])


class Text2Image:
    """A loaded model ready to make images; `generate` can be called many times."""

    def __init__(self, components: Components, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.components = components
        self.config = components.config
        self.device = torch.device(device)
        self.dtype = dtype

    # --- conditioning ---------------------------------------------------------------------------
    @torch.no_grad()
    def condition(self, s: Settings) -> Conditioning:
        c = self.components
        negative = s.negative
        cond, uncond, pooled, negative_pooled = encode_prompt_pair(
            s.prompt, negative, c.text_encoders, c.tokenizers, self.config.text, s.clip_skip
        )
        if self.config.force_zeros_for_empty_prompt and not negative:
            uncond = torch.zeros_like(uncond)
            negative_pooled = None if negative_pooled is None else torch.zeros_like(negative_pooled)
        context = torch.cat([uncond, cond]).to(self.device, self.dtype)  # (2, 77n, D)
        y = None
        if self.config.unet.addition_embed_dim:
            ids, negative_ids = self._time_ids(s)
            y = torch.cat(
                [added_condition(negative_pooled, negative_ids, self.config.unet), added_condition(pooled, ids, self.config.unet)]
            ).to(self.device, self.dtype)  # (2, addition_embed_dim)
        return Conditioning(context, y)

    def _time_ids(self, s: Settings) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL micro-conditioning: original size, crop top-left, then target size (base) or aesthetic score (refiner)."""
        size = [float(s.height), float(s.width)]
        crop = [0.0, 0.0]
        if self.config.requires_aesthetics_score:
            return torch.tensor([size + crop + [AESTHETIC_SCORE]]), torch.tensor([size + crop + [NEGATIVE_AESTHETIC_SCORE]])
        ids = torch.tensor([size + crop + size])
        return ids, ids

    # --- sampling -------------------------------------------------------------------------------
    def _network(self, cond: Conditioning, guidance: float, rescale: float):
        unet = self.components.unet

        def net(x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
            return unet(x.to(self.dtype), t, c.context, y=c.y).float()

        if guidance > 1.0:
            return guided(lambda x, t: net(x, t, cond), guidance, rescale)
        positive = cond.positive()
        return lambda x, t: net(x, t, positive)

    def plan(self, s: Settings) -> Plan:
        return prepare(s.sampler, self.config.schedule, s.steps, s.schedule)

    def initial_noise(self, s: Settings, plan: Plan, generator: torch.Generator) -> torch.Tensor:
        """x_T = init_scale * ε (1, 4, H/f, W/f), drawn on the CPU so every device gets the same image."""
        f = self.config.vae.downscale
        shape = (1, self.config.unet.out_channels, s.height // f, s.width // f)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device) * plan.init_scale

    @torch.no_grad()
    def denoise(
        self, s: Settings, plan: Plan, x: torch.Tensor, cond: Conditioning, generator: torch.Generator,
        on_step: StepCallback | None = None, steps_before: int = 0,
    ) -> torch.Tensor:
        """Run `plan` from x at plan.sigmas[0] to x at plan.sigmas[-1] (k-diffusion coordinates)."""
        model = plan.denoiser(self._network(cond, s.guidance, s.guidance_rescale), self.config.prediction_type)
        callback = None if on_step is None else (lambda step: on_step(steps_before + step.i + 1, s.steps))
        options = {} if s.eta is None else {"eta": s.eta}
        if plan.sampler == "plms":  # PLMS combines raw network outputs, as diffusers' PNDM does
            options["mix"] = self.config.prediction_type
        return plan.sample(model, x, noise=plan.noise_sampler(x, generator), callback=callback, **options)

    @torch.no_grad()
    def sample(self, s: Settings, cond: Conditioning, seed: int, on_step: StepCallback | None = None) -> torch.Tensor:
        """Latents (1, 4, H/f, W/f) in the VAE's scaled space for one seed."""
        generator = torch.Generator().manual_seed(seed)
        plan = self.plan(s)
        x = self.denoise(s, plan, self.initial_noise(s, plan, generator), cond, generator, on_step)
        return plan.to_vp(x)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.components.vae
        dtype = next(vae.parameters()).dtype  # fp32 when an fp16 pipeline upcasts the VAE
        image = vae.decode(vae.unscale_latents(latents).to(dtype))  # (1, 3, H, W)
        return to_pil(image)

    def generate_images(
        self, s: Settings, on_step: StepCallback | None = None, refiner: Text2Image | None = None
    ) -> list[tuple[int, Image.Image]]:
        """(seed, image) for each image of the batch; `s` must be resolved. With a refiner, this model
        denoises down to `s.refiner_switch` and the refiner takes the latents from there."""
        cond = self.condition(s)
        refiner_cond = None if refiner is None else refiner.condition(s)
        out = []
        for i in range(s.batch):
            seed = s.seed + i
            generator = torch.Generator().manual_seed(seed)
            plan = self.plan(s)
            x = self.initial_noise(s, plan, generator)
            if refiner is None:
                image = self.decode(plan.to_vp(self.denoise(s, plan, x, cond, generator, on_step)))
            else:
                first, second = split_plan(plan, refiner.plan(s), s.refiner_switch, self.config.schedule.num_train_timesteps)
                if len(first.timesteps):
                    x = self.denoise(s, first, x, cond, generator, on_step)
                if len(second.timesteps):
                    x = refiner.denoise(s, second, x, refiner_cond, generator, on_step, len(first.timesteps))
                image = refiner.decode(second.to_vp(x))
            out.append((seed, image[0]))
        return out


def split_plan(base: Plan, refiner: Plan, switch: float, train_steps: int) -> tuple[Plan, Plan]:
    """Hand-off at a fraction of the noise schedule, as diffusers' `denoising_end`/`denoising_start`:
    the base keeps the timesteps t >= round(T - switch * T), the refiner runs the rest."""
    cutoff = round(train_steps - switch * train_steps)
    k = int((base.timesteps >= cutoff).sum())
    first = replace(base, sigmas=base.sigmas[: k + 1], timesteps=base.timesteps[:k])
    second = replace(refiner, sigmas=refiner.sigmas[k:], timesteps=refiner.timesteps[k:])
    return first, second
