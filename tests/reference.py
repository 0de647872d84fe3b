"""Reference (diffusers / transformers) counterparts of sdlab models, for parity tests only."""

from __future__ import annotations

from pathlib import Path

import torch

from sdlab.checkpoints.keymaps.clip import text_encoder_config_to_diffusers
from sdlab.checkpoints.keymaps.unet import unet_config_to_diffusers
from sdlab.checkpoints.keymaps.vae import vae_config_to_diffusers
from sdlab.config import ModelConfig
from sdlab.tokenizer import write_transformers_files


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add seeded noise to every parameter, so norms, biases and zero-initialised layers all differ
    and a key mapped to the wrong place cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def perturb_norms_(module: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Move every norm weight and bias off its identity initialisation (from the global RNG), so a
    swapped norm shows in a parity test."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.add_(scale * torch.randn_like(p))
    return module


def ours_from(factory, convert, reference: torch.nn.Module, cfg) -> torch.nn.Module:
    """sdlab's `factory(cfg)` holding a diffusers module's weights through the key map `convert(state, cfg)`."""
    with torch.device("meta"):
        ours = factory(cfg)
    ours.load_state_dict(convert(reference.state_dict(), cfg), strict=True, assign=True)
    return ours.eval()


def diffusers_pipeline(cfg: ModelConfig, seed: int = 0):
    """A diffusers pipeline with random weights whose configs are sdlab's `cfg`."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    f = cfg.vae.downscale
    unet = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(cfg.unet), sample_size=cfg.default_size // f)
    vae = diffusers.AutoencoderKL(**vae_config_to_diffusers(cfg.vae), sample_size=cfg.default_size)
    encoders, tokenizers = [], []
    tmp = Path(__import__("tempfile").mkdtemp())
    for i, spec in enumerate(cfg.text):
        hf_cfg = transformers.CLIPTextConfig(**text_encoder_config_to_diffusers(spec.encoder))
        cls = transformers.CLIPTextModelWithProjection if spec.encoder.projection_dim else transformers.CLIPTextModel
        encoders.append(perturb_(cls(hf_cfg).eval(), seed + 10 + i))
        write_transformers_files(tmp / f"tok{i}", spec.tokenizer)
        tokenizers.append(transformers.CLIPTokenizer.from_pretrained(tmp / f"tok{i}"))
    perturb_(unet, seed + 1)
    perturb_(vae, seed + 2)
    sched = dict(
        num_train_timesteps=cfg.schedule.num_train_timesteps,
        beta_start=cfg.schedule.beta_start,
        beta_end=cfg.schedule.beta_end,
        beta_schedule=cfg.schedule.beta_schedule,
        prediction_type=cfg.schedule.prediction_type,
        timestep_spacing=cfg.schedule.timestep_spacing,
        steps_offset=cfg.schedule.steps_offset,
    )
    if cfg.family == "sdxl":
        cls = diffusers.StableDiffusionXLInpaintPipeline if cfg.inpainting else diffusers.StableDiffusionXLPipeline
        return cls(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1], unet=unet, scheduler=diffusers.EulerDiscreteScheduler(**sched),
            force_zeros_for_empty_prompt=cfg.force_zeros_for_empty_prompt,
        )
    if cfg.family == "sdxl-refiner":
        return diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=encoders[0], tokenizer=None, tokenizer_2=tokenizers[0],
            unet=unet, scheduler=diffusers.EulerDiscreteScheduler(**sched), requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )
    cls = diffusers.StableDiffusionInpaintPipeline if cfg.inpainting else diffusers.StableDiffusionPipeline
    return cls(
        vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet,
        scheduler=diffusers.PNDMScheduler(**sched, skip_prk_steps=True), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def text_encoders_of(pipe) -> list:
    return [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e is not None]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _twins() -> dict:
    import diffusers

    return {
        "ddim": (diffusers.DDIMScheduler, {}),
        "ddpm": (diffusers.DDPMScheduler, {}),
        "plms": (diffusers.PNDMScheduler, {"skip_prk_steps": True}),
        "lms": (diffusers.LMSDiscreteScheduler, {}),
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
        "heun": (diffusers.HeunDiscreteScheduler, {}),
        "dpm2": (diffusers.KDPM2DiscreteScheduler, {}),
        "dpm2_a": (diffusers.KDPM2AncestralDiscreteScheduler, {}),
        "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "dpmpp_2m_sde": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
        "unipc": (diffusers.UniPCMultistepScheduler, {"solver_order": 2, "solver_type": "bh2"}),
    }


# sdlab sampler -> (diffusers scheduler class, extra config); the base config is the model's own.
TWINS = _twins()


def use_twin(pipe, sampler: str, schedule: str = "default") -> None:
    """Give a diffusers pipeline the scheduler that sdlab's `sampler` reproduces, on the model's own config."""
    cls, extra = TWINS[sampler]
    common = {"clip_sample": False, "set_alpha_to_one": False, "use_karras_sigmas": schedule == "karras"}
    # `_use_default_values` would make from_config drop our explicit set_alpha_to_one=False again
    base = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
    pipe.scheduler = cls.from_config({**base, **common, **extra})


def smooth_picture(size: int, seed: int = 0):
    """A smooth, seeded RGB picture (gradients and a disc) of `size` x `size`, as a PIL image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    c = rng.uniform(0.2, 0.8, size=(3, 3))
    rgb = np.stack([c[i, 0] + c[i, 1] * x - c[i, 2] * y for i in range(3)], axis=-1)
    cx, cy, r = rng.uniform(0.3, 0.7, size=3) * [1, 1, 0.5]
    rgb[(x - cx) ** 2 + (y - cy) ** 2 < r**2] = rng.uniform(0, 1, size=3)
    return Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8))
