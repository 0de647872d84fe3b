"""Parameter tables: per-component and per-block counts equal diffusers' modules, block for block."""

from __future__ import annotations

import json

import pytest
import torch

from sdlab.analysis.params import build_on_meta, parameter_report
from sdlab.checkpoints.keymaps.unet import unet_config_to_diffusers
from sdlab.cli import main
from sdlab.config import preset


def _count(m) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl", "sdxl-refiner", "sd15-inpainting"])
def test_unet_blocks_match_diffusers_blocks(name):
    import diffusers

    cfg = preset(name)
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(cfg.unet))
    report = parameter_report(cfg, build_on_meta(cfg), name)
    blocks = {r.name: r.params for r in report.unet_blocks}
    levels = len(cfg.unet.block_out_channels)
    for i in range(levels):
        assert blocks[f"down {i + 1}"] == _count(ref.down_blocks[i])
        assert blocks[f"up {i + 1}"] == _count(ref.up_blocks[i])
    assert blocks["mid"] == _count(ref.mid_block)
    io = [ref.conv_in, ref.time_embedding, ref.conv_norm_out, ref.conv_out]
    if getattr(ref, "add_embedding", None) is not None:
        io.append(ref.add_embedding)
    assert blocks["io"] == sum(_count(m) for m in io)
    assert sum(blocks.values()) == _count(ref)


def test_sd15_report_figures():
    cfg = preset("sd15")
    report = parameter_report(cfg, build_on_meta(cfg), "sd15", (512, 768)).to_json()
    c = report["components"]
    assert c["unet"] == 859_520_964
    assert c["vae.encoder"] == 34_163_592 and c["vae.decoder"] == 49_490_179
    assert c["text_encoder"] == 123_060_480
    assert report["total_params"] == c["unet"] + c["vae"] + c["text_encoder"]
    assert report["memory_bytes"]["fp16"] == 2 * report["total_params"]
    assert report["latent_shape"] == [1, 4, 96, 64]


def test_inspect_cli(capsys):
    assert main(["inspect", "--preset", "sdxl", "--json", "--size", "1024x768"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["latent_shape"] == [1, 4, 96, 128]
    assert set(out["components"]) >= {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert main(["inspect", "--preset", "sd15"]) == 0
    table = capsys.readouterr().out
    assert "859,520,964" in table and "down 1" in table and "mid" in table


def test_inspect_cli_errors(capsys):
    assert main(["inspect", "--preset", "nope"]) == 1
    assert "unknown preset" in capsys.readouterr().err
    assert main(["inspect", "--preset", "sd15", "--size", "500x512"]) == 1
    assert "multiple of 8" in capsys.readouterr().err
    assert main(["inspect"]) == 1
