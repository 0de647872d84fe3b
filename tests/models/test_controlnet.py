"""ControlNet: residual parity with diffusers' ControlNetModel, from_unet, sizes, key maps and configs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from sdlab.checkpoints.keymaps.controlnet import (
    controlnet_config_from_diffusers,
    controlnet_config_to_diffusers,
    controlnet_from_diffusers,
    controlnet_key_pairs,
    controlnet_to_diffusers,
)
from sdlab.checkpoints.keymaps.unet import unet_config_to_diffusers, unet_from_diffusers
from sdlab.config import CONTROLNET_PRESETS, ControlNetConfig, controlnet_preset, from_dict, to_dict
from sdlab.errors import CheckpointError, SdlabError
from sdlab.models.controlnet import ControlNet
from sdlab.models.unet import UNet, added_condition
from tests.reference import max_diff, perturb_
from tests.reference import ours_from as reference_ours_from

TINY = ["tiny-controlnet-sd1", "tiny-controlnet-sd2", "tiny-controlnet-sdxl"]
FULL = ["controlnet-sd15", "controlnet-sd21", "controlnet-sdxl"]
ATOL = 1e-5  # fp32; the same operations in the same order give 0.0


def diffusers_controlnet(cfg: ControlNetConfig, seed: int = 0) -> ControlNetModel:
    """Seeded random diffusers ControlNet; every parameter perturbed, so zero convs are not zero."""
    torch.manual_seed(seed)
    return perturb_(ControlNetModel(**controlnet_config_to_diffusers(cfg)).eval(), seed + 1)


def ours_from(ref: ControlNetModel, cfg: ControlNetConfig) -> ControlNet:
    return reference_ours_from(ControlNet, controlnet_from_diffusers, ref, cfg)


def controlnet_inputs(cfg: ControlNetConfig, batch: int = 2, size: tuple[int, int] = (8, 10), seed: int = 1):
    """(x, t, context, hint, diffusers kwargs, y) for one forward pass."""
    g = torch.Generator().manual_seed(seed)
    unet = cfg.unet
    x = torch.randn(batch, unet.in_channels, *size, generator=g)
    t = torch.tensor([999.0, 12.5, 400.0][:batch])
    context = torch.randn(batch, 7, unet.cross_attention_dim, generator=g)
    f = cfg.hint_downscale
    hint = torch.rand(batch, cfg.hint_channels, size[0] * f, size[1] * f, generator=g)
    if unet.addition_embed_dim is None:
        return x, t, context, hint, {}, None
    pooled_dim = 32  # the tiny configs' pooled width
    n_ids = (unet.addition_embed_dim - pooled_dim) // unet.addition_time_embed_dim
    pooled = torch.randn(batch, pooled_dim, generator=g)
    time_ids = torch.randint(0, 1024, (batch, n_ids), generator=g).float()
    kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    return x, t, context, hint, kwargs, added_condition(pooled, time_ids, unet)


def residual_diff(ours, theirs) -> float:
    """Largest difference over every down residual and the mid residual."""
    assert len(ours.down) == len(theirs.down_block_res_samples)
    pairs = [*zip(ours.down, theirs.down_block_res_samples), (ours.mid, theirs.mid_block_res_sample)]
    return max(max_diff(a, b) for a, b in pairs)


# --- parity with diffusers -------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("pool", [False, True], ids=["", "global-pool"])
def test_residuals_match_diffusers(name: str, pool: bool) -> None:
    cfg = replace(controlnet_preset(name), global_pool_conditions=pool)
    ref = diffusers_controlnet(cfg)
    ours = ours_from(ref, cfg)
    x, t, context, hint, kwargs, y = controlnet_inputs(cfg)
    with torch.no_grad():
        for scale, guess in [(1.0, False), (0.7, False), (0.7, True)]:
            expected = ref(x, t, context, hint, conditioning_scale=scale, guess_mode=guess, **kwargs)
            got = ours(x, t, context, hint, y, scale=scale, guess_mode=guess)
            assert residual_diff(got, expected) <= ATOL, (scale, guess)
            if pool:
                assert got.mid.shape[-2:] == (1, 1)
        expected = ref(x, 250.0, context, hint, **kwargs)  # a float timestep for the whole batch
        assert residual_diff(ours(x, 250.0, context, hint, y), expected) <= ATOL


def test_residuals_steer_the_unet_as_in_diffusers() -> None:
    cfg = controlnet_preset("tiny-controlnet-sdxl")
    ref, ref_unet = diffusers_controlnet(cfg), perturb_(UNet2DConditionModel(**unet_config_to_diffusers(cfg.unet)), 5)
    with torch.device("meta"):
        unet = UNet(cfg.unet)
    unet.load_state_dict(unet_from_diffusers(ref_unet.state_dict(), cfg.unet), strict=True, assign=True)
    ours = ours_from(ref, cfg)
    x, t, context, hint, kwargs, y = controlnet_inputs(cfg)
    with torch.no_grad():
        down, mid = ref(x, t, context, hint, conditioning_scale=0.5, return_dict=False, **kwargs)
        expected = ref_unet(
            x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid, **kwargs
        ).sample
        got = unet(x, t, context, y, control=ours(x, t, context, hint, y, scale=0.5))
    assert max_diff(got, expected) <= 1e-4  # the U-Net's own tolerance (tests/models/test_unet.py)


def test_guess_mode_scales_from_a_tenth_to_one() -> None:
    cfg = controlnet_preset("tiny-controlnet-sd1")
    torch.manual_seed(0)
    net = perturb_(ControlNet(cfg).eval(), 1)
    x, t, context, hint, _, _ = controlnet_inputs(cfg)
    with torch.no_grad():
        plain, guess = net(x, t, context, hint), net(x, t, context, hint, guess_mode=True)
    n = len(plain.down)
    assert torch.allclose(guess.down[0], plain.down[0] * 0.1)
    assert torch.allclose(guess.down[-1], plain.down[-1] * 10 ** (-1 / n))
    assert torch.equal(guess.mid, plain.mid)


def test_hint_of_the_wrong_size_is_refused() -> None:
    cfg = controlnet_preset("tiny-controlnet-sd1")
    with torch.device("meta"):
        net = ControlNet(cfg)
    x = torch.zeros(1, 4, 8, 8, device="meta")
    context = torch.zeros(1, 7, 32, device="meta")
    with pytest.raises(SdlabError, match=r"pass the hint at 2x the latent size"):
        net(x, 1.0, context, torch.zeros(1, 3, 8, 8, device="meta"))


@pytest.mark.parametrize("name", ["tiny-controlnet-sd1", "tiny-controlnet-sdxl"])
def test_from_unet_equals_diffusers(name: str) -> None:
    cfg = controlnet_preset(name)
    torch.manual_seed(0)
    ref_unet = perturb_(UNet2DConditionModel(**unet_config_to_diffusers(cfg.unet)).eval(), 1)
    with torch.device("meta"):
        unet = UNet(cfg.unet)
    unet.load_state_dict(unet_from_diffusers(ref_unet.state_dict(), cfg.unet), strict=True, assign=True)
    expected = ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=cfg.hint_embedding_channels)
    ours = ControlNet.from_unet(unet, hint_embedding_channels=cfg.hint_embedding_channels)
    assert ours.cfg == cfg == controlnet_config_from_diffusers(dict(expected.config))
    got, want = controlnet_to_diffusers(ours.state_dict(), cfg), expected.state_dict()
    assert got.keys() == want.keys()
    fresh = ("controlnet_cond_embedding.conv_in.", "controlnet_cond_embedding.blocks.")  # random on both sides
    unequal = [k for k in want if not k.startswith(fresh) and not torch.equal(got[k], want[k])]
    assert not unequal, unequal[:5]
    zero_init = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
    zero = [k for k in got if k.startswith(zero_init)]
    assert zero and all(not got[k].any() for k in zero)


# --- sizes, names and configs ----------------------------------------------------------------


SD15_CONTROLNET_JSON = {  # lllyasviel/sd-controlnet-canny config.json (fields that matter)
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
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
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
    "upcast_attention": False,
    "use_linear_projection": False,
}


def test_sd15_parameter_count_matches_diffusers() -> None:
    with torch.device("meta"):
        ours = ControlNet(controlnet_preset("controlnet-sd15"))
        ref = ControlNetModel(**SD15_CONTROLNET_JSON)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters()) == 361_279_120  # diffusers 0.42 on the released config


@pytest.mark.parametrize("name", FULL)
def test_full_size_keys_and_shapes_match_diffusers(name: str) -> None:
    cfg = controlnet_preset(name)
    with torch.device("meta"):
        ref = ControlNetModel(**controlnet_config_to_diffusers(cfg))
        ours = ControlNet(cfg)
    ours.load_state_dict(controlnet_from_diffusers(ref.state_dict(), cfg), strict=True, assign=True)
    assert len(controlnet_key_pairs(cfg)) == len(ref.state_dict())


def test_released_config_reads_as_preset() -> None:
    assert controlnet_config_from_diffusers(SD15_CONTROLNET_JSON) == controlnet_preset("controlnet-sd15")


@pytest.mark.parametrize("name", FULL + TINY)
def test_config_round_trips(name: str) -> None:
    cfg = CONTROLNET_PRESETS[name]
    d = controlnet_config_to_diffusers(cfg)
    assert controlnet_config_from_diffusers(d) == cfg
    with torch.device("meta"):
        written = dict(ControlNetModel(**d).config)  # every field, as diffusers saves it
    assert controlnet_config_from_diffusers(written) == cfg
    assert from_dict(ControlNetConfig, to_dict(cfg)) == cfg


def test_bad_configs_and_names() -> None:
    with pytest.raises(CheckpointError, match="channel_order='bgr' is not supported"):
        controlnet_config_from_diffusers({**SD15_CONTROLNET_JSON, "controlnet_conditioning_channel_order": "bgr"})
    with pytest.raises(SdlabError, match="known presets: controlnet-sd15"):
        controlnet_preset("controlnet-sd3")


def test_bad_state_dict_names_the_key() -> None:
    cfg = controlnet_preset("tiny-controlnet-sd1")
    state = dict(diffusers_controlnet(cfg).state_dict())
    wrong = {**state, "controlnet_down_blocks.3.weight": torch.zeros(64, 64, 1, 1)}
    with pytest.raises(CheckpointError, match=r"controlnet_down_blocks\.3\.weight \(64, 64, 1, 1\) != \(32, 32"):
        controlnet_from_diffusers(wrong, cfg)
    del state["controlnet_mid_block.bias"]
    with pytest.raises(CheckpointError, match=r"missing 1 keys \(controlnet_mid_block\.bias\)"):
        controlnet_from_diffusers(state, cfg)
