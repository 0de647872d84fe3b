"""The OpenVINO backend runs sdlab's own U-Net and VAE decoder with the eager modules' results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlab.config import PRESETS
from sdlab.errors import SdlabError
from sdlab.models.tiling import circular_padding
from sdlab.models.token_merging import token_merging
from sdlab.models.unet import UNet
from sdlab.models.vae import AutoencoderKL

ov = pytest.importorskip("openvino")
from sdlab.backends import openvino as backend  # noqa: E402


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDLAB_CACHE", str(tmp_path / "cache"))


def _unet(name: str, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(PRESETS[name].unet).eval()


def _inputs(name: str, size: int = 8):
    cfg = PRESETS[name].unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, size, size, generator=g)
    context = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    y = torch.randn(2, cfg.addition_embed_dim, generator=g) if cfg.addition_embed_dim else None
    return x, torch.tensor([999.0, 12.5]), context, y


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sdxl"])
def test_unet_matches_the_eager_module_in_fp32(name):
    unet = _unet(name)
    x, t, context, y = _inputs(name)
    with torch.no_grad():
        want = unet(x, t, context, y=y)
        got = backend.OpenVINOUNet(unet)(x, t, context, y=y)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def _has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


# Seen 2026-12-02 on a host with AMX (the same versions passed in CI before): OpenVINO's bf16 U-Net was
# 0.0416 from fp32 where eager bf16 was 0.0176. An open accuracy problem of the OpenVINO bf16 path on AMX,
# not yet understood; kept visible here rather than hidden behind a wider bound.
@pytest.mark.xfail(_has_amx(), reason="OpenVINO bf16 on AMX hosts strays 2.4x farther than eager bf16", strict=False)
def test_unet_in_bf16_is_as_close_to_fp32_as_eager_bf16():
    unet = _unet("tiny-sd1")
    x, t, context, _ = _inputs("tiny-sd1")
    with torch.no_grad():
        exact = unet(x, t, context)
        unet16 = unet.to(torch.bfloat16)
        eager = unet16(x.bfloat16(), t, context.bfloat16()).float()
        got = backend.OpenVINOUNet(unet16)(x.bfloat16(), t, context.bfloat16())
    assert got.dtype == torch.bfloat16
    eager_error = (eager - exact).abs().max()
    assert eager_error > 0  # bf16 really rounds here, so the comparison below means something
    assert (got.float() - exact).abs().max() <= 2 * eager_error


def test_every_input_shape_is_compiled_once_and_each_answers_correctly():
    unet = _unet("tiny-sd1")
    wrapped = backend.OpenVINOUNet(unet)
    with torch.no_grad():
        for size in (8, 16, 8):
            x, t, context, _ = _inputs("tiny-sd1", size)
            assert torch.allclose(wrapped(x, t, context), unet(x, t, context), atol=1e-5)
    assert len(wrapped._compiled.requests) == 2


def test_the_converted_model_is_cached_by_weights(monkeypatch):
    x, t, context, _ = _inputs("tiny-sd1")
    with torch.no_grad():
        backend.OpenVINOUNet(_unet("tiny-sd1"))(x, t, context)
        calls = []
        real = ov.convert_model
        monkeypatch.setattr(ov, "convert_model", lambda *a, **k: calls.append(1) or real(*a, **k))
        backend.OpenVINOUNet(_unet("tiny-sd1"))(x, t, context)  # the same weights: read from the cache
        assert calls == []
        other = _unet("tiny-sd1", seed=1)
        got = backend.OpenVINOUNet(other)(x, t, context)  # other weights: converted anew, and right
        assert calls == [1]
        assert torch.allclose(got, other(x, t, context), atol=1e-5)


def test_controlnet_and_tiling_calls_run_the_eager_module(monkeypatch):
    unet = _unet("tiny-sd1")
    wrapped = backend.OpenVINOUNet(unet)
    x, t, context, _ = _inputs("tiny-sd1")
    monkeypatch.setattr(backend._Wrapped, "_run", lambda *a: pytest.fail("went through OpenVINO"))
    with torch.no_grad():
        with circular_padding(unet):
            assert torch.equal(wrapped(x, t, context), unet(x, t, context))
        with token_merging(unet, 0.5):
            assert torch.equal(wrapped(x, t, context), unet(x, t, context))
        vae = AutoencoderKL(PRESETS["tiny-sd1"].vae).eval()
        z = torch.randn(1, 4, 8, 8)
        with circular_padding(vae):
            assert torch.equal(backend.OpenVINODecoder(vae).decode(z), vae.decode(z))


def test_weights_are_let_go_once_compiled_and_read_back_for_an_eager_call():
    import copy

    unet = _unet("tiny-sd1")
    reference = copy.deepcopy(unet)
    saved = {k: v.clone() for k, v in unet.state_dict().items()}
    reads = []
    wrapped = backend.OpenVINOUNet(unet, reload=lambda: reads.append(1) or {k: v.clone() for k, v in saved.items()})
    x, t, context, _ = _inputs("tiny-sd1")
    with torch.no_grad():
        want = reference(x, t, context)
        assert torch.allclose(wrapped(x, t, context), want, atol=1e-5)
        assert all(p.is_meta for p in unet.parameters()) and not reads  # OpenVINO's copy is the only one
        assert next(wrapped.parameters()).dtype == torch.float32  # what callers ask of the module still answers
        with circular_padding(unet):
            tiled = wrapped(x, t, context)
        with circular_padding(reference):
            assert torch.equal(tiled, reference(x, t, context)) and reads == [1]
        assert not any(p.is_meta for p in unet.parameters())
        assert torch.allclose(wrapped(x, t, context), want, atol=1e-5) and reads == [1]  # kept from then on

    torch.manual_seed(0)
    vae = AutoencoderKL(PRESETS["tiny-sd1"].vae).eval()
    reference = copy.deepcopy(vae)
    saved = {k: v.clone() for k, v in vae.state_dict().items()}
    decoder = backend.OpenVINODecoder(vae, reload=lambda: {k: v.clone() for k, v in saved.items()})
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        decoder.decode(z)
        assert all(p.is_meta for p in vae.decoder.parameters())
        assert not any(p.is_meta for p in vae.encoder.parameters())  # img2img still encodes eagerly
        assert torch.equal(decoder.eager_module.decode(z), reference.decode(z))


def test_vae_decoder_matches_and_the_rest_of_the_vae_is_the_modules():
    torch.manual_seed(0)
    vae = AutoencoderKL(PRESETS["tiny-sd1"].vae).eval()
    wrapped = backend.OpenVINODecoder(vae)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want = vae.decode(z)
        assert (wrapped.decode(z) - want).abs().max() <= 1e-5 * want.abs().max()
    assert wrapped.cfg is vae.cfg and wrapped.encode == vae.encode


def test_pipeline_images_match_the_torch_backend(default_model_path):
    import sdlab

    prompt = "a red circle on a blue background"
    eager, ov_pipe = sdlab.load(default_model_path, backend="torch"), sdlab.load(default_model_path, backend="openvino")
    for options in ({}, {"tiling": True}):  # tiling runs eagerly: the weights are read back from the file
        a = eager.generate(prompt, seed=3, steps=8, **options)[0]
        b = ov_pipe.generate(prompt, seed=3, steps=8, **options)[0]
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1, options


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backend="tensorrt"), "unknown backend 'tensorrt'"),
        (dict(backend="openvino", dtype="fp16"), "fp32 or bf16"),
    ],
)
def test_bad_backend_choices_are_one_line_errors(kwargs, message):
    import sdlab

    with pytest.raises(SdlabError, match=message) as err:
        sdlab.load(**kwargs)
    assert "\n" not in str(err.value)


def test_loras_run_eagerly_and_match_the_torch_backend(default_model_path, tmp_path):
    import torch

    import sdlab
    from sdlab.checkpoints.lora import write_lora
    from sdlab.errors import SdlabError
    from sdlab.models.lora import LowRank

    eager, ov_pipe = sdlab.load(default_model_path, backend="torch"), sdlab.load(default_model_path, backend="openvino")
    g = torch.Generator().manual_seed(0)
    layer = "input_blocks.1.1.transformer_blocks.0.attn2.to_v"
    weight = eager.runner.components.unet.get_submodule(layer).weight
    update = LowRank(2.0, torch.randn(4, weight.shape[1], generator=g) * 0.3, torch.randn(weight.shape[0], 4, generator=g) * 0.3)
    path = write_lora(tmp_path / "x.safetensors", {"unet": {layer: update}}, eager.config.unet, sdxl=False)
    prompt = "a red circle on a blue background"
    a = eager.generate(prompt, seed=3, steps=8, lora=[(path, 1.0)])[0]
    b = ov_pipe.generate(prompt, seed=3, steps=8, lora=[(path, 1.0)])[0]
    plain = ov_pipe.generate(prompt, seed=3, steps=8)[0]
    assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1
    assert np.abs(np.asarray(b).astype(int) - np.asarray(plain).astype(int)).max() > 10
    with pytest.raises(SdlabError, match="fuse-lora"):
        sdlab.load(default_model_path, backend="openvino", fuse_lora=True)
