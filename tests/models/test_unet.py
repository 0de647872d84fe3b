"""U-Net: parameter counts, key maps, config round trips and output parity with diffusers."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import Timesteps

from sdlab.checkpoints.keymaps.unet import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_key_pairs,
    unet_shapes,
    unet_to_diffusers,
)
from sdlab.config import PRESETS, UNetConfig
from sdlab.errors import CheckpointError, SdlabError
from sdlab.models.layers import timestep_embedding
from sdlab.models.unet import ControlResiduals, UNet, added_condition, unet_block_groups
from tests.reference import ours_from, perturb_norms_

FULL = ["sd15", "sd15-inpainting", "sd21", "sd21-base", "sd2-inpainting", "sdxl", "sdxl-refiner", "sdxl-inpainting"]
TINY = ["tiny-sd1", "tiny-sd2", "tiny-sdxl", "tiny-sdxl-refiner", "tiny-sd1-inpainting"]
ATOL = 1e-4  # fp32


def _diffusers_unet(cfg: UNetConfig, seed: int = 0) -> UNet2DConditionModel:
    """Seeded random diffusers U-Net; norms (initialised to identity) perturbed so a swapped map shows."""
    torch.manual_seed(seed)
    model = perturb_norms_(UNet2DConditionModel(**unet_config_to_diffusers(cfg)).eval())
    assert all(p.abs().sum() > 0 for p in model.parameters()), "a parameter is all zeros: the test would miss it"
    return model


def _ours_from(ref: UNet2DConditionModel, cfg: UNetConfig) -> UNet:
    return ours_from(UNet, unet_from_diffusers, ref, cfg)


def _inputs(cfg: UNetConfig, batch: int = 2, size: tuple[int, int] = (16, 16), seed: int = 1):
    """(x, t, context, diffusers kwargs, y) for one forward pass."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *size, generator=g)
    t = torch.tensor([999.0, 12.5, 400.0, 1.0][:batch])
    context = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    if cfg.addition_embed_dim is None:
        return x, t, context, {}, None
    pooled_dim = 32  # the tiny configs' pooled width
    n_ids = (cfg.addition_embed_dim - pooled_dim) // cfg.addition_time_embed_dim
    pooled = torch.randn(batch, pooled_dim, generator=g)
    time_ids = torch.randint(0, 1024, (batch, n_ids), generator=g).float()
    kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    return x, t, context, kwargs, added_condition(pooled, time_ids, cfg)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# --- sizes and names -------------------------------------------------------------------------


@pytest.mark.parametrize("name", FULL)
def test_full_size_parameter_count_and_keys_match_diffusers(name: str) -> None:
    cfg = PRESETS[name].unet
    with torch.device("meta"):
        ref = UNet2DConditionModel(**unet_config_to_diffusers(cfg))
        ours = UNet(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    ours.load_state_dict(unet_from_diffusers(ref.state_dict(), cfg), strict=True, assign=True)


def test_sd15_parameter_count() -> None:
    with torch.device("meta"):
        unet = UNet(PRESETS["sd15"].unet)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


def test_sdxl_uses_original_single_file_names() -> None:
    shapes = unet_shapes(PRESETS["sdxl"].unet)
    assert shapes["label_emb.0.0.weight"] == (1280, 2816)
    assert shapes["input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert shapes["input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"] == (640, 2048)
    assert shapes["input_blocks.4.1.proj_in.weight"] == (640, 640)  # Linear: use_linear_projection
    assert shapes["middle_block.1.transformer_blocks.9.ff.net.2.weight"] == (1280, 5120)
    assert shapes["output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)  # upsample after attention
    assert shapes["output_blocks.5.2.conv.weight"] == (640, 640, 3, 3)
    assert shapes["out.2.weight"] == (4, 320, 3, 3)
    sd15 = unet_shapes(PRESETS["sd15"].unet)
    assert sd15["output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)  # upsample on a level without attention
    assert sd15["output_blocks.11.0.skip_connection.weight"] == (320, 640, 1, 1)
    assert sd15["input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)  # 1x1 conv


@pytest.mark.parametrize("name", FULL + TINY)
def test_block_groups_cover_every_parameter_once(name: str) -> None:
    cfg = PRESETS[name].unet
    groups = unet_block_groups(cfg)
    levels = len(cfg.block_out_channels)
    expected = [f"down {i}" for i in range(1, levels + 1)] + ["mid"] + [f"up {i}" for i in range(1, levels + 1)]
    assert list(groups) == expected + ["io"]
    for key in unet_shapes(cfg):
        owners = [g for g, prefixes in groups.items() if any(key.startswith(p) for p in prefixes)]
        assert len(owners) == 1, (key, owners)


def test_block_groups_sd15() -> None:
    groups = unet_block_groups(PRESETS["sd15"].unet)
    assert groups["down 1"] == ["input_blocks.1.", "input_blocks.2.", "input_blocks.3."]
    assert groups["down 4"] == ["input_blocks.10.", "input_blocks.11."]
    assert groups["up 1"] == ["output_blocks.0.", "output_blocks.1.", "output_blocks.2."]
    assert groups["up 4"] == ["output_blocks.9.", "output_blocks.10.", "output_blocks.11."]


# --- parity with diffusers -------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_tiny_matches_diffusers(name: str) -> None:
    cfg = PRESETS[name].unet
    ref = _diffusers_unet(cfg)
    ours = _ours_from(ref, cfg)
    x, t, context, kwargs, y = _inputs(cfg)
    with torch.no_grad():
        expected = ref(x, t, context, **kwargs).sample
        assert _max_diff(ours(x, t, context, y), expected) <= ATOL
        assert _max_diff(ours(x, t[:1].squeeze(), context, y), ref(x, t[0], context, **kwargs).sample) <= ATOL
        assert _max_diff(ours(x, 250.0, context, y), ref(x, 250.0, context, **kwargs).sample) <= ATOL


def test_odd_latent_size_matches_diffusers() -> None:
    cfg = PRESETS["tiny-sd2"].unet
    ref = _diffusers_unet(cfg)
    ours = _ours_from(ref, cfg)
    x, t, context, _, _ = _inputs(cfg, size=(18, 22))  # 18 -> 9 -> 5 and back up to 9, 18
    with torch.no_grad():
        assert _max_diff(ours(x, t, context), ref(x, t, context).sample) <= ATOL


def _skip_shapes(cfg: UNetConfig, batch: int, h: int, w: int) -> list[tuple[int, ...]]:
    """Output shape of every input block (conv_in, res blocks, downsamples)."""
    shapes = [(batch, cfg.block_out_channels[0], h, w)]
    levels = len(cfg.block_out_channels)
    for level, c in enumerate(cfg.block_out_channels):
        shapes += [(batch, c, h, w)] * cfg.layers_per_block
        if level != levels - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((batch, c, h, w))
    return shapes


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sdxl"])
def test_control_residuals_match_diffusers(name: str) -> None:
    cfg = PRESETS[name].unet
    ref = _diffusers_unet(cfg)
    ours = _ours_from(ref, cfg)
    x, t, context, kwargs, y = _inputs(cfg)
    g = torch.Generator().manual_seed(2)
    down = tuple(torch.randn(s, generator=g) for s in _skip_shapes(cfg, 2, 16, 16))
    mid = torch.randn(down[-1].shape, generator=g)
    with torch.no_grad():
        expected = ref(
            x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid, **kwargs
        ).sample
        got = ours(x, t, context, y, control=ControlResiduals(down, mid))
        assert _max_diff(got, expected) <= ATOL
        assert _max_diff(got, ours(x, t, context, y)) > 1e-2  # the residuals did something
        with pytest.raises(SdlabError, match="expected 9 down tensors"):
            ours(x, t, context, y, control=ControlResiduals(down[:-1], mid))


@pytest.mark.parametrize("dim,flip,shift", [(32, True, 0.0), (33, True, 0.0), (16, False, 1.0), (256, True, 0.0)])
def test_timestep_embedding_equals_diffusers(dim: int, flip: bool, shift: float) -> None:
    t = torch.tensor([0, 1, 17, 999, 1024])
    assert torch.equal(timestep_embedding(t, dim, flip, shift), Timesteps(dim, flip, shift)(t))
    tf = torch.tensor([0.5, 261.25, 980.0])
    assert torch.equal(timestep_embedding(tf, dim, flip, shift), Timesteps(dim, flip, shift)(tf))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(dtype: torch.dtype) -> None:
    cfg = PRESETS["tiny-sd2"].unet  # upcast_attention=True
    torch.manual_seed(0)
    model = UNet(cfg).eval()
    x, t, context, _, _ = _inputs(cfg, size=(8, 8))
    with torch.no_grad():
        full = model(x, t, context)
        half = model.to(dtype)(x.to(dtype), t, context.to(dtype))
    assert half.dtype == dtype
    assert _max_diff(half.float(), full) <= 0.05 * full.abs().max().item()


def test_conditioning_errors() -> None:
    cfg = PRESETS["tiny-sdxl"].unet
    with torch.device("meta"):
        model = UNet(cfg)
    x = torch.zeros(1, 4, 8, 8, device="meta")
    context = torch.zeros(1, 7, 64, device="meta")
    with pytest.raises(SdlabError, match="added_condition"):
        model(x, torch.tensor(1.0), context)
    with pytest.raises(SdlabError, match="expects 80"):
        added_condition(torch.zeros(1, 32), torch.zeros(1, 5), cfg)
    with torch.device("meta"):
        sd1 = UNet(PRESETS["tiny-sd1"].unet)
    with pytest.raises(SdlabError, match="without y"):
        sd1(x, torch.tensor(1.0), context[..., :32], y=torch.zeros(1, 80, device="meta"))


# --- key maps --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_key_map_round_trip(name: str) -> None:
    cfg = PRESETS[name].unet
    state = _diffusers_unet(cfg).state_dict()
    back = unet_to_diffusers(unet_from_diffusers(state, cfg), cfg)
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)
    assert len(unet_key_pairs(cfg)) == len(state)


def test_bad_state_dicts_name_the_key() -> None:
    cfg = PRESETS["tiny-sd1"].unet
    state = dict(_diffusers_unet(cfg).state_dict())
    missing = {k: v for k, v in state.items() if k != "mid_block.attentions.0.proj_in.bias"}
    with pytest.raises(CheckpointError, match=r"missing 1 keys \(mid_block\.attentions\.0\.proj_in\.bias\)"):
        unet_from_diffusers(missing, cfg)
    extra = {**state, "up_blocks.0.resnets.9.conv1.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected 1 keys \(up_blocks\.0\.resnets\.9\.conv1\.weight\)"):
        unet_from_diffusers(extra, cfg)
    wrong = {**state, "conv_in.weight": torch.zeros(32, 9, 3, 3)}
    with pytest.raises(CheckpointError, match=r"conv_in\.weight \(32, 9, 3, 3\) != \(32, 4, 3, 3\)"):
        unet_from_diffusers(wrong, cfg)
    ours = unet_from_diffusers(state, cfg)
    ours["out.2.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match=r"sdlab UNet: .*out\.2\.bias \(5,\) != \(4,\)"):
        unet_to_diffusers(ours, cfg)


# --- config.json -----------------------------------------------------------------------------

SD15_JSON = {  # runwayml/stable-diffusion-v1-5 unet/config.json (fields that matter)
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
SDXL_JSON = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (fields that matter)
    **SD15_JSON,
    "_diffusers_version": "0.19.0.dev0",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "class_embed_type": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "num_attention_heads": None,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "time_embedding_type": "positional",
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}


def test_released_configs_read_as_presets() -> None:
    assert unet_config_from_diffusers(SD15_JSON) == PRESETS["sd15"].unet
    assert unet_config_from_diffusers(SDXL_JSON) == PRESETS["sdxl"].unet
    sd21 = {**SD15_JSON, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024}
    sd21 |= {"use_linear_projection": True, "upcast_attention": True}
    assert unet_config_from_diffusers(sd21) == PRESETS["sd21"].unet
    refiner = {**SDXL_JSON, "block_out_channels": [384, 768, 1536, 1536], "attention_head_dim": [6, 12, 24, 24]}
    refiner |= {"transformer_layers_per_block": 4, "cross_attention_dim": 1280}
    refiner |= {"projection_class_embeddings_input_dim": 2560}
    refiner |= {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]}
    refiner |= {"up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
    assert unet_config_from_diffusers(refiner) == PRESETS["sdxl-refiner"].unet


@pytest.mark.parametrize("name", FULL + TINY)
def test_config_round_trip(name: str) -> None:
    cfg = PRESETS[name].unet
    d = unet_config_to_diffusers(cfg)
    assert unet_config_from_diffusers(d) == cfg
    with torch.device("meta"):
        written = dict(UNet2DConditionModel(**d).config)  # every field, as diffusers saves it
    assert unet_config_from_diffusers(written) == cfg


@pytest.mark.parametrize(
    "change,message",
    [
        ({"class_embed_type": "timestep"}, "class_embed_type='timestep' is not supported"),
        ({"addition_embed_type": "text"}, "addition_embed_type='text' is not supported"),
        ({"up_block_types": ["CrossAttnUpBlock2D"] * 4}, "must mirror down_block_types"),
        ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "down_block_types must be 4 of"),
        ({"cross_attention_dim": [768, 1024, 1024, 1024]}, "a different cross_attention_dim per block"),
        ({"attention_head_dim": [8, 8]}, "attention_head_dim"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ],
)
def test_unsupported_configs_are_refused(change: dict, message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as err:
        unet_config_from_diffusers({**SD15_JSON, **change})
    assert "\n" not in str(err.value)


# --- full size -------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_sd15_matches_diffusers() -> None:
    cfg = PRESETS["sd15"].unet
    ref = _diffusers_unet(cfg)
    ours = _ours_from(ref, cfg)  # shares ref's tensors (assign=True): no second copy
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 32, 32, generator=g)
    context = torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([601])
    with torch.no_grad():
        assert _max_diff(ours(x, t, context), ref(x, t, context).sample) <= ATOL
