"""Progress previewers on disk, and the one a model gets (the modules: sdlab.models.preview).

A learned previewer's file holds the network's weights (fp16), its config as JSON metadata, and the
signature of the VAE it was distilled from; it is used only beside that VAE, since
`sdlab train --preset shapes-64` makes a model of the same name with a VAE of its own.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn

from sdlab.checkpoints.formats import read_weights, write_safetensors
from sdlab.config import ModelConfig
from sdlab.errors import CheckpointError
from sdlab.models.preview import LinearPreview, PreviewNet, PreviewNetConfig, linear_factors, same_vae, vae_signature

CONFIG_KEY = "sdlab_preview_config"
SIGNATURE_TENSOR = "vae_signature"
SHIPPED = {"shapes-64": "shapes-64-preview.safetensors"}  # model config name -> file in sdlab/data


def save_preview_net(net: PreviewNet, signature: Tensor, path: Path, extra: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().half() for k, v in net.state_dict().items()}  # half the bytes
    tensors[SIGNATURE_TENSOR] = signature.float()
    write_safetensors(path, tensors, {CONFIG_KEY: json.dumps(asdict(net.cfg)), **(extra or {})})


def load_preview_net(path: Path) -> tuple[PreviewNet, Tensor]:
    """The network and the signature of the VAE it was fitted to."""
    tensors, metadata = read_weights(path)
    cfg = PreviewNetConfig(**json.loads(metadata[CONFIG_KEY]))
    signature = tensors.pop(SIGNATURE_TENSOR)
    net = PreviewNet(cfg)
    net.load_state_dict(tensors, strict=True)
    return net.eval().requires_grad_(False), signature


def shipped_file(name: str) -> Path:
    return Path(str(resources.files("sdlab.data").joinpath(name)))


def previewer_for(config: ModelConfig, vae: nn.Module, device: torch.device | str = "cpu") -> nn.Module | None:
    """A cheap latents -> image module for this model, or None when it has none (use the VAE decoder)."""
    if config.name in SHIPPED:
        path = shipped_file(SHIPPED[config.name])
        if not path.is_file():
            return None
        try:
            net, fitted = load_preview_net(path)
        except (CheckpointError, KeyError, ValueError, TypeError, RuntimeError) as e:  # a preview never stops a load
            warnings.warn(f"{path}: unreadable previewer ({e}); previews will decode with the VAE", stacklevel=2)
            return None
        return net.to(device) if same_vae(vae_signature(vae), fitted) else None
    factors = linear_factors(config)
    return None if factors is None else LinearPreview(factors).to(device)
