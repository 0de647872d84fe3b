"""One loaded model making images, composed from the layers below; every pipeline runs through it:

    prompt --prompts--> context (2, 77n, D) [negative, positive], SDXL pooled + micro-conditioning
    seed   --Generator--> x_T: noise (txt2img) or image latents + σ_start·noise (img2img, inpaint)
    x_T --sampler over D(x, σ) with CFG [+ blended known latents] [+ 9-ch mask input] [+ ControlNets]--> latents
    latents / scaling_factor --VAE decoder--> image (1, 3, H, W)

One image at a time, each from its own generator seeded `seed + i`, drawing in diffusers' order
(image latents, then the initial noise, then the masked image's latents, then any ancestral/SDE noise),
so a batch of one reproduces diffusers' image for the same seed and any image of a batch can be made
again alone.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdlab.checkpoints.load import Components
from sdlab.diffusion.denoiser import Denoiser, guided
from sdlab.diffusion.samplers import Plan, Step, prepare
from sdlab.errors import SdlabError, SdlabWarning
from sdlab.checkpoints.preview import previewer_for
from sdlab.models.layers import HALF_DTYPES
from sdlab.models.tiling import circular_padding
from sdlab.models.token_merging import token_merging
from sdlab.models.unet import added_condition
from sdlab.models.vae_tiling import decode_tiled
from sdlab.pipelines.controlnet import ControlUnit, control_residuals
from sdlab.pipelines.img2img import truncate
from sdlab.pipelines.images import to_pil
from sdlab.pipelines.inpaint import Blend, fill_latents
from sdlab.pipelines.masks import mask_to_latent
from sdlab.pipelines.settings import Settings
from sdlab.prompts import encode_prompt_pair

StepCallback = Callable[[int, int], None]  # (step done, total steps)
PreviewCallback = Callable[[Tensor], None]  # x̂0 after each step: VP latents (1, 4, h, w); preview() makes a quick picture

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # SDXL refiner defaults (diffusers, ComfyUI)


@dataclass
class Conditioning:
    """Both halves of classifier-free guidance, batched as [negative, positive]."""

    context: Tensor  # (2, 77n, D)
    y: Tensor | None  # (2, addition_embed_dim) for SDXL, else None

    def positive(self) -> Conditioning:
        return Conditioning(self.context[1:], None if self.y is None else self.y[1:])


@dataclass(frozen=True)
class Inputs:
    """Pictures a run starts from, already at the generation size; none for text to image."""

    image: Tensor | None = None  # (1, 3, H, W) in [-1, 1]: the image to edit
    mask: Image.Image | None = None  # 'L' of the same size, 255 = repaint (already blurred)
    control: tuple[ControlUnit, ...] = ()


@dataclass
class Start:
    """Where sampling begins for one seed, and what the network sees besides x."""

    plan: Plan  # truncated to `strength` when editing
    x: Tensor  # (1, 4, h, w) in k-diffusion coordinates at plan.sigmas[0]
    blend: Blend | None = None  # ordinary model inpainting: latents kept outside the mask
    concat: Tensor | None = None  # (1, 5, h, w) inpainting model: mask + masked-image latents
    clean: Tensor | None = None  # the image latents when there are no steps to take (strength 0)


@contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """PyTorch's CPU convolutions through oneDNN or not, for the duration; the other backend flags untouched."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


class Runner:
    """A loaded model ready to make images; `generate_images` can be called many times."""

    def __init__(self, components: Components, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 onednn: bool = True):
        self.components = components
        self.config = components.config
        self.device = torch.device(device)
        self.dtype = dtype
        self.previewer = previewer_for(self.config, components.vae, self.device)  # None: previews decode with the VAE
        self.onednn = onednn  # False: CPU convolutions skip oneDNN while sampling and decoding (small networks: api._runner)
        self._vae32: torch.nn.Module | None = None  # made when a half-precision decode overflows

    @property
    def inpainting_model(self) -> bool:
        return self.config.unet.in_channels == 9

    # --- conditioning ---------------------------------------------------------------------------
    @torch.inference_mode()
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

    def _time_ids(self, s: Settings) -> tuple[Tensor, Tensor]:
        """SDXL micro-conditioning: original size, crop top-left, then target size (base) or aesthetic score (refiner)."""
        size = [float(s.height), float(s.width)]
        crop = [0.0, 0.0]
        if self.config.requires_aesthetics_score:
            return torch.tensor([size + crop + [AESTHETIC_SCORE]]), torch.tensor([size + crop + [NEGATIVE_AESTHETIC_SCORE]])
        ids = torch.tensor([size + crop + size])
        return ids, ids

    # --- the network as the sampler sees it ---------------------------------------------------------
    def _network(self, s: Settings, cond: Conditioning, plan: Plan, start: Start, control: tuple[ControlUnit, ...]):
        unet = self.components.unet
        steps = len(plan.timesteps)

        def step_of(t: Tensor) -> int:  # the step a call belongs to (a second-order sampler calls twice per step)
            return int((plan.timesteps > float(t[0]) + 1e-3).sum())

        def net(x_in: Tensor, t: Tensor, c: Conditioning, cfg: bool) -> Tensor:  # x_in (B, 4, h, w), t (B,)
            residuals = control_residuals(control, x_in.to(self.dtype), t, c.context, c.y, step_of(t), steps, cfg)
            if start.concat is not None:
                x_in = torch.cat([x_in, start.concat.expand(x_in.shape[0], -1, -1, -1)], dim=1)  # (B, 9, h, w)
            return unet(x_in.to(self.dtype), t, c.context, y=c.y, control=residuals).float()

        positive = cond.positive()
        unguided = lambda x, t: net(x, t, positive, False)  # noqa: E731
        if s.guidance <= 1.0:
            return unguided
        full = guided(lambda x, t: net(x, t, cond, True), s.guidance, s.guidance_rescale)
        if s.cfg_end >= 1.0:
            return full
        # CFG truncation: late steps mostly refine detail, where guidance changes little; they skip the
        # unconditional half of the batch and so cost half as much. By noise level: a call at or below the σ
        # of the first unguided step is unguided, a second-order sampler's corrector of the step before included
        guided_steps = math.ceil(s.cfg_end * steps)
        return lambda x, t: full(x, t) if step_of(t) < guided_steps else unguided(x, t)

    def plan(self, s: Settings) -> Plan:
        return prepare(s.sampler, self.config.schedule, s.steps, s.schedule)

    def _noise(self, s: Settings, generator: torch.Generator) -> Tensor:
        """ε (1, 4, H/f, W/f), drawn on the CPU so every device gets the same image."""
        f = self.config.vae.downscale
        shape = (1, self.config.vae.latent_channels, s.height // f, s.width // f)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    def initial_noise(self, s: Settings, plan: Plan, generator: torch.Generator) -> Tensor:
        """x_T = init_scale * ε (1, 4, H/f, W/f)."""
        return self._noise(s, generator) * plan.init_scale

    # --- where sampling starts --------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """(1, 3, H, W) in [-1, 1] -> scaled latents (1, 4, H/f, W/f): a posterior sample, as diffusers takes it."""
        vae = self.components.vae
        dtype = next(vae.parameters()).dtype
        z = vae.encode(image.to(self.device, dtype)).sample(generator)
        return vae.scale_latents(z).float()

    def start(self, s: Settings, plan: Plan, inputs: Inputs, generator: torch.Generator) -> Start:
        out = self._start(s, plan, inputs, generator)
        if self.inpainting_model and inputs.mask is None and out.concat is None:
            out.concat = self._repaint_everything(out.x)
        return out

    def _start(self, s: Settings, plan: Plan, inputs: Inputs, generator: torch.Generator) -> Start:
        if inputs.image is None:
            return Start(plan, self.initial_noise(s, plan, generator))
        strength = 1.0 if s.strength is None else s.strength
        plan = truncate(plan, strength)
        blending = inputs.mask is not None and not self.inpainting_model
        pure_noise = strength == 1.0  # x_T ignores the image; blending still keeps it outside the mask
        latents = self.encode(inputs.image, generator) if blending or not pure_noise else None
        noise = self._noise(s, generator)
        latent_size = tuple(noise.shape[-2:])
        repaint = None if inputs.mask is None else mask_to_latent(inputs.mask, latent_size, False).round()  # (1, 1, h, w)
        if latents is not None and repaint is not None:
            latents = fill_latents(latents, repaint, noise, s.fill)
        if not len(plan.timesteps):
            return Start(plan, noise, clean=latents)
        x = noise * plan.init_scale if pure_noise else latents + float(plan.sigmas[0]) * noise
        out = Start(plan, x)
        if self.inpainting_model and inputs.mask is not None:
            out.concat = self._inpainting_condition(inputs, generator)
        elif blending:
            self._advance_as_masked_image_encode(noise, generator)
            out.blend = Blend(latents, noise, 1.0 - repaint)
        return out

    def _inpainting_condition(self, inputs: Inputs, generator: torch.Generator) -> Tensor:
        """The 9-channel U-Net's extra input: the binarised mask at latent size (nearest) and the latents
        of the image with the masked area blanked (diffusers' `prepare_mask_latents`). (1, 5, h, w)"""
        keep = torch.from_numpy(np.asarray(inputs.mask) < 128)[None, None]  # (1, 1, H, W): mask / 255 < 0.5
        masked = self.encode(inputs.image * keep, generator)  # (1, 4, h, w)
        small = mask_to_latent(inputs.mask, tuple(masked.shape[-2:]), True).to(masked)  # (1, 1, h, w)
        return torch.cat([small, masked], dim=1).to(self.dtype)

    @torch.inference_mode()
    def _repaint_everything(self, x: Tensor) -> Tensor:
        """An inpainting model asked for a whole image (txt2img, or img2img without a mask): everything
        masked, the masked image blank (0 = mid-grey), as AUTOMATIC1111 conditions it. (1, 5, h, w)"""
        vae = self.components.vae
        f = self.config.vae.downscale
        dtype = next(vae.parameters()).dtype
        blank = torch.zeros(1, 3, x.shape[-2] * f, x.shape[-1] * f, device=self.device, dtype=dtype)
        latents = vae.scale_latents(vae.encode(blank).mode()).float()  # (1, 4, h, w)
        return torch.cat([torch.ones_like(latents[:, :1]), latents], dim=1).to(self.dtype)

    def _advance_as_masked_image_encode(self, noise: Tensor, generator: torch.Generator) -> None:
        """diffusers' inpainting pipeline encodes the masked image even for a 4-channel model, drawing one
        posterior sample it never uses; the same draw keeps any later noise (ancestral samplers) in step."""
        torch.randn(noise.shape, generator=generator, dtype=torch.float32)

    # --- sampling ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def denoise(
        self, s: Settings, start: Start, cond: Conditioning, generator: torch.Generator,
        on_step: StepCallback | None = None, steps_before: int = 0, total: int | None = None,
        control: tuple[ControlUnit, ...] = (), on_preview: PreviewCallback | None = None,
    ) -> Tensor:
        """Run start.plan from start.x at plan.sigmas[0] to x at plan.sigmas[-1] (k-diffusion coordinates);
        `on_step` hears (steps_before + steps done, total), total defaulting to this plan's steps, and
        `on_preview` each step's x̂0. Either may raise to stop the run."""
        plan = start.plan
        model: Denoiser = plan.denoiser(self._network(s, cond, plan, start, control), self.config.prediction_type)
        if start.blend is not None:
            model = start.blend.denoiser(model)
        total = total or steps_before + len(plan.timesteps)

        def callback(step: Step) -> None:
            if not bool(torch.isfinite(step.denoised).all()):  # stop here: no later step can mend it
                raise SdlabError(
                    f"the U-Net's prediction became NaN or infinite at step {steps_before + step.i + 1} of {total}; "
                    "in fp16 try --dtype bf16 or fp32, or a lower guidance"
                )
            if on_step is not None:
                on_step(steps_before + step.i + 1, total)
            if on_preview is not None:
                on_preview(step.denoised)

        options = {} if s.eta is None else {"eta": s.eta}
        if plan.sampler == "plms":  # PLMS combines raw network outputs, as diffusers' PNDM does
            options["mix"] = self.config.prediction_type
        with onednn(self.onednn):
            return plan.sample(model, start.x, noise=plan.noise_sampler(start.x, generator), callback=callback, **options)

    def finish(self, start: Start, x: Tensor) -> Tensor:
        """k-diffusion x at the plan's last σ -> VP latents, the known latents put back outside the mask."""
        latents = start.plan.to_vp(x)
        return latents if start.blend is None else start.blend.final(latents)

    @torch.inference_mode()
    def decode(self, latents: Tensor, tiled: bool = False) -> list[Image.Image]:
        """Latents -> images. Non-finite latents are refused; a half-precision VAE that overflows (the known
        black-image failure) decodes again in fp32, with a warning; nothing non-finite becomes a picture."""
        if not bool(torch.isfinite(latents).all()):
            raise SdlabError("sampling produced NaN or infinite latents, so there is no image; in fp16 try "
                             "--dtype bf16 or fp32, or a lower guidance")
        vae = self.components.vae
        dtype = next(vae.parameters()).dtype  # fp32 when an fp16 pipeline upcasts the VAE
        image = self._decode(vae, latents, dtype, tiled)  # (B, 3, H, W)
        if not bool(torch.isfinite(image).all()) and dtype in HALF_DTYPES:
            warnings.warn(f"the VAE overflowed in {str(dtype).removeprefix('torch.')}; decoded again in fp32",
                          SdlabWarning, stacklevel=2)
            image = self._decode(self._fp32_vae(), latents, torch.float32, tiled)
        if not bool(torch.isfinite(image).all()):
            raise SdlabError("the VAE decoded NaN or infinite values, so there is no image (are its weights damaged?)")
        return to_pil(image)

    def _decode(self, vae: torch.nn.Module, latents: Tensor, dtype: torch.dtype, tiled: bool) -> Tensor:
        z = vae.unscale_latents(latents).to(dtype)
        # tiled: the module itself (an OpenVINO-wrapped VAE keeps it as .eager_module), its GroupNorms patched
        with onednn(self.onednn):  # as while sampling: a frame decoded then matches the image decoded now
            return decode_tiled(getattr(vae, "eager_module", vae), z) if tiled else vae.decode(z)  # (B, 3, H, W)

    def _fp32_vae(self) -> torch.nn.Module:
        """An fp32 copy of the VAE, made the first time a half-precision decode overflows."""
        if self._vae32 is None:
            self._vae32 = copy.deepcopy(getattr(self.components.vae, "eager_module", self.components.vae)).float()
        return self._vae32

    @torch.inference_mode()
    def preview(self, latents: Tensor) -> list[Image.Image]:
        """x̂0 latents (B, 4, h, w) -> quick pictures at the image's size, through the model's cheap previewer
        (sdlab.models.preview), or the VAE decoder for a model without one."""
        if self.previewer is None:
            return self.decode(latents)
        f = self.config.vae.downscale
        size = (latents.shape[-1] * f, latents.shape[-2] * f)
        images = to_pil(self.previewer(latents.to(self.device, torch.float32)))  # (B, 3, h or f·h, w or f·w)
        return [im if im.size == size else im.resize(size, Image.NEAREST) for im in images]

    def _modules(self, control: tuple[ControlUnit, ...]) -> list[torch.nn.Module]:
        return [self.components.unet, self.components.vae, *(u.net for u in control)]

    def generate_images(
        self, s: Settings, on_step: StepCallback | None = None, refiner: Runner | None = None,
        inputs: Inputs = Inputs(), on_preview: PreviewCallback | None = None,
    ) -> list[tuple[int, Image.Image]]:
        """(seed, image) for each image of the batch; `s` must be resolved. With a refiner, this model
        denoises down to `s.refiner_switch` and the refiner takes the latents from there."""
        if refiner is not None and (inputs.image is not None or inputs.control):
            raise SdlabError("a refiner hand-off works from text only; refine an image with img2img on the refiner")
        cond = self.condition(s)
        refiner_cond = None if refiner is None else refiner.condition(s)
        out = []
        plan = self.plan(s)
        modules = self._modules(inputs.control) + ([] if refiner is None else refiner._modules(()))
        merging = token_merging(self.components.unet, s.token_merging, enabled=s.token_merging > 0)
        with circular_padding(*modules, enabled=s.tiling), merging:
            for i in range(s.batch):
                seed = s.seed + i
                generator = torch.Generator().manual_seed(seed)
                start = self.start(s, plan, inputs, generator)
                if start.clean is not None:  # nothing to denoise: the image itself, through the VAE
                    image = self.decode(start.clean, s.vae_tiling)
                elif refiner is None:
                    x = self.denoise(s, start, cond, generator, on_step, control=inputs.control, on_preview=on_preview)
                    image = self.decode(self.finish(start, x), s.vae_tiling)
                else:
                    image = self._refine(s, start, cond, refiner, refiner_cond, generator, on_step, on_preview)
                out.append((seed, image[0]))
        return out

    def _refine(self, s, start, cond, refiner, refiner_cond, generator, on_step, on_preview) -> list[Image.Image]:
        train_steps = self.config.schedule.num_train_timesteps
        first, second = split_plan(start.plan, refiner.plan(s), s.refiner_switch, train_steps)
        x = start.x
        if len(first.timesteps):
            x = self.denoise(s, replace(start, plan=first), cond, generator, on_step, total=s.steps, on_preview=on_preview)
        if len(second.timesteps):
            x = refiner.denoise(s, Start(second, x), refiner_cond, generator, on_step, len(first.timesteps), s.steps,
                                on_preview=on_preview)
        return refiner.decode(second.to_vp(x), s.vae_tiling)


def split_plan(base: Plan, refiner: Plan, switch: float, train_steps: int) -> tuple[Plan, Plan]:
    """Hand-off at a fraction of the noise schedule, as diffusers' `denoising_end`/`denoising_start`:
    the base keeps the timesteps t >= round(T - switch * T), the refiner runs the rest."""
    cutoff = round(train_steps - switch * train_steps)
    k = int((base.timesteps >= cutoff).sum())
    first = replace(base, sigmas=base.sigmas[: k + 1], timesteps=base.timesteps[:k])
    second = replace(refiner, sigmas=refiner.sigmas[k:], timesteps=refiner.timesteps[k:])
    return first, second
