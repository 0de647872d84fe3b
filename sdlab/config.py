"""Typed, frozen configurations for every component, and the named presets.

Numbers here are facts about the released models (see shared/REFERENCE-configs.md);
nothing else in the package hard-codes them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Literal, TypeVar, get_args, get_origin, get_type_hints

from sdlab.errors import SdlabError

Family = Literal["sd1", "sd2", "sdxl", "sdxl-refiner"]
PredictionType = Literal["epsilon", "v_prediction"]
T = TypeVar("T")


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (ldm `ddconfig`): image (B, 3, H, W) <-> latent (B, 4, H/f, W/f)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # ch * ch_mult; f = 2 ** (levels - 1)
    layers_per_block: int = 2  # res blocks per encoder level (decoder has one more)
    norm_num_groups: int = 32
    norm_eps: float = 1e-6  # every GroupNorm of the ldm autoencoder
    scaling_factor: float = 0.18215  # latent = scaling_factor * (z - shift_factor)
    shift_factor: float = 0.0
    force_upcast: bool = True  # decode in fp32 when the pipeline runs in fp16
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class UNetConfig:
    """Text-conditioned U-Net (ldm `UNetModel`).

    Per-level tuples run from the highest resolution (level 0) down; the up path mirrors them.
    """

    in_channels: int = 4  # 9 for inpainting: latents(4) + mask(1) + masked-image latents(4)
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2  # res blocks per down level (up levels have one more)
    attention: tuple[bool, ...] = (True, True, True, False)  # spatial transformer at this level?
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)  # transformer blocks per attention; mid uses the last
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # heads per level; head dim = channels // heads
    cross_attention_dim: int = 768  # width of the text context
    use_linear_projection: bool = False  # SD2/SDXL: Linear proj_in/out instead of 1x1 conv
    upcast_attention: bool = False  # attention softmax in fp32 (SD2.1-v)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True  # timestep embedding is [cos, sin]
    freq_shift: float = 0.0
    # SDXL "text_time" added embedding: concat(pooled text, sinusoid(time_ids)) -> MLP -> + temb
    addition_embed_dim: int | None = None  # projection_class_embeddings_input_dim (2816 base, 2560 refiner)
    addition_time_embed_dim: int = 256  # sinusoid width per micro-conditioning number

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def mid_transformer_depth(self) -> int:
        return self.transformer_depth[-1]

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        for name in ("attention", "transformer_depth", "num_heads"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"UNetConfig.{name} needs {levels} entries (one per level), got {getattr(self, name)}")


Activation = Literal["quick_gelu", "gelu"]


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer (transformers `CLIPTextConfig` fields)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    activation: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # set: the model has `text_projection` (pooled -> projection_dim)
    eos_token_id: int = 49407  # pooled output is taken at the first EOS (transformers' rule for eos_token_id=2 is argmax)


@dataclass(frozen=True)
class TokenizerConfig:
    max_length: int = 77
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407  # SD1/SDXL-L pad with EOS; OpenCLIP (SD2, SDXL-G) pads with 0 ("!")


@dataclass(frozen=True)
class TextConditioner:
    """One text encoder, its tokenizer, and which hidden state the U-Net sees."""

    encoder: TextEncoderConfig
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    hidden_layer: int = -1  # -1: last layer, -2: penultimate ("clip skip 2")
    final_layer_norm: bool = True  # SD1/SD2 apply the final LayerNorm; SDXL does not


@dataclass(frozen=True)
class ScheduleConfig:
    """The 1,000-step training noise schedule (diffusers `scheduler_config.json`)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"
    prediction_type: PredictionType = "epsilon"
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"
    steps_offset: int = 1


@dataclass(frozen=True)
class ModelConfig:
    """A whole latent diffusion model: networks, conditioning and schedule."""

    name: str
    family: Family
    unet: UNetConfig
    vae: VAEConfig
    text: tuple[TextConditioner, ...]  # in the order their hidden states are concatenated
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    default_size: int = 512  # pixels; the resolution the model was trained at
    default_steps: int = 20  # sampling steps when none are asked for: what the model is known to need
    force_zeros_for_empty_prompt: bool = False  # SDXL base: empty negative prompt -> zero embeddings
    requires_aesthetics_score: bool = False  # SDXL refiner micro-conditioning

    @property
    def inpainting(self) -> bool:
        return self.unet.in_channels == 9

    @property
    def prediction_type(self) -> PredictionType:
        return self.schedule.prediction_type


# --- text encoders -------------------------------------------------------------------------
CLIP_L = TextEncoderConfig()  # OpenAI ViT-L/14
OPENCLIP_H = TextEncoderConfig(  # ViT-H/14 as SD2 ships it: 23 of 24 layers, no projection used
    hidden_size=1024, intermediate_size=4096, num_layers=23, num_heads=16, activation="gelu"
)
OPENCLIP_BIGG = TextEncoderConfig(
    hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20, activation="gelu", projection_dim=1280
)
PAD_WITH_EOS = TokenizerConfig(pad_token_id=49407)
PAD_WITH_ZERO = TokenizerConfig(pad_token_id=0)

# --- networks ------------------------------------------------------------------------------
SD1_UNET = UNetConfig()
SD2_UNET = UNetConfig(num_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
SDXL_UNET = UNetConfig(
    block_out_channels=(320, 640, 1280),
    attention=(False, True, True),
    transformer_depth=(1, 2, 10),
    num_heads=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_dim=2816,  # pooled 1280 + 6 time ids x 256
)
SDXL_REFINER_UNET = UNetConfig(
    block_out_channels=(384, 768, 1536, 1536),
    attention=(False, True, True, False),
    transformer_depth=(4, 4, 4, 4),
    num_heads=(6, 12, 24, 24),
    cross_attention_dim=1280,
    use_linear_projection=True,
    addition_embed_dim=2560,  # pooled 1280 + 5 time ids x 256
)
SD_VAE = VAEConfig()
SDXL_VAE = VAEConfig(scaling_factor=0.13025)

_SD1_TEXT = (TextConditioner(CLIP_L, PAD_WITH_EOS),)
_SD2_TEXT = (TextConditioner(OPENCLIP_H, PAD_WITH_ZERO),)
_SDXL_TEXT = (
    TextConditioner(CLIP_L, PAD_WITH_EOS, hidden_layer=-2, final_layer_norm=False),
    TextConditioner(OPENCLIP_BIGG, PAD_WITH_ZERO, hidden_layer=-2, final_layer_norm=False),
)
_SDXL_REFINER_TEXT = (TextConditioner(OPENCLIP_BIGG, PAD_WITH_ZERO, hidden_layer=-2, final_layer_norm=False),)


def _inpainting(unet: UNetConfig) -> UNetConfig:
    return replace(unet, in_channels=9)


PRESETS: dict[str, ModelConfig] = {
    p.name: p
    for p in (
        ModelConfig("sd15", "sd1", SD1_UNET, SD_VAE, _SD1_TEXT),
        ModelConfig("sd15-inpainting", "sd1", _inpainting(SD1_UNET), SD_VAE, _SD1_TEXT),
        ModelConfig(
            "sd21",
            "sd2",
            replace(SD2_UNET, upcast_attention=True),
            SD_VAE,
            _SD2_TEXT,
            ScheduleConfig(prediction_type="v_prediction"),
            default_size=768,
        ),
        ModelConfig("sd21-base", "sd2", SD2_UNET, SD_VAE, _SD2_TEXT),
        ModelConfig("sd2-inpainting", "sd2", _inpainting(SD2_UNET), SD_VAE, _SD2_TEXT),
        ModelConfig(
            "sdxl", "sdxl", SDXL_UNET, SDXL_VAE, _SDXL_TEXT, default_size=1024, force_zeros_for_empty_prompt=True
        ),
        ModelConfig(
            "sdxl-refiner",
            "sdxl-refiner",
            SDXL_REFINER_UNET,
            SDXL_VAE,
            _SDXL_REFINER_TEXT,
            default_size=1024,
            requires_aesthetics_score=True,
        ),
        ModelConfig(
            "sdxl-inpainting",
            "sdxl",
            _inpainting(SDXL_UNET),
            SDXL_VAE,
            _SDXL_TEXT,
            default_size=1024,
            force_zeros_for_empty_prompt=True,
        ),
    )
}


# --- tiny random-weight models for tests and parity checks (same code paths, small widths) ---
_TINY_L = TextEncoderConfig(hidden_size=32, intermediate_size=37, num_layers=4, num_heads=4)
_TINY_H = replace(_TINY_L, activation="gelu")
# bigG is wider than CLIP-L, as at full size (readers such as diffusers tell the two apart by width)
_TINY_G = replace(_TINY_L, hidden_size=48, activation="gelu", projection_dim=32)
_TINY_VAE = VAEConfig(block_out_channels=(32, 64), layers_per_block=1)
_TINY_UNET = UNetConfig(
    block_out_channels=(32, 64, 64),
    attention=(True, True, False),
    transformer_depth=(1, 1, 1),
    num_heads=(2, 2, 2),
    cross_attention_dim=32,
)
_TINY_XL_UNET = replace(
    _TINY_UNET,
    attention=(False, True, True),
    transformer_depth=(1, 2, 2),
    num_heads=(2, 4, 4),
    cross_attention_dim=32 + 48,  # CLIP-L penultimate ++ bigG penultimate
    use_linear_projection=True,
    addition_embed_dim=32 + 6 * 8,
    addition_time_embed_dim=8,
)
_TINY_REFINER_UNET = replace(
    _TINY_XL_UNET,
    block_out_channels=(32, 64, 64, 64),
    attention=(False, True, True, False),
    transformer_depth=(2, 2, 2, 2),
    num_heads=(2, 4, 4, 4),
    cross_attention_dim=48,
    addition_embed_dim=32 + 5 * 8,
)
TINY_PRESETS: dict[str, ModelConfig] = {
    p.name: p
    for p in (
        ModelConfig("tiny-sd1", "sd1", _TINY_UNET, _TINY_VAE, (TextConditioner(_TINY_L, PAD_WITH_EOS),), default_size=32),
        ModelConfig(
            "tiny-sd2",
            "sd2",
            replace(_TINY_UNET, num_heads=(2, 4, 4), use_linear_projection=True, upcast_attention=True),
            _TINY_VAE,
            (TextConditioner(_TINY_H, PAD_WITH_ZERO),),
            ScheduleConfig(prediction_type="v_prediction"),
            default_size=32,
        ),
        ModelConfig(
            "tiny-sdxl",
            "sdxl",
            _TINY_XL_UNET,
            replace(_TINY_VAE, scaling_factor=0.13025),
            (
                TextConditioner(_TINY_L, PAD_WITH_EOS, hidden_layer=-2, final_layer_norm=False),
                TextConditioner(_TINY_G, PAD_WITH_ZERO, hidden_layer=-2, final_layer_norm=False),
            ),
            default_size=32,
            force_zeros_for_empty_prompt=True,
        ),
        ModelConfig(
            "tiny-sdxl-refiner",
            "sdxl-refiner",
            _TINY_REFINER_UNET,
            replace(_TINY_VAE, scaling_factor=0.13025),
            (TextConditioner(_TINY_G, PAD_WITH_ZERO, hidden_layer=-2, final_layer_norm=False),),
            default_size=32,
            requires_aesthetics_score=True,
        ),
        ModelConfig("tiny-sd1-inpainting", "sd1", _inpainting(_TINY_UNET), _TINY_VAE, (TextConditioner(_TINY_L, PAD_WITH_EOS),), default_size=32),
    )
}
PRESETS.update(TINY_PRESETS)

# --- sdlab's own small model: 64x64 images of coloured shapes, trained by `sdlab train` ------------
# 24 tokens: its captions take at most 20 (BOS, 18 words, EOS). At 77, some 60 identical padding tokens
# would fill every cross-attention, and longer prompts still work: they are cut into 22-token chunks.
SHAPES_TEXT = TextEncoderConfig(hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4, max_positions=24)
SHAPES = ModelConfig(
    name="shapes-64",
    family="sd1",  # one CLIP text encoder, eps-prediction: SD 1.x's layout, so every loader and tool reads it
    unet=UNetConfig(
        block_out_channels=(64, 128, 192),
        layers_per_block=1,
        attention=(True, True, True),
        transformer_depth=(1, 1, 1),
        num_heads=(4, 4, 4),
        cross_attention_dim=128,
    ),
    # 8 groups: at 32 channels, 32 groups would normalise each channel alone and wash out flat colours
    vae=VAEConfig(block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=8, scaling_factor=1.0),
    text=(TextConditioner(SHAPES_TEXT, replace(PAD_WITH_EOS, max_length=24)),),
    # DDPM's linear betas end at alpha_bar = 4e-5 (SD's at 4.7e-3): a 16x16 latent's per-channel noise mean
    # (std 1/16) then outweighs what is left of the image at the first sampling steps, so the model must take
    # the background colour from the prompt instead of reading it off the noise (Lin et al. 2023, §3.1);
    # v-prediction keeps x̂0 well-posed there, "trailing" starts sampling at t = 999.
    schedule=ScheduleConfig(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="v_prediction",
        timestep_spacing="trailing", steps_offset=0,
    ),
    default_size=64,
    # held-out adherence at 15 steps equals 20 steps' within a few images in 200 (README, The default model)
    default_steps=15,
)
PRESETS[SHAPES.name] = SHAPES


def preset(name: str) -> ModelConfig:
    """The named preset; a clear error lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise SdlabError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


# --- (de)serialisation: configs travel inside checkpoints sdlab writes --------------------------
def to_dict(cfg) -> dict:
    """A JSON-ready dict of any config dataclass (tuples become lists)."""
    return json.loads(json.dumps(asdict(cfg)))


def from_dict(cls: type[T], data: dict) -> T:
    """Rebuild a config dataclass from `to_dict` output; unknown keys are an error."""
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if is_dataclass(kind):
            value = from_dict(kind, value)
        elif get_origin(kind) is tuple:
            (item,) = {a for a in get_args(kind) if a is not Ellipsis}
            value = tuple(from_dict(item, v) if is_dataclass(item) else v for v in value)
        kwargs[name] = value
    return cls(**kwargs)


# --- ControlNet ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ControlNetConfig:
    """ControlNet (Zhang et al. 2023, ldm `cldm.ControlNet`): a copy of the U-Net's encoder that
    also sees a hint image and returns one residual per U-Net skip connection plus one for the middle."""

    unet: UNetConfig  # the copied encoder; decoder-only fields (out_channels) are unused
    family: Family  # the base models it steers
    hint_channels: int = 3  # the hint is an RGB image in [0, 1]
    hint_embedding_channels: tuple[int, ...] = (16, 32, 96, 256)  # hint encoder widths; each after the first halves H, W
    global_pool_conditions: bool = False  # residuals averaged over H, W (v1.1 "shuffle" ControlNet)

    @property
    def hint_downscale(self) -> int:
        """Hint pixels per latent pixel: the VAE's downscale for the models this ControlNet steers."""
        return 2 ** (len(self.hint_embedding_channels) - 1)


def family_of(unet: UNetConfig) -> Family:
    """The family a U-Net encoder belongs to, from its architecture alone: SDXL's added (label)
    embedding, else SD2's linear transformer projections, else SD1."""
    if unet.addition_embed_dim is not None:
        return "sdxl"
    return "sd2" if unet.use_linear_projection else "sd1"


def controlnet_for(model: ModelConfig, **changes) -> ControlNetConfig:
    """The ControlNet config matching a model preset's U-Net."""
    return ControlNetConfig(unet=model.unet, family=model.family, **changes)


_TINY_HINT = (8, 16)  # the tiny VAEs downscale by 2, so one halving
CONTROLNET_PRESETS: dict[str, ControlNetConfig] = {
    "controlnet-sd15": controlnet_for(PRESETS["sd15"]),
    "controlnet-sd21": controlnet_for(PRESETS["sd21"]),
    "controlnet-sdxl": controlnet_for(PRESETS["sdxl"]),
    "tiny-controlnet-sd1": controlnet_for(PRESETS["tiny-sd1"], hint_embedding_channels=_TINY_HINT),
    "tiny-controlnet-sd2": controlnet_for(PRESETS["tiny-sd2"], hint_embedding_channels=_TINY_HINT),
    "tiny-controlnet-sdxl": controlnet_for(PRESETS["tiny-sdxl"], hint_embedding_channels=_TINY_HINT),
}


def controlnet_preset(name: str) -> ControlNetConfig:
    """The named ControlNet preset; a clear error lists the known names."""
    try:
        return CONTROLNET_PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(CONTROLNET_PRESETS))
        raise SdlabError(f"unknown ControlNet preset {name!r}; known presets: {known}") from None
