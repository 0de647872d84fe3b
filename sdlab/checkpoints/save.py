"""Write a loaded model as an original-layout single file or as a diffusers folder.

Both are written atomically: a single file through a temporary file and one rename, a folder
assembled beside its target and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sdlab import __version__
from sdlab.checkpoints import detect as det
from sdlab.checkpoints import formats
from sdlab.checkpoints.keymaps.clip import clip_to_open_clip, text_encoder_config_to_diffusers
from sdlab.checkpoints.keymaps.unet import unet_config_to_diffusers, unet_to_diffusers
from sdlab.checkpoints.keymaps.vae import vae_config_to_diffusers, vae_to_diffusers
from sdlab.checkpoints.load import CONFIG_METADATA_KEY, Components
from sdlab.config import to_dict
from sdlab.errors import CheckpointError
from sdlab.tokenizer import write_transformers_files

DIFFUSERS_VERSION = "0.42.1"  # the format version we write; diffusers reads older and newer


def _state(module: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return formats.cast_all(module.state_dict(), dtype)


def single_file_state(comps: Components, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor under its original single-file key (ldm / sgm layout)."""
    cfg = comps.config
    out = formats.with_prefix(_state(comps.unet, dtype), det.UNET_PREFIX)
    out.update(formats.with_prefix(_state(comps.vae, dtype), det.VAE_PREFIX))
    for spec, where, encoder in zip(cfg.text, det.TEXT_PREFIXES[cfg.family], comps.text_encoders):
        state = _state(encoder, dtype)
        if where.layout == "open_clip":
            state = clip_to_open_clip(state, spec.encoder)
        out.update(formats.with_prefix(state, where.prefix))
    return out


def save_single_file(comps: Components, path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: sdlab writes single files as .safetensors only")
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(to_dict(comps.config)), "sdlab_version": __version__}
    formats.write_safetensors(path, single_file_state(comps, formats.parse_dtype(dtype)), metadata)
    return path


# --- diffusers folders ---------------------------------------------------------------------------
PIPELINE_CLASS = {
    ("sd1", False): "StableDiffusionPipeline",
    ("sd2", False): "StableDiffusionPipeline",
    ("sd1", True): "StableDiffusionInpaintPipeline",
    ("sd2", True): "StableDiffusionInpaintPipeline",
    ("sdxl", False): "StableDiffusionXLPipeline",
    ("sdxl", True): "StableDiffusionXLInpaintPipeline",
    ("sdxl-refiner", False): "StableDiffusionXLImg2ImgPipeline",
}


def _model_index(comps: Components) -> dict:
    cfg = comps.config
    none = [None, None]
    index = {
        "_class_name": PIPELINE_CLASS[(cfg.family, cfg.inpainting)],
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", comps.scheduler_config.get("_class_name", "PNDMScheduler")],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for name, spec in zip(_text_names(comps), cfg.text):
        cls = "CLIPTextModelWithProjection" if spec.encoder.projection_dim else "CLIPTextModel"
        index[name] = ["transformers", cls]
        index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    if cfg.family.startswith("sdxl"):
        index["force_zeros_for_empty_prompt"] = cfg.force_zeros_for_empty_prompt
        index.setdefault("text_encoder", none)
        index.setdefault("tokenizer", none)
        if cfg.family == "sdxl-refiner":
            index["requires_aesthetics_score"] = cfg.requires_aesthetics_score
    else:
        index.update(safety_checker=none, feature_extractor=none, requires_safety_checker=False)
    return index


def _text_names(comps: Components) -> list[str]:
    return [n for n in comps.modules() if n.startswith("text_encoder")]


def _write_component(folder: Path, config: dict, weights: dict[str, torch.Tensor], stem: str) -> None:
    formats.write_json(folder / "config.json", config)
    formats.write_safetensors(folder / f"{stem}.safetensors", weights, {"format": "pt"})


def save_diffusers(comps: Components, folder: str | os.PathLike, dtype: torch.dtype | str | None = None) -> Path:
    """A folder diffusers' `from_pretrained` reads: model_index.json and one subfolder per component."""
    folder = Path(folder)
    dtype = formats.parse_dtype(dtype)
    cfg = comps.config
    with formats.atomic_folder(folder) as tmp:
        formats.write_json(tmp / "model_index.json", _model_index(comps))
        unet_cfg = {
            "_class_name": "UNet2DConditionModel",
            **unet_config_to_diffusers(cfg.unet),
            "sample_size": cfg.default_size // cfg.vae.downscale,
        }
        _write_component(tmp / "unet", unet_cfg, unet_to_diffusers(_state(comps.unet, dtype), cfg.unet), "diffusion_pytorch_model")
        vae_cfg = {"_class_name": "AutoencoderKL", **vae_config_to_diffusers(cfg.vae), "sample_size": cfg.default_size}
        _write_component(tmp / "vae", vae_cfg, vae_to_diffusers(_state(comps.vae, dtype), cfg.vae), "diffusion_pytorch_model")
        for name, spec, encoder in zip(_text_names(comps), cfg.text, comps.text_encoders):
            _write_component(tmp / name, text_encoder_config_to_diffusers(spec.encoder), _state(encoder, dtype), "model")
            write_transformers_files(tmp / name.replace("text_encoder", "tokenizer"), spec.tokenizer)
        formats.write_json(tmp / "scheduler" / "scheduler_config.json", comps.scheduler_config)
    return folder
