"""What a single-file checkpoint is, read from its keys and shapes.

The signals, in the order they decide:

family      text-encoder key prefixes first —
              `conditioner.embedders.1.model.*` (OpenCLIP bigG beside CLIP-L)      -> sdxl
              `conditioner.embedders.0.model.*` and U-Net `label_emb.*`            -> sdxl-refiner
              `conditioner.embedders.0.model.*` without `label_emb` (sgm SD2)      -> sd2
              `cond_stage_model.model.*` (OpenCLIP ViT-H)                          -> sd2
              `cond_stage_model.transformer.*` (OpenAI CLIP-L)                     -> sd1
            a file with no text encoder falls back to the U-Net's cross-attention width
            (`attn2.to_k.weight` columns: 768 sd1, 1024 sd2, 2048 sdxl, 1280 sdxl-refiner).
inpainting  `model.diffusion_model.input_blocks.0.0.weight` has 9 input channels.
prediction  cannot be read from weights for SD 2.x; in order: the caller's choice, a `.yaml`
            beside the file (`parameterization: "v"`), a `v_pred` key, `global_step` 875000
            (SD 2.0-base, epsilon), inpainting (epsilon), and last the spread of
            `output_blocks.11.1.transformer_blocks.0.norm1.bias` (std > 0.09: v), else the SD 2.1
            default, v-prediction. SD 1.x and SDXL are epsilon unless a `v_pred` key says v.
EMA         `model_ema.*` keys covering every U-Net weight replace the training weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlab.config import Family, PredictionType
from sdlab.errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
CROSS_WIDTH_FAMILY: dict[int, Family] = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
V_STD_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_STD_THRESHOLD = 0.09
SD20_BASE_GLOBAL_STEP = 875000


@dataclass(frozen=True)
class TextPrefix:
    """Where one text encoder lives in a single file, and in which layout."""

    prefix: str
    layout: str  # "transformers" (HF CLIP names) or "open_clip"


TEXT_PREFIXES: dict[Family, tuple[TextPrefix, ...]] = {
    "sd1": (TextPrefix("cond_stage_model.transformer.", "transformers"),),
    "sd2": (TextPrefix("cond_stage_model.model.", "open_clip"),),
    "sdxl": (
        TextPrefix("conditioner.embedders.0.transformer.", "transformers"),
        TextPrefix("conditioner.embedders.1.model.", "open_clip"),
    ),
    "sdxl-refiner": (TextPrefix("conditioner.embedders.0.model.", "open_clip"),),
}
SGM_SD2_TEXT = (TextPrefix("conditioner.embedders.0.model.", "open_clip"),)


@dataclass(frozen=True)
class Detection:
    family: Family
    inpainting: bool
    prediction_type: PredictionType
    prediction_reason: str
    text_prefixes: tuple[TextPrefix, ...]


def _has(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_family(state: Mapping[str, torch.Tensor], source: str) -> tuple[Family, tuple[TextPrefix, ...]]:
    keys = state.keys()
    if not _has(keys, UNET_PREFIX):
        raise CheckpointError(
            f"{source}: no Stable Diffusion U-Net inside (no '{UNET_PREFIX}*' keys); "
            "is this a LoRA, a VAE or another kind of model?"
        )
    adm = _has(keys, UNET_PREFIX + "label_emb.")
    if _has(keys, "conditioner.embedders.1.model."):
        return "sdxl", TEXT_PREFIXES["sdxl"]
    if _has(keys, "conditioner.embedders.0.model."):
        return ("sdxl-refiner", TEXT_PREFIXES["sdxl-refiner"]) if adm else ("sd2", SGM_SD2_TEXT)
    if _has(keys, "cond_stage_model.model."):
        return "sd2", TEXT_PREFIXES["sd2"]
    if _has(keys, "cond_stage_model.transformer."):
        return "sd1", TEXT_PREFIXES["sd1"]
    width = next((v.shape[1] for k, v in state.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")), None)
    if width in CROSS_WIDTH_FAMILY:
        return CROSS_WIDTH_FAMILY[width], ()
    raise CheckpointError(f"{source}: cannot tell the model family (no text encoder keys, cross-attention width {width})")


def detect_inpainting(state: Mapping[str, torch.Tensor]) -> bool:
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    return conv_in is not None and conv_in.shape[1] == 9


def _yaml_says_v(path: Path | None) -> bool | None:
    """A1111 convention: `model.yaml` beside `model.safetensors` holds the original config."""
    if path is None:
        return None
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        return None
    return re.search(r"parameterization:\s*['\"]?v['\"]?\s*$", yaml.read_text(errors="replace"), re.M) is not None


def detect_prediction(
    state: Mapping[str, torch.Tensor], family: Family, inpainting: bool, extras: Mapping, path: Path | None
) -> tuple[PredictionType, str]:
    yaml_v = _yaml_says_v(path)
    if yaml_v is not None:
        return ("v_prediction" if yaml_v else "epsilon"), f"{path.with_suffix('.yaml').name}"
    if "v_pred" in state:
        return "v_prediction", "'v_pred' key"
    if family != "sd2":
        return "epsilon", f"{family} models predict noise"
    if inpainting:
        return "epsilon", "SD 2 inpainting models predict noise"
    if extras.get("global_step") == SD20_BASE_GLOBAL_STEP:
        return "epsilon", f"global_step {SD20_BASE_GLOBAL_STEP} (SD 2.0-base)"
    bias = state.get(V_STD_KEY)
    if bias is not None and bias.numel() >= 320:
        std = bias.float().std(unbiased=False).item()
        return ("v_prediction" if std > V_STD_THRESHOLD else "epsilon"), f"norm1.bias spread {std:.3f}"
    return "v_prediction", "SD 2.x default (v-prediction); pass a prediction type to override"


def detect(
    state: Mapping[str, torch.Tensor], *, source: str, extras: Mapping | None = None, path: Path | None = None
) -> Detection:
    family, text = detect_family(state, source)
    inpainting = detect_inpainting(state)
    prediction, reason = detect_prediction(state, family, inpainting, extras or {}, path)
    return Detection(family, inpainting, prediction, reason, text)


def ema_key(unet_key: str) -> str:
    """ldm's LitEma names: `model.diffusion_model.a.b.0.w` -> `model_ema.diffusion_modelab0w`."""
    return EMA_PREFIX + "".join(unet_key.split(".")[1:])


def prefer_ema(state: dict[str, torch.Tensor]) -> bool:
    """Swap in EMA U-Net weights when the file has them for every U-Net tensor; drop the rest."""
    unet_keys = [k for k in state if k.startswith(UNET_PREFIX)]
    use = bool(unet_keys) and all(ema_key(k) in state for k in unet_keys)
    if use:
        for k in unet_keys:
            state[k] = state.pop(ema_key(k))
    for k in [k for k in state if k.startswith(EMA_PREFIX)]:
        del state[k]
    return use
