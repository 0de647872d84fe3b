"""Load a whole model — U-Net, VAE, text encoders, tokenizers — from what people have:
a diffusers folder, an original single file (.safetensors / .ckpt), or a Hugging Face repo id.

Every module is built on the meta device and receives the file's tensors by assignment, so
weights are read once, straight into the target dtype and device.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from sdlab.checkpoints import detect as det
from sdlab.checkpoints import formats
from sdlab.checkpoints.keymaps import check_shapes
from sdlab.checkpoints.keymaps.clip import (
    clip_from_open_clip,
    clip_from_transformers,
    text_encoder_config_from_diffusers,
)
from sdlab.checkpoints.keymaps.unet import unet_config_from_diffusers, unet_from_diffusers
from sdlab.checkpoints.keymaps.vae import vae_config_from_diffusers, vae_from_diffusers
from sdlab.config import (
    PRESETS,
    ModelConfig,
    ScheduleConfig,
    TextConditioner,
    TokenizerConfig,
    preset,
)
from sdlab.errors import CheckpointError
from sdlab.models.clip import CLIPTextModel
from sdlab.models.empty import empty_modules
from sdlab.models.unet import UNet
from sdlab.models.vae import AutoencoderKL
from sdlab.tokenizer import Tokenizer

CONFIG_METADATA_KEY = "sdlab_config"
TEXT_COMPONENT_NAMES = {"sdxl": ("text_encoder", "text_encoder_2"), "sdxl-refiner": ("text_encoder_2",)}


@dataclass
class Components:
    """A loaded model: its config and its networks, ready for a pipeline."""

    config: ModelConfig
    unet: UNet
    vae: AutoencoderKL
    text_encoders: tuple[CLIPTextModel, ...]
    tokenizers: tuple[Tokenizer, ...]
    source: str
    scheduler_config: dict = field(default_factory=dict)  # the diffusers scheduler config, when the source had one

    def modules(self) -> dict[str, nn.Module]:
        names = TEXT_COMPONENT_NAMES.get(self.config.family, ("text_encoder",))
        return {"unet": self.unet, "vae": self.vae, **dict(zip(names, self.text_encoders))}


# --- building modules from checked state dicts ---------------------------------------------------
def build(factory: Callable[[], nn.Module], state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Construct on the meta device, check every key and shape, then adopt the tensors as parameters."""
    with empty_modules():
        module = factory()
    check_shapes(state, {k: tuple(v.shape) for k, v in module.state_dict().items()}, source=source)
    module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: {len(left)} tensors were never loaded ({left[0]}, …)")
    return module.eval().requires_grad_(False)


def _tokenizers(config: ModelConfig) -> tuple[Tokenizer, ...]:
    return tuple(Tokenizer(t.tokenizer) for t in config.text)


# --- model references ----------------------------------------------------------------------------
def resolve(model: str | Path) -> Path:
    """A local file or folder as it is; otherwise a Hugging Face repo id fetched into its usual cache."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    text = str(model)
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or Path(text).suffix in (".safetensors", ".ckpt"):
        raise CheckpointError(f"{model}: no such file or folder")
    return _fetch_from_hub(text)


def _fetch_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id}: not a local path, and fetching from the Hugging Face hub needs `pip install huggingface-hub`; "
            "or download the model elsewhere and pass its local folder or file"
        ) from None
    patterns = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=["*.fp16.*", "*non_ema*"]))
    except Exception as e:  # noqa: BLE001 — any hub failure becomes one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{repo_id}: could not fetch from the Hugging Face hub ({reason}); "
            "download it where the hub is reachable and pass its local folder or file instead"
        ) from None


def load(
    model: str | Path,
    *,
    dtype: torch.dtype | str | None = torch.float32,
    device: torch.device | str = "cpu",
    config: ModelConfig | str | None = None,
    prediction_type: str | None = None,
    variant: str | None = None,
) -> Components:
    """Load any supported model reference. `config` (a preset name or ModelConfig) overrides detection
    for single files; `prediction_type` overrides what the file says or detection guesses."""
    path = resolve(model)
    dtype = formats.parse_dtype(dtype)
    cfg = preset(config) if isinstance(config, str) else config
    if path.is_dir():
        comps = load_diffusers(path, dtype=dtype, device=device, variant=variant)
    else:
        comps = load_single_file(path, dtype=dtype, device=device, config=cfg)
    if prediction_type is not None:
        comps.config = replace(comps.config, schedule=replace(comps.config.schedule, prediction_type=prediction_type))
    return comps


# --- single files --------------------------------------------------------------------------------
def load_single_file(
    path: Path, *, dtype=torch.float32, device="cpu", config: ModelConfig | None = None
) -> Components:
    source = str(path)
    state, extras = formats.read_weights(path, dtype=dtype, device=device)
    detection = det.detect(state, source=source, extras=extras, path=path)
    det.prefer_ema(state)
    cfg = config or formats.config_from_metadata(ModelConfig, extras, CONFIG_METADATA_KEY, source) or _preset_for(detection)
    if cfg.family != detection.family:
        raise CheckpointError(
            f"{source}: this is an {detection.family} checkpoint, but the {cfg.name} config ({cfg.family}) was asked for"
        )
    if config is None and cfg.schedule.prediction_type != detection.prediction_type and not extras.get(CONFIG_METADATA_KEY):
        cfg = replace(cfg, schedule=replace(cfg.schedule, prediction_type=detection.prediction_type))
    unet = build(lambda: UNet(cfg.unet), formats.strip_prefix(state, det.UNET_PREFIX), f"{source} (U-Net)")
    vae_prefix = det.VAE_PREFIX if formats.any_key(state, det.VAE_PREFIX) else "vae."
    # ldm deletes the VAE's training loss (LPIPS, discriminator) before saving; some files still carry it
    vae_state = {k: v for k, v in formats.strip_prefix(state, vae_prefix).items() if not k.startswith("loss.")}
    if not vae_state:
        raise CheckpointError(f"{source}: no VAE inside (no '{det.VAE_PREFIX}*' keys); pass a full checkpoint")
    vae = build(lambda: AutoencoderKL(cfg.vae), vae_state, f"{source} (VAE)")
    encoders = []
    for spec, where in zip(cfg.text, detection.text_prefixes or ()):
        raw = formats.strip_prefix(state, where.prefix)
        convert = clip_from_transformers if where.layout == "transformers" else clip_from_open_clip
        encoders.append(
            build(lambda: CLIPTextModel(spec.encoder), convert(raw, spec.encoder), f"{source} (text encoder {where.prefix})")
        )
    if len(encoders) != len(cfg.text):
        raise CheckpointError(f"{source}: the text encoder is missing; sdlab needs a full checkpoint")
    return Components(cfg, unet, vae, tuple(encoders), _tokenizers(cfg), source, _schedule_to_diffusers(cfg))


def _preset_for(d: det.Detection) -> ModelConfig:
    if d.family == "sd1":
        return PRESETS["sd15-inpainting" if d.inpainting else "sd15"]
    if d.family == "sd2":
        if d.inpainting:
            return PRESETS["sd2-inpainting"]
        return PRESETS["sd21" if d.prediction_type == "v_prediction" else "sd21-base"]
    if d.family == "sdxl":
        return PRESETS["sdxl-inpainting" if d.inpainting else "sdxl"]
    return PRESETS["sdxl-refiner"]


# --- diffusers folders ---------------------------------------------------------------------------
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None


def component_weights_file(folder: Path, variant: str | None) -> Path:
    """The weights of one diffusers component folder: safetensors before .bin, the requested
    variant (e.g. fp16) when given, else full precision, else whatever variant is there."""
    stems = ("diffusion_pytorch_model", "model", "pytorch_model")
    tags = ([f".{variant}"] if variant else []) + ["", ".fp16"]
    for tag in tags:
        for ext in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"):
            for stem in stems:
                candidate = folder / f"{stem}{tag}{ext}"
                if candidate.is_file():
                    return candidate
    raise CheckpointError(f"{folder}: no weights file (diffusion_pytorch_model.safetensors, model.safetensors, *.bin)")


def _component_state(folder: Path, variant, dtype, device) -> dict[str, torch.Tensor]:
    file = component_weights_file(folder, variant)
    if file.name.endswith(".index.json"):
        return formats.read_sharded(file, dtype=dtype, device=device)
    return formats.read_weights(file, dtype=dtype, device=device)[0]


def _pad_id(tokenizer_dir: Path, default: int) -> int:
    """The pad token the folder's tokenizer uses (special_tokens_map.json wins over tokenizer_config.json)."""
    pad = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = tokenizer_dir / name
        if f.is_file():
            value = _read_json(f).get("pad_token", pad)
            pad = value.get("content") if isinstance(value, dict) else value
    return {"<|endoftext|>": 49407, "!": 0, None: default}.get(pad, default)


def _max_length(tokenizer_dir: Path, positions: int) -> int:
    """The tokenizer's model_max_length, at most the encoder's positions (77 for every released model)."""
    f = tokenizer_dir / "tokenizer_config.json"
    value = _read_json(f).get("model_max_length") if f.is_file() else None
    return min(value, positions) if isinstance(value, int) and value > 0 else positions


def text_components(folder: Path) -> list[str]:
    """The text encoders model_index.json names (not null) and the folder holds, in config order."""
    index = _read_json(folder / "model_index.json")
    return [n for n in TEXT_COMPONENTS if (index.get(n) or [None])[0] and (folder / n).is_dir()]


def model_config_from_diffusers(folder: Path) -> tuple[ModelConfig, dict]:
    present = text_components(folder)
    index = _read_json(folder / "model_index.json")
    unet_json = _read_json(folder / "unet" / "config.json")
    unet = unet_config_from_diffusers(unet_json)
    vae = vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"))
    encoders = [text_encoder_config_from_diffusers(_read_json(folder / n / "config.json")) for n in present]
    if present == ["text_encoder", "text_encoder_2"]:
        family = "sdxl"
    elif present == ["text_encoder_2"]:
        family = "sdxl-refiner"
    elif present == ["text_encoder"]:
        family = "sd1" if encoders[0].activation == "quick_gelu" else "sd2"
    else:
        raise CheckpointError(f"{folder}: model_index.json names no text encoder sdlab knows ({', '.join(present) or 'none'})")
    xl = family.startswith("sdxl")
    text = []
    for name, enc in zip(present, encoders):
        tok_dir = folder / name.replace("text_encoder", "tokenizer")
        default_pad = 49407 if enc.activation == "quick_gelu" else 0
        tok = TokenizerConfig(pad_token_id=_pad_id(tok_dir, default_pad), max_length=_max_length(tok_dir, enc.max_positions))
        text.append(TextConditioner(enc, tok, hidden_layer=-2 if xl else -1, final_layer_norm=not xl))
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json") if (folder / "scheduler").is_dir() else {}
    cfg = ModelConfig(
        name=folder.name,
        family=family,
        unet=unet,
        vae=vae,
        text=tuple(text),
        schedule=_schedule_from_diffusers(scheduler),
        default_size=int(unet_json.get("sample_size", 64)) * vae.downscale,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
    )
    return cfg, scheduler


def load_diffusers(folder: Path, *, dtype=torch.float32, device="cpu", variant: str | None = None) -> Components:
    cfg, scheduler = model_config_from_diffusers(folder)
    unet_state = unet_from_diffusers(_component_state(folder / "unet", variant, dtype, device), cfg.unet)
    unet = build(lambda: UNet(cfg.unet), unet_state, f"{folder / 'unet'}")
    vae_state = vae_from_diffusers(_component_state(folder / "vae", variant, dtype, device), cfg.vae)
    vae = build(lambda: AutoencoderKL(cfg.vae), vae_state, f"{folder / 'vae'}")
    names = text_components(folder)
    encoders = tuple(
        build(
            lambda: CLIPTextModel(spec.encoder),
            clip_from_transformers(_component_state(folder / name, variant, dtype, device), spec.encoder),
            f"{folder / name}",
        )
        for name, spec in zip(names, cfg.text)
    )
    return Components(cfg, unet, vae, encoders, _tokenizers(cfg), str(folder), scheduler)


# --- schedules -----------------------------------------------------------------------------------
_SCHEDULE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "timestep_spacing", "steps_offset")
_SCHEDULER_DEFAULTS = {"timestep_spacing": "leading", "steps_offset": 0, "prediction_type": "epsilon"}


def _schedule_from_diffusers(d: dict) -> ScheduleConfig:
    if not d:
        return ScheduleConfig()
    values = {k: d.get(k, _SCHEDULER_DEFAULTS.get(k, getattr(ScheduleConfig(), k))) for k in _SCHEDULE_FIELDS}
    if d.get("trained_betas"):
        raise CheckpointError("scheduler_config.json: trained_betas are not supported; use a beta_schedule")
    if values["beta_schedule"] not in ("scaled_linear", "linear"):
        raise CheckpointError(f"scheduler_config.json: unsupported beta_schedule {values['beta_schedule']!r}")
    return ScheduleConfig(**values)


SCHEDULER_CLASS = {"sd1": "PNDMScheduler", "sd2": "DDIMScheduler", "sdxl": "EulerDiscreteScheduler", "sdxl-refiner": "EulerDiscreteScheduler"}


def _schedule_to_diffusers(cfg: ModelConfig) -> dict:
    """A scheduler_config.json for a model that came without one (the released models' settings)."""
    s = cfg.schedule
    return {
        "_class_name": SCHEDULER_CLASS[cfg.family],
        **{k: getattr(s, k) for k in _SCHEDULE_FIELDS},
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "trained_betas": None,
    }
