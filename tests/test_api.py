"""The Python API and the generate CLI: options, seeds, metadata, one-line errors and no stray files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdlab
from sdlab.cli import main
from sdlab.config import preset
from sdlab.errors import SdlabError
from sdlab.pipelines.metadata import parse_parameters
from tests.reference import diffusers_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "tiny-sd1"
    diffusers_pipeline(preset("tiny-sd1"), seed=4).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(folder):
    return sdlab.load(folder)


def test_generate_returns_images_with_metadata(pipe):
    images = pipe.generate("a cat", negative="a dog", steps=3, guidance=5, sampler="DPM++ 2M Karras", seed=42)
    assert len(images) == 1 and images[0].size == (32, 32)
    prompt, negative, pairs = parse_parameters(images[0].info["parameters"])
    assert (prompt, negative) == ("a cat", "a dog")
    assert pairs["Steps"] == "3" and pairs["Sampler"] == "DPM++ 2M" and pairs["Schedule type"] == "Karras"
    assert pairs["CFG scale"] == "5" and pairs["Seed"] == "42" and pairs["Size"] == "32x32"
    assert pairs["Model"] == "tiny-sd1" and len(pairs["Model hash"]) == 10


def test_batch_uses_consecutive_seeds(pipe):
    batch = pipe.generate("a cat", steps=3, sampler="euler_a", seed=10, batch=3)
    alone = pipe.generate("a cat", steps=3, sampler="euler_a", seed=12)[0]
    assert [parse_parameters(im.info["parameters"])[2]["Seed"] for im in batch] == ["10", "11", "12"]
    assert np.array_equal(np.asarray(batch[2]), np.asarray(alone))
    assert not np.array_equal(np.asarray(batch[0]), np.asarray(batch[1]))


def test_random_seed_is_recorded(pipe):
    image = pipe.generate("a cat", steps=2)[0]
    seed = int(parse_parameters(image.info["parameters"])[2]["Seed"])
    again = pipe.generate("a cat", steps=2, seed=seed)[0]
    assert np.array_equal(np.asarray(image), np.asarray(again))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"width": 33}, "multiple of 2"),
        ({"height": 0}, "positive multiple"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"guidance": float("nan")}, "finite"),
        ({"guidance": float("inf")}, "finite"),
        ({"sampler": "nope"}, "unknown sampler"),
        ({"sampler": "euler", "eta": 0.5}, "takes no eta"),
        ({"clip_skip": 9}, "clip skip"),
        ({"colour": "red"}, "unexpected keyword"),
    ],
)
def test_bad_options_are_one_line_errors(pipe, options, message):
    with pytest.raises(SdlabError, match=message) as err:
        pipe.generate("a cat", **{"steps": 2, **options})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", "31"], "multiple of 2"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--guidance", "nan"], "finite"),
        (["--sampler", "DPM++ 9M"], "unknown sampler"),
    ],
)
def test_cli_bad_input_writes_nothing(folder, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["generate", "a cat", "--model", str(folder), "--out", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sdlab: error:") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_writes_numbered_files_shows_progress_and_png_info(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "a cat", "--model", str(folder), "--steps", "3", "--batch", "2", "--seed", "5",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00000-sdlab.png", "00001-sdlab.png"]
    assert "3/3" in captured.err and "step/s" in captured.err  # the progress bar: steps and rate
    assert main(["png-info", str(out / "00001-sdlab.png")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("a cat\n") and "Seed: 6" in text
    assert main(["png-info", str(tmp_path / "none.png")]) == 1


def test_replay_refuses_extra_options(folder, tmp_path, capsys):
    first = tmp_path / "a.png"
    assert main(["generate", "a cat", "--model", str(folder), "--steps", "2", "--seed", "1", "--out", str(first)]) == 0
    assert main(["generate", "--replay", str(first), "--steps", "5"]) == 1
    assert "--replay takes no" in capsys.readouterr().err


def test_the_openvino_backend_without_openvino_installed_is_a_one_line_error(folder, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(SdlabError, match=r"pip install 'sdlab\[openvino\]'"):
        sdlab.load(folder, backend="openvino")
    out = tmp_path / "a.png"
    assert main(["generate", "a cat", "--model", str(folder), "--backend", "openvino", "--out", str(out)]) == 1
    assert "sdlab[openvino]" in capsys.readouterr().err and not out.exists()


def test_auto_backend_takes_openvino_only_for_large_models_on_the_cpu(monkeypatch):
    import importlib.util

    from torch import nn

    from sdlab.api import choose_backend

    small, large = nn.Linear(10, 10, device="meta"), nn.Linear(20_000, 10_000, device="meta")  # 200M parameters
    cpu = torch.device("cpu")
    assert choose_backend(small, cpu, torch.float32) == "torch"
    assert choose_backend(large, cpu, torch.bfloat16) == "openvino"
    assert choose_backend(large, cpu, torch.float32) == "openvino"
    assert choose_backend(large, cpu, torch.float16) == "torch"
    assert choose_backend(large, torch.device("cuda"), torch.bfloat16) == "torch"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # openvino not installed
    assert choose_backend(large, cpu, torch.float32) == "torch"


def test_the_default_backend_runs_small_models_eagerly(pipe):
    from sdlab.backends.openvino import OpenVINOUNet

    assert not isinstance(pipe.runner.components.unet, OpenVINOUNet)


def test_small_models_convolve_without_onednn_and_make_the_same_image(pipe):
    import torch

    assert pipe.runner.onednn is False  # a tiny U-Net: far below api.ONEDNN_MIN_PARAMETERS
    flags = []  # the oneDNN switch as each U-Net call sees it
    hook = pipe.runner.components.unet.register_forward_pre_hook(
        lambda module, args: flags.append(torch.backends.mkldnn.enabled)
    )
    small = dict(steps=3, seed=5, sampler="euler")
    try:
        plain = np.asarray(pipe.generate("a cat", **small)[0], dtype=np.int16)
        assert set(flags) == {False} and torch.backends.mkldnn.enabled, "off while sampling, on again after"
        flags.clear()
        pipe.runner.onednn = True
        with_onednn = np.asarray(pipe.generate("a cat", **small)[0], dtype=np.int16)
        assert set(flags) == {True}
    finally:
        pipe.runner.onednn = False
        hook.remove()
    assert np.abs(plain - with_onednn).max() <= 1  # the same convolutions, summed in another order


def test_offload_keeps_weights_on_the_host_and_changes_no_pixel(folder):
    # on a GPU the layers would visit it in turn (tests/models/test_offload.py checks that with "meta");
    # here the same hooks run every component and must change nothing
    assert not sdlab.load(folder, low_memory=True).offload  # only with low_memory on CUDA by default
    moved = sdlab.load(folder, offload=True)
    plain = sdlab.load(folder)
    comps = moved.runner.components
    for module in comps.modules().values():
        assert any(m._forward_pre_hooks for m in module.modules())
    small = dict(steps=2, seed=3, sampler="euler", prompt="a (cat:1.2)")
    a, b = moved.generate(**small)[0], plain.generate(**small)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))

def test_low_memory_tiles_large_decodes_and_slices_attention(folder, monkeypatch):
    from sdlab.models.layers import Attention

    low = sdlab.load(folder, low_memory=True)
    plain = sdlab.load(folder)
    small = dict(steps=1, seed=2, sampler="euler")
    a, b = low.generate("a cat", **small)[0], plain.generate("a cat", **small)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))  # slicing is exact; 32x32 is not tiled
    assert "Tiled VAE" not in a.info["parameters"]
    slices = []
    for m in low.runner.components.unet.modules():
        if isinstance(m, Attention):
            m.register_forward_pre_hook(lambda mod, args: slices.append(mod.slice_size))
    monkeypatch.setattr(sdlab.api, "LOW_MEMORY_UNTILED_PIXELS", 32 * 32)  # "large" for a tiny model
    monkeypatch.setattr(sdlab.api, "LOW_MEMORY_SLICE", 100)  # fewer than the 576 queries of 48x48 at f=2
    large = dict(small, width=48, height=48)
    c = low.generate("a cat", **large)[0]
    assert set(slices) == {sdlab.api.LOW_MEMORY_SLICE}
    assert "Tiled VAE: True" in c.info["parameters"]
    d = plain.generate("a cat", vae_tiling=True, **large)[0]
    assert np.array_equal(np.asarray(c), np.asarray(d))
    assert all(m.slice_size is None for m in low.runner.components.unet.modules() if isinstance(m, Attention))
