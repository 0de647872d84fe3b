"""Seamless tiling: with circular padding the networks live on a torus, so shifting their input (by a
multiple of their downsampling) shifts their output by the same amount, wrapping around; without it the
edges break that symmetry. Checked on the U-Net, the VAE decoder and a whole txt2img run."""

from __future__ import annotations

import numpy as np
import torch

import sdlab
from sdlab.config import preset
from sdlab.models.tiling import circular_padding
from sdlab.models.unet import UNet
from sdlab.models.vae import AutoencoderKL
from sdlab.pipelines.runner import Runner
from tests.reference import diffusers_pipeline, perturb_

CFG = preset("tiny-sd1")


def _roll(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.roll(x, shifts=(k, -k), dims=(-2, -1))


def test_unet_and_decoder_are_shift_equivariant_only_with_tiling():
    torch.manual_seed(0)
    unet = perturb_(UNet(CFG.unet).eval(), 1)
    vae = perturb_(AutoencoderKL(CFG.vae).eval(), 2)
    step = 2 ** (len(CFG.unet.block_out_channels) - 1)  # the U-Net's total downsampling
    f = CFG.vae.downscale
    x, t, context = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 77, CFG.unet.cross_attention_dim)
    with torch.no_grad():
        for tiled in (True, False):
            with circular_padding(unet, vae, enabled=tiled):
                unet_gap = (unet(_roll(x, step), t, context) - _roll(unet(x, t, context), step)).abs().max()
                vae_gap = (vae.decode(_roll(x, 1)) - _roll(vae.decode(x), f)).abs().max()
            if tiled:
                assert unet_gap < 1e-4 and vae_gap < 1e-4
            else:
                assert unet_gap > 1e-2 and vae_gap > 1e-2
    assert all(m.padding_mode == "zeros" for m in unet.modules() if isinstance(m, torch.nn.Conv2d))


def test_tiled_generation_wraps_around(tmp_path, monkeypatch):
    diffusers_pipeline(CFG, seed=61).save_pretrained(tmp_path / "model")
    pipe = sdlab.load(tmp_path / "model")
    step = 2 ** (len(CFG.unet.block_out_channels) - 1)
    noise = Runner.initial_noise
    images = {}
    for shift in (0, step):
        monkeypatch.setattr(Runner, "initial_noise", lambda self, *a, k=shift: _roll(noise(self, *a), k))
        image = pipe.generate("a red circle", steps=4, seed=5, sampler="euler", tiling=True)[0]
        images[shift] = np.asarray(image).astype(int)
    f = CFG.vae.downscale
    expected = np.roll(images[0], shift=(step * f, -step * f), axis=(0, 1))
    assert np.abs(images[step] - expected).max() <= 1
    assert "Tiling: True" in image.info["parameters"]
