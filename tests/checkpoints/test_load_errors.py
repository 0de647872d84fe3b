"""A wrong-architecture, wrong-family or incomplete checkpoint gives one clear line."""

from __future__ import annotations

import pytest
import torch

from sdlab.checkpoints import load as loading
from sdlab.checkpoints.detect import VAE_PREFIX
from sdlab.checkpoints.formats import read_weights
from sdlab.checkpoints.save import save_single_file
from sdlab.cli import main
from sdlab.errors import CheckpointError
from sdlab.analysis.params import build_on_meta
from sdlab.config import preset


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """A tiny SD1 single file written by sdlab from randomly initialised networks."""
    cfg = preset("tiny-sd1")
    torch.manual_seed(0)
    from sdlab.models.clip import CLIPTextModel
    from sdlab.models.unet import UNet
    from sdlab.models.vae import AutoencoderKL
    from sdlab.tokenizer import Tokenizer

    comps = loading.Components(
        cfg, UNet(cfg.unet), AutoencoderKL(cfg.vae), (CLIPTextModel(cfg.text[0].encoder),),
        (Tokenizer(cfg.text[0].tokenizer),), "random", {},
    )
    return save_single_file(comps, tmp_path_factory.mktemp("tiny") / "tiny-sd1.safetensors")


def _one_line(err) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


def test_wrong_family_config_is_one_line(tiny_file):
    with pytest.raises(CheckpointError) as err:
        loading.load(tiny_file, config="tiny-sdxl")
    assert "sd1 checkpoint" in _one_line(err) and "tiny-sdxl" in str(err.value) and str(tiny_file) in str(err.value)


def test_wrong_architecture_lists_keys(tiny_file, tmp_path):
    # Without sdlab's config metadata the file is read as SD 1.5, whose shapes it does not have.
    from safetensors.torch import save_file

    state, _ = read_weights(tiny_file)
    bare = tmp_path / "bare.safetensors"
    save_file(state, bare)
    with pytest.raises(CheckpointError) as err:
        loading.load(bare)
    msg = _one_line(err)
    assert "bare.safetensors (U-Net)" in msg and ("shapes differ" in msg or "missing" in msg)


def test_missing_component_is_named(tiny_file, tmp_path):
    from safetensors.torch import save_file

    state, meta = read_weights(tiny_file)
    save_file({k: v for k, v in state.items() if not k.startswith(VAE_PREFIX)}, tmp_path / "novae.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match="no VAE inside"):
        loading.load(tmp_path / "novae.safetensors")
    dropped = dict(state)
    dropped.pop("model.diffusion_model.out.2.bias")
    save_file(dropped, tmp_path / "short.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing 1 keys \(out.2.bias\)"):
        loading.load(tmp_path / "short.safetensors")


def test_cli_errors_exit_nonzero_without_traceback(tiny_file, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(tiny_file.read_bytes()[:1000])
    for argv in (
        ["convert", str(bad), str(tmp_path / "o.safetensors")],
        ["convert", str(tmp_path / "nothing.safetensors"), str(tmp_path / "o2")],
        ["convert", str(tiny_file), str(tmp_path / "o3"), "--config", "sdxl"],
        ["inspect", str(bad)],
    ):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("sdlab: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o3").exists()


def test_hub_id_unreachable_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError) as err:
        loading.load("someone/not-cached-model")
    msg = _one_line(err)
    assert "someone/not-cached-model" in msg and "local" in msg


def test_inspect_a_file_matches_preset_counts(tiny_file, capsys):
    import json

    assert main(["inspect", str(tiny_file), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    meta = build_on_meta(preset("tiny-sd1"))
    assert out["components"]["unet"] == sum(p.numel() for p in meta["unet"].parameters())


def test_training_leftovers_of_real_files_are_ignored(tiny_file, tmp_path):
    """Original files also hold the noise schedule, EMA bookkeeping, CLIP's position_ids and
    sometimes the VAE's training loss; none of them is a weight sdlab needs."""
    from safetensors.torch import save_file

    state, meta = read_weights(tiny_file)
    extra = {
        "alphas_cumprod": torch.linspace(1, 0, 1000),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1000),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "first_stage_model.loss.logvar": torch.zeros(()),
    }
    save_file({**state, **extra}, tmp_path / "real.safetensors", metadata=meta)
    loaded = loading.load(tmp_path / "real.safetensors")
    plain = loading.load(tiny_file)
    for a, b in zip(loaded.modules().values(), plain.modules().values()):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
