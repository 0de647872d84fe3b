"""Progress previews: the shipped model's learned previewer against its real VAE decode, SD's linear factors,
the fall-back to the VAE, and what a preview costs next to a U-Net call."""

from __future__ import annotations

import statistics
import timeit

import numpy as np
import pytest
import torch

from sdlab.checkpoints.load import Components
from sdlab.config import PRESETS
from sdlab.checkpoints.preview import load_preview_net, previewer_for, save_preview_net
from sdlab.models.preview import SD_FACTORS, SDXL_FACTORS, LinearPreview, PreviewNet, PreviewNetConfig, vae_signature
from sdlab.models.vae import AutoencoderKL
from sdlab.pipelines.runner import Runner

# |preview - decode| in 8-bit levels on this file's 28 latents (16 held-out images, 12 steps' x̂0), measured:
# mean 6.1, worst image's mean 15.5, 99th percentile 70 (the rest is at shape edges). benchmarks/fit_preview.py
# on 980 held-out latents: mean 3.4 on clean latents, 8.3 on x̂0 of every sampling step.
MAX_MEAN_LEVELS = 8.0
MAX_IMAGE_MEAN_LEVELS = 20.0
MAX_P99_LEVELS = 90
# measured on 2 busy cores: a preview 0.16 ms, a U-Net call 17-37 ms (0.45-0.9%); room for a busier machine
MAX_COST = 0.05


def _arrays(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])  # (B, H, W, 3)


# --- the shipped model ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runner(default_model_path) -> Runner:
    import sdlab

    return sdlab.load(default_model_path, backend="torch").runner


@pytest.fixture(scope="module")
def latents(runner) -> torch.Tensor:
    """Real latents of the default model: posterior samples of held-out shapes, and x̂0 of every sampling step."""
    from sdlab.pipelines.settings import Settings
    from sdlab.train.shapes import ShapesDataset

    data = ShapesDataset("heldout", 16)
    images = torch.stack([data[i][0] for i in range(len(data))])  # (16, 3, 64, 64)
    vae = runner.components.vae
    clean = vae.scale_latents(vae.encode(images).sample(torch.Generator().manual_seed(0)))  # (16, 4, 16, 16)
    seen = []
    settings = Settings("a yellow star above a purple triangle on a grey background", steps=12, seed=7)
    runner.generate_images(settings.resolved(runner.config), on_preview=lambda x: seen.append(x.clone()))
    return torch.cat([clean, *seen])  # (28, 4, 16, 16)


def test_shipped_model_gets_its_learned_previewer(runner):
    assert isinstance(runner.previewer, PreviewNet)


def test_learned_preview_is_close_to_the_vae_decode(runner, latents):
    preview = _arrays(runner.preview(latents))
    decoded = _arrays(runner.decode(latents))
    assert preview.shape == decoded.shape == (len(latents), 64, 64, 3)
    diff = np.abs(preview - decoded)
    assert diff.mean() < MAX_MEAN_LEVELS, diff.mean()
    assert diff.mean(axis=(1, 2, 3)).max() < MAX_IMAGE_MEAN_LEVELS  # no picture far off
    assert np.percentile(diff, 99) < MAX_P99_LEVELS


def test_a_preview_costs_a_small_fraction_of_a_unet_call(runner):
    z = torch.randn(1, 4, 16, 16)
    x, t = torch.randn(2, 4, 16, 16), torch.full((2,), 500.0)
    context = torch.randn(2, runner.config.text[0].tokenizer.max_length, runner.config.unet.cross_attention_dim)

    def median_s(call) -> float:
        return statistics.median(timeit.repeat(call, number=1, repeat=16)[1:])  # the first warms up

    with torch.no_grad():
        unet = median_s(lambda: runner.components.unet(x, t, context))
    preview = median_s(lambda: runner.preview(z))
    assert preview < MAX_COST * unet, f"preview {1e3 * preview:.3f} ms, U-Net call {1e3 * unet:.2f} ms"


def test_a_vae_trained_anew_gets_no_learned_previewer(runner):
    other = AutoencoderKL(runner.config.vae)  # same architecture, other weights
    assert previewer_for(runner.config, other) is None


def test_an_unreadable_previewer_file_only_costs_the_previews(tmp_path, monkeypatch):
    from sdlab.checkpoints import preview

    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    monkeypatch.setattr(preview, "shipped_file", lambda name: tmp_path / "bad.safetensors")
    with pytest.warns(UserWarning, match="previews will decode with the VAE"):
        assert previewer_for(PRESETS["shapes-64"], AutoencoderKL(PRESETS["shapes-64"].vae)) is None


# --- SD's linear factors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, factors", [("sd15", SD_FACTORS), ("sd21", SD_FACTORS), ("sdxl", SDXL_FACTORS)])
def test_sd_models_get_the_published_linear_factors(name, factors):
    previewer = previewer_for(PRESETS[name], vae=torch.nn.Identity())
    assert isinstance(previewer, LinearPreview)
    z = torch.zeros(1, 4, 2, 3)
    z[0, 3, 1, 2] = 1.0  # channel 4 alone at one pixel: its row of factors plus the bias
    rgb = previewer(z)  # (1, 3, 2, 3)
    expected = torch.tensor(factors.weight[3]) + torch.tensor(factors.bias)
    torch.testing.assert_close(rgb[0, :, 1, 2], expected)
    torch.testing.assert_close(rgb[0, :, 0, 0], torch.tensor(factors.bias))


def test_linear_preview_of_a_random_latent():
    z = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))  # SD latents have about unit std
    rgb = LinearPreview(SD_FACTORS)(z)
    assert rgb.shape == (2, 3, 64, 64)
    assert rgb.isfinite().all()
    # each value is a weighted sum of four N(0, 1): std = the norm of its column of factors
    std = torch.tensor(SD_FACTORS.weight).norm(dim=0)  # (3,)
    torch.testing.assert_close(rgb.std(dim=(0, 2, 3)), std, rtol=0.05, atol=0)
    assert rgb.abs().max() < 6 * std.max()


# --- models without one: the VAE decodes --------------------------------------------------------------------
def _tiny_runner(name: str = "tiny-sd1") -> Runner:
    cfg = PRESETS[name]
    torch.manual_seed(0)
    return Runner(Components(cfg, None, AutoencoderKL(cfg.vae).eval(), (), (), "test"))


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sdxl"])
def test_a_model_without_a_previewer_decodes_with_its_vae(name):
    runner = _tiny_runner(name)  # tiny VAEs are not SD's latent space: no linear factors
    assert runner.previewer is None
    z = torch.randn(1, 4, 8, 8)
    assert np.array_equal(_arrays(runner.preview(z)), _arrays(runner.decode(z)))


def test_a_latent_size_preview_is_enlarged_to_the_image_size():
    runner = _tiny_runner()
    runner.previewer = LinearPreview(SD_FACTORS)
    z = torch.randn(1, 4, 8, 6)
    (image,) = runner.preview(z)
    assert image.size == (12, 16)  # f = 2
    pixels = np.asarray(image)
    assert np.array_equal(pixels[::2, ::2], pixels[1::2, 1::2])  # each latent pixel a 2x2 block


def test_preview_net_file_round_trip(tmp_path):
    torch.manual_seed(0)
    net = PreviewNet(PreviewNetConfig(width=8, layers=1, upscale=2))
    vae = AutoencoderKL(PRESETS["tiny-sd1"].vae)
    save_preview_net(net, vae_signature(vae), tmp_path / "p.safetensors")
    loaded, signature = load_preview_net(tmp_path / "p.safetensors")
    z = torch.randn(1, 4, 5, 7)
    assert net(z).shape == (1, 3, 10, 14)
    torch.testing.assert_close(loaded(z), net.half().float()(z), rtol=0, atol=0)  # the file keeps fp16 weights
    torch.testing.assert_close(signature, vae_signature(vae), rtol=0, atol=0)
