"""Numerical failure: a half-precision VAE that overflows decodes again in fp32 (the user is told), and
NaN latents or a VAE that yields NaN in every precision never become a saved picture."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sdlab
from sdlab.cli import main
from sdlab.config import preset
from sdlab.errors import SdlabError, SdlabWarning
from tests.reference import diffusers_pipeline

RUN = dict(steps=3, sampler="euler", schedule="default", seed=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("numerics") / "model"
    diffusers_pipeline(preset("tiny-sd1"), seed=61).save_pretrained(path)
    return path


def _overflowing(vae: torch.nn.Module, scale: float = 1e5) -> None:
    """Scale the decoder's first convolution: its residual stream leaves fp16's range (65504); the output
    norm brings fp32's back, so fp32 still decodes a finite picture."""
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(scale)
        vae.decoder.conv_in.bias.mul_(scale)


def test_an_overflowing_fp16_vae_is_retried_in_fp32(folder, tmp_path):
    half = sdlab.load(folder, dtype="fp16")
    half.runner.components.vae.half()  # as a VAE that does not ask to be upcast (e.g. an fp16-fixed one)
    _overflowing(half.runner.components.vae)
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)).half()
    raw = half.runner.components.vae.decode(half.runner.components.vae.unscale_latents(latents))
    assert not torch.isfinite(raw).all()  # the overflow really happens in fp16
    with pytest.warns(SdlabWarning, match="overflowed in float16; decoded again in fp32"):
        (image,) = half.generate("a red circle", **RUN)
    reference = sdlab.load(folder)  # fp32 through and through, with the same change to its VAE
    _overflowing(reference.runner.components.vae)
    (expected,) = reference.runner.decode(latents.float())
    assert np.asarray(image).std() > 0  # a picture, not black
    (retried,) = half.runner.decode(latents)
    assert np.abs(np.asarray(retried).astype(int) - np.asarray(expected).astype(int)).max() <= 2


def test_nan_latents_are_refused(folder):
    pipe = sdlab.load(folder)
    with pytest.raises(SdlabError, match="NaN or infinite latents"):
        pipe.runner.decode(torch.full((1, 4, 4, 4), float("nan")))


def test_a_vae_that_yields_nan_in_every_precision_saves_nothing(folder, tmp_path):
    pipe_folder = tmp_path / "broken"
    shutil.copytree(folder, pipe_folder)
    vae_file = pipe_folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(vae_file)
    state["decoder.conv_out.bias"] = torch.full_like(state["decoder.conv_out.bias"], float("nan"))
    save_file(state, vae_file)
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle", "--model", str(pipe_folder), "--steps", "2", "--out", str(out)]) == 1
    assert not out.exists()


def test_a_unet_that_turns_nan_stops_the_run_at_that_step(folder, monkeypatch):
    pipe = sdlab.load(folder)
    unet = pipe.runner.components.unet
    real = type(unet).forward
    calls = []

    def poisoned(self, x, *args, **kwargs):
        calls.append(1)
        out = real(self, x, *args, **kwargs)
        return out * float("nan") if len(calls) >= 3 else out

    monkeypatch.setattr(type(unet), "forward", poisoned)
    with pytest.raises(SdlabError, match=r"NaN or infinite at step 3 of 6"):
        pipe.generate("a red circle", steps=6, sampler="euler", schedule="default", seed=1, guidance=1.0)
    assert len(calls) == 3  # stopped there, not after the last step
