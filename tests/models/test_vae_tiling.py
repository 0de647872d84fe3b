"""Tiled VAE decoding: close to the untiled decode, no seam where windows meet, and bounded memory."""

from __future__ import annotations

import numpy as np
import torch

from sdlab.config import PRESETS
from sdlab.models.vae import AutoencoderKL
from sdlab.models.vae_tiling import _axis_weights, _window_starts, decode_tiled, record_group_norm_stats


def test_windows_cover_the_axis_and_their_weights_sum_to_one():
    for length, window, overlap in [(64, 32, 8), (100, 32, 8), (33, 32, 4), (20, 32, 8)]:
        starts = _window_starts(length, window, window - overlap)
        size = min(window, length)
        assert starts[0] == 0 and starts[-1] + size == length
        total = torch.zeros(2 * length)
        for k, s in enumerate(starts):
            total[2 * s : 2 * (s + size)] += _axis_weights(starts, k, size, 2)
        assert torch.allclose(total, torch.ones_like(total)), (length, window, overlap)


def test_group_norm_with_recorded_statistics_of_the_same_input_is_the_plain_decode():
    torch.manual_seed(0)
    vae = AutoencoderKL(PRESETS["tiny-sd1"].vae).eval()
    z = torch.randn(1, 4, 12, 12)
    with torch.no_grad():
        stats = record_group_norm_stats(vae.decode, vae, z)
        assert len(stats) == sum(isinstance(m, torch.nn.GroupNorm) for m in vae.decoder.modules())
        # recording left the modules as they were
        assert all("forward" not in vars(m) for m in vae.modules())


def test_small_latents_are_decoded_whole():
    torch.manual_seed(0)
    vae = AutoencoderKL(PRESETS["tiny-sd1"].vae).eval()
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(decode_tiled(vae, z, window=16), vae.decode(z))


def test_a_tiled_decode_of_a_real_latent_matches_the_whole_decode_without_seams(default_model_path):
    """A 256² two-object scene through the default model's VAE (a trained VAE: random weights and random
    latents have no image statistics to share), decoded in 32x32-latent windows: 3 x 3 of them."""
    from sdlab.train.shapes import PlacedObject, Scene, render_pil

    from sdlab.checkpoints.load import load

    vae = load(default_model_path).vae
    objects = (PlacedObject("blue", "square", "large", x=0.3, y=0.5, half=0.2),
               PlacedObject("red", "star", "large", x=0.7, y=0.4, half=0.15))
    image = render_pil(Scene("yellow", objects, position=None, relation="left of"), size=256)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).mode()  # (1, 4, 64, 64)
        whole = vae.decode(z)
        tiled = decode_tiled(vae, z, window=32, overlap=8, margin=16)
    error = (tiled - whole).abs().mean(dim=1)[0] * 127.5  # (256, 256), levels of 255 averaged over RGB
    assert error.mean() < 1.0, error.mean()
    assert error.max() < 10, error.max()
    # no seam: the error on the rows and columns where one window's core ends is no larger than elsewhere
    edges = [4 * s for s in _window_starts(64, 32, 24)[1:]] + [4 * (s + 32) for s in _window_starts(64, 32, 24)[:-1]]
    at_edges = torch.cat([error[e - 2 : e + 2].flatten() for e in edges] + [error[:, e - 2 : e + 2].flatten() for e in edges])
    assert at_edges.mean() <= 1.5 * error.mean() + 0.1, (at_edges.mean(), error.mean())


def test_the_pipeline_option_decodes_in_windows(default_model_path, monkeypatch):
    import sdlab
    import sdlab.pipelines.runner as runner
    from sdlab.pipelines.images import to_pil

    pipe = sdlab.load(default_model_path)
    decoded = []
    real = runner.decode_tiled
    monkeypatch.setattr(runner, "decode_tiled", lambda vae, z: decoded.append(real(vae, z, window=8, overlap=2)) or decoded[-1])
    image = pipe.generate("a red circle on a blue background", seed=1, steps=6, vae_tiling=True)[0]
    assert [d.shape for d in decoded] == [torch.Size([1, 3, 64, 64])]
    assert np.array_equal(np.asarray(image), np.asarray(to_pil(decoded[0])[0]))
    assert "Tiled VAE: True" in image.info["parameters"]
    assert "Tiled VAE" not in pipe.generate("a red circle on a blue background", seed=1, steps=6)[0].info["parameters"]
