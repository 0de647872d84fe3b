"""Requests that would not fit in memory are refused before any work, with an estimate; the estimate
is at least what decoding and a U-Net step really take (measured in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdlab
from sdlab.cli import main
from sdlab.config import preset
from sdlab.errors import SdlabError
from sdlab.pipelines import memory
from sdlab.pipelines.settings import Settings

REPO = Path(__file__).resolve().parents[2]
MEASURE = r"""
import json, resource, sys, torch
from sdlab.config import preset
from sdlab.models.unet import UNet
from sdlab.models.vae import AutoencoderKL
cfg, side = preset(sys.argv[1]), int(sys.argv[2])
f = cfg.vae.downscale
unet, vae = UNet(cfg.unet).eval(), AutoencoderKL(cfg.vae).eval()
x = torch.randn(2, cfg.unet.in_channels, side // f, side // f)
c = torch.randn(2, 77, cfg.unet.cross_attention_dim)
with torch.inference_mode():
    unet(x[:, :, :8, :8], torch.tensor([1, 1]), c); vae.decode(x[:1, :4, :8, :8])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    unet(x, torch.tensor([1, 1]), c); vae.decode(x[:1, :4])
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024))
"""


@pytest.mark.parametrize("name, side", [("tiny-sd1", 256), ("shapes-64", 512)])
def test_the_estimate_covers_what_a_step_and_a_decode_take(name, side):
    out = subprocess.run([sys.executable, "-c", MEASURE, name, str(side)], capture_output=True, text=True, cwd=REPO,
                         env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}, timeout=300, check=True)
    measured = json.loads(out.stdout)
    cfg = preset(name)
    s = Settings("x", width=side, height=side).resolved(cfg)
    estimate = memory.activation_bytes(cfg, s, torch.float32, torch.float32, tiled=False)
    assert measured <= estimate, (measured / 2**20, estimate / 2**20)


def test_tiling_bounds_the_decode():
    cfg = preset("sd15")
    big = Settings("x", width=2048, height=2048).resolved(cfg)
    whole = memory.activation_bytes(cfg, big, torch.float16, torch.float32, tiled=False)
    tiled = memory.activation_bytes(cfg, big, torch.float16, torch.float32, tiled=True)
    assert whole > 3 * tiled  # the decoder's activations grow with the image, a tile's do not


def test_too_big_is_refused_up_front_in_one_line(monkeypatch, tmp_path, capsys, default_model_path):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 64 * 2**20)
    monkeypatch.setattr(sdlab.api, "free_bytes", lambda device: 64 * 2**20)
    pipe = sdlab.load()
    with pytest.raises(SdlabError, match=r"needs about .* GiB beyond the weights and 0.1 GiB are free; try --vae-tiling"):
        pipe.generate("x", width=1024, height=1024, steps=1)
    calls = []
    with monkeypatch.context() as patch:
        patch.setattr(pipe.runner, "denoise", lambda *a, **k: calls.append(1))
        with pytest.raises(SdlabError):
            pipe.generate("x", width=1024, height=1024, steps=1)
    assert calls == []  # refused before any sampling
    (image,) = pipe.generate("x", steps=1)  # 64x64 fits
    out = tmp_path / "big.png"
    assert main(["generate", "x", "--width", "1024", "--height", "1024", "--steps", "1", "--out", str(out)]) == 1
    assert "GiB are free" in capsys.readouterr().err and not out.exists()
