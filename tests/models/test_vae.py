"""The VAE against diffusers' AutoencoderKL: parameter counts, numerical parity, key map and config."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE

from sdlab.checkpoints.keymaps.vae import (
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_diffusers_names,
    vae_from_diffusers,
    vae_to_diffusers,
)
from sdlab.config import PRESETS, SD_VAE, SDXL_VAE, VAEConfig
from sdlab.errors import CheckpointError
from sdlab.models.vae import AutoencoderKL
from tests.reference import perturb_norms_

TINY = PRESETS["tiny-sd1"].vae  # 2 levels, 1 res block per level, quant convs
SMALL = VAEConfig(  # 3 levels, 2 res blocks, 8 groups, no quant convs, a shift
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    norm_num_groups=8,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
ATOL = 1e-4


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def diffusers_vae(cfg: VAEConfig, seed: int = 0) -> DiffusersVAE:
    """diffusers' VAE with seeded random weights; norms are perturbed too so a swapped norm shows."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = perturb_norms_(DiffusersVAE.from_config(vae_config_to_diffusers(cfg)).eval())
    return model


def ours_from(theirs: DiffusersVAE, cfg: VAEConfig) -> AutoencoderKL:
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    model.load_state_dict(vae_from_diffusers(theirs.state_dict(), cfg), strict=True, assign=True)
    return model.eval()


def image(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a - b).abs().max().item()


# --- sizes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_parameter_counts_match_diffusers(name: str) -> None:
    cfg = PRESETS[name].vae
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
        theirs = DiffusersVAE.from_config(vae_config_to_diffusers(cfg))
    assert count(ours) == count(theirs)
    assert count(ours.encoder) == count(theirs.encoder) == 34_163_592
    assert count(ours.decoder) == count(theirs.decoder) == 49_490_179


def test_ldm_parameter_names() -> None:
    with torch.device("meta"):
        names = set(AutoencoderKL(SD_VAE).state_dict())
    for key in (
        "encoder.conv_in.weight",
        "encoder.down.0.block.1.norm1.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.downsample.conv.weight",
        "encoder.mid.block_1.conv2.bias",
        "encoder.mid.attn_1.proj_out.weight",
        "encoder.norm_out.bias",
        "quant_conv.weight",
        "post_quant_conv.bias",
        "decoder.up.0.block.2.conv1.weight",
        "decoder.up.1.block.0.nin_shortcut.weight",
        "decoder.up.3.upsample.conv.weight",
        "decoder.mid.attn_1.q.weight",
        "decoder.conv_out.weight",
    ):
        assert key in names, key
    assert "encoder.down.3.downsample.conv.weight" not in names
    assert "decoder.up.0.upsample.conv.weight" not in names
    assert not any(k.startswith("first_stage_model.") for k in names)


def test_meta_construction_and_shapes() -> None:
    with torch.device("meta"):
        model = AutoencoderKL(SD_VAE)
        x = torch.empty(2, 3, 64, 48)
        posterior = model.encode(x)
        assert posterior.mean.shape == (2, 4, 8, 6)
        assert model.decode(posterior.mode()).shape == (2, 3, 64, 48)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_quant_convs_follow_config() -> None:
    with torch.device("meta"):
        model = AutoencoderKL(SMALL)
    assert model.quant_conv is None and model.post_quant_conv is None
    assert not any("quant_conv" in k for k in model.state_dict())


# --- parity --------------------------------------------------------------------------------------
def assert_parity(cfg: VAEConfig, size: int, batch: int) -> dict[str, float]:
    theirs = diffusers_vae(cfg)
    ours = ours_from(theirs, cfg)
    x = image(batch, size)
    x_before = x.clone()
    with torch.no_grad():
        p, q = ours.encode(x), theirs.encode(x).latent_dist
        p_flip, q_flip = ours.encode(x.flip(-1)), theirs.encode(x.flip(-1)).latent_dist
        z_ours = p.sample(torch.Generator().manual_seed(7))
        z_theirs = q.sample(torch.Generator().manual_seed(7))
        diffs = {
            "mean": max_diff(p.mean, q.mean),
            "logvar": max_diff(p.logvar, q.logvar),
            "std": max_diff(p.std, q.std),
            "sample": max_diff(z_ours, z_theirs),
            "mode": max_diff(p.mode(), q.mode()),
            "kl": max_diff(p.kl(), q.kl()) / q.kl().abs().max().item(),  # relative: a sum over h*w*C terms
            "kl_other": max_diff(p.kl(p_flip), q.kl(q_flip)) / q.kl(q_flip).abs().max().item(),
            "decode": max_diff(ours.decode(z_theirs), theirs.decode(z_theirs).sample),
        }
    assert torch.equal(x, x_before)
    assert p.mean.shape == (batch, cfg.latent_channels, size // cfg.downscale, size // cfg.downscale)
    assert all(d <= ATOL for d in diffs.values()), diffs
    return diffs


@pytest.mark.parametrize("cfg", [TINY, SMALL], ids=["tiny", "small-3-levels"])
def test_parity_with_diffusers_small(cfg: VAEConfig) -> None:
    assert_parity(cfg, size=32, batch=2)


def test_parity_with_diffusers_full_size_sd() -> None:
    assert_parity(SD_VAE, size=64, batch=1)


def test_sample_uses_generator() -> None:
    model = ours_from(diffusers_vae(TINY), TINY)
    with torch.no_grad():
        posterior = model.encode(image(1, 32))
    a = posterior.sample(torch.Generator().manual_seed(3))
    b = posterior.sample(torch.Generator().manual_seed(3))
    c = posterior.sample(torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(dtype: torch.dtype) -> None:
    model = ours_from(diffusers_vae(TINY), TINY)
    x = image(1, 32)
    with torch.no_grad():
        ref = model.decode(model.encode(x).mode())
        half = model.to(dtype)
        posterior = half.encode(x.to(dtype))
        out = half.decode(posterior.sample(torch.Generator().manual_seed(0)))
        out_mode = half.decode(posterior.mode())
    assert out.dtype == dtype and posterior.mean.dtype == dtype
    assert torch.isfinite(out).all()
    assert (out_mode.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_latent_scaling() -> None:
    with torch.device("meta"):
        model = AutoencoderKL(SMALL)
    z = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    z_before = z.clone()
    latents = model.scale_latents(z)
    torch.testing.assert_close(latents, (z - SMALL.shift_factor) * SMALL.scaling_factor)
    torch.testing.assert_close(model.unscale_latents(latents), z)
    assert torch.equal(z, z_before)


# --- key map -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [TINY, SMALL, SD_VAE], ids=["tiny", "small-3-levels", "sd"])
def test_key_map_round_trip(cfg: VAEConfig) -> None:
    with torch.device("meta"):
        theirs = DiffusersVAE.from_config(vae_config_to_diffusers(cfg))
    state = theirs.state_dict()
    ours = vae_from_diffusers(state, cfg)
    back = vae_to_diffusers(ours, cfg)
    assert list(back) == list(state)  # same keys, in diffusers' order
    assert all(back[k].shape == state[k].shape for k in state)
    theirs.load_state_dict(back, strict=True, assign=True)


def test_key_map_round_trip_keeps_values() -> None:
    theirs = diffusers_vae(SMALL)
    state = theirs.state_dict()
    back = vae_to_diffusers(vae_from_diffusers(state, SMALL), SMALL)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_legacy_attention_names() -> None:
    theirs = diffusers_vae(TINY)
    state = theirs.state_dict()
    new_to_old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for k, v in state.items():
        for new, old in new_to_old.items():
            k = k.replace(new, old) if ".attentions.0" in k else k
        legacy[k] = v
    assert set(legacy) == set(vae_diffusers_names(TINY, legacy_attention=True).values())
    # diffusers itself still reads these names
    assert set(theirs._fix_state_dict_keys_on_load(dict(legacy))) == set(state)
    expected = vae_from_diffusers(state, TINY)
    got = vae_from_diffusers(legacy, TINY)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def meta_state(cfg: VAEConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return dict(DiffusersVAE.from_config(vae_config_to_diffusers(cfg)).state_dict())


def test_missing_key_is_named() -> None:
    state = meta_state(TINY)
    del state["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"]
    with pytest.raises(CheckpointError, match=r"missing 1 keys \(decoder\.up_blocks\.1\.resnets\.0\.conv_shortcut"):
        vae_from_diffusers(state, TINY)


def test_extra_key_is_named() -> None:
    state = meta_state(TINY)
    state["encoder.mid_block.attentions.1.to_q.weight"] = state["encoder.mid_block.attentions.0.to_q.weight"]
    with pytest.raises(CheckpointError, match=r"unexpected 1 keys \(encoder\.mid_block\.attentions\.1\.to_q\.weight"):
        vae_from_diffusers(state, TINY)


def test_wrong_shape_is_named() -> None:
    state = meta_state(TINY)
    state["encoder.conv_out.weight"] = torch.empty(4, 64, 3, 3, device="meta")  # latent 2, not double_z 8
    with pytest.raises(CheckpointError, match=r"encoder\.conv_out\.weight \(4, 64, 3, 3\) != \(8, 64, 3, 3\)"):
        vae_from_diffusers(state, TINY)


def test_to_diffusers_checks_our_keys() -> None:
    with torch.device("meta"):
        state = AutoencoderKL(TINY).state_dict()
    state["decoder.mid.attn_1.q.weight"] = torch.empty(64, 64, device="meta")  # Linear-shaped, not 1x1 conv
    with pytest.raises(CheckpointError, match=r"decoder\.mid\.attn_1\.q\.weight \(64, 64\) != \(64, 64, 1, 1\)"):
        vae_to_diffusers(state, TINY)


# --- config --------------------------------------------------------------------------------------
SD15_CONFIG_JSON = {  # stable-diffusion-v1-5 vae/config.json: no scaling_factor, no force_upcast
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def test_config_from_released_files() -> None:
    assert vae_config_from_diffusers(SD15_CONFIG_JSON) == SD_VAE
    sdxl = {**SD15_CONFIG_JSON, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
    assert vae_config_from_diffusers(sdxl) == SDXL_VAE


@pytest.mark.parametrize(
    "cfg",
    [TINY, SMALL, SD_VAE, SDXL_VAE, replace(SD_VAE, force_upcast=False)],
    ids=["tiny", "small", "sd", "sdxl", "no-upcast"],
)
def test_config_round_trip(cfg: VAEConfig) -> None:
    d = vae_config_to_diffusers(cfg)
    assert vae_config_from_diffusers(d) == cfg
    with torch.device("meta"):
        theirs = DiffusersVAE.from_config(d)
    assert vae_config_from_diffusers(dict(theirs.config)) == cfg


@pytest.mark.parametrize(
    "change, word",
    [
        ({"act_fn": "relu"}, "act_fn"),
        ({"mid_block_add_attention": False}, "mid_block_add_attention"),
        ({"latents_mean": [0.0] * 4}, "latents_mean"),
        ({"down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]}, "down_block_types"),
        ({"_class_name": "AutoencoderTiny"}, "_class_name"),
        ({"some_new_option": 1}, "some_new_option"),
    ],
)
def test_config_refuses_unsupported(change: dict, word: str) -> None:
    with pytest.raises(CheckpointError, match=word) as err:
        vae_config_from_diffusers({**SD15_CONFIG_JSON, **change})
    assert "\n" not in str(err.value)
