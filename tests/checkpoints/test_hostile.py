"""The hostile corpus (tests/hostile.py) against every loader: model files (single files and diffusers
folders), ControlNets, LoRAs and embeddings. Each file is refused with one line and its payload never runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdlab.checkpoints.controlnet import load_controlnet
from sdlab.checkpoints.embeddings import read_embedding
from sdlab.checkpoints.load import load
from sdlab.checkpoints.lora import read_network
from sdlab.cli import main
from sdlab.config import preset
from sdlab.errors import CheckpointError, SdlabError
from sdlab.models.clip import CLIPTextModel
from sdlab.models.unet import UNet
from tests.hostile import count, malformed_safetensors, malicious_pickles
from tests.reference import diffusers_pipeline

CFG = preset("tiny-sd1")


@pytest.fixture(scope="module")
def modules():
    return {"unet": UNet(CFG.unet), "text_encoder": CLIPTextModel(CFG.text[0].encoder)}


def _loaders(modules, tmp: Path):
    return {
        "model": lambda p: load(p),
        "controlnet": lambda p: load_controlnet(str(p)),
        "lora": lambda p: read_network(p, modules, CFG.unet),
        "embedding": lambda p: read_embedding(p, [CFG.text[0].encoder.hidden_size]),
    }


def _refused(loader, path: Path) -> str:
    with pytest.raises(SdlabError) as e:
        loader(path)
    message = str(e.value)
    assert "\n" not in message and message.strip(), (path.name, message)
    return message


def test_malicious_pickles_are_refused_and_never_run(tmp_path, modules):
    marker = tmp_path / "PWNED"
    corpus = malicious_pickles(tmp_path / "corpus", marker)
    for name, loader in _loaders(modules, tmp_path).items():
        for hostile in corpus:
            message = _refused(loader, hostile.path)
            assert not marker.exists(), f"{hostile.label} ran its payload through the {name} loader"
            suffix = hostile.path.suffix
            if suffix in (".ckpt", ".pt", ".pth", ".bin"):  # read as pickles: refused, naming what it asked for
                assert "refused" in message and ("GLOBAL" in message or "Unsupported" in message), message
            elif suffix == ".safetensors":  # disguised: not a safetensors header
                assert "corrupt safetensors" in message, message
            else:
                assert "unknown" in message, message
            count("malicious pickle x loader")
    assert len(corpus) == 6 * 2 * 2 * 2


def test_a_malicious_component_of_a_diffusers_folder_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    folder = tmp_path / "model"
    diffusers_pipeline(CFG, seed=3).save_pretrained(folder, safe_serialization=False)
    (evil,) = [h for h in malicious_pickles(tmp_path / "c", marker) if "system GLOBAL nested zip" in h.label.replace("os.", "")][:1]
    target = folder / "unet" / "diffusion_pytorch_model.bin"
    target.write_bytes(evil.path.read_bytes())
    message = _refused(load, folder)
    assert "refused" in message and str(target) in message
    assert not marker.exists()
    count("malicious diffusers component")


def test_malformed_safetensors_are_refused_by_every_loader(tmp_path, modules):
    corpus = malformed_safetensors(tmp_path / "corpus")
    for name, loader in _loaders(modules, tmp_path).items():
        for case in corpus:
            message = _refused(loader, case.path)
            assert str(case.path) in message, (name, case.label, message)
            count("malformed safetensors x loader")


def test_the_cli_refuses_without_a_traceback(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = malicious_pickles(tmp_path / "corpus", marker)[0].path
    assert main(["generate", "x", "--model", str(evil), "--out", str(tmp_path / "o.png")]) == 1
    assert main(["generate", "x", "--lora", str(evil), "--out", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("sdlab: error:") == 2
    assert not marker.exists() and not (tmp_path / "o.png").exists()


def test_a_plain_weights_pickle_still_loads(tmp_path):
    torch.save({"emb_params": torch.ones(1, CFG.text[0].encoder.hidden_size)}, tmp_path / "fine.pt")
    assert read_embedding(tmp_path / "fine.pt", [CFG.text[0].encoder.hidden_size]).length == 1


def test_the_payloads_are_live(tmp_path):
    """The corpus is not toothless: a permissive unpickler runs every payload (here, on purpose, harmlessly)."""
    import pickle

    from tests.hostile import _calls, call_pickle

    marker = tmp_path / "PWNED"
    for label, module, name, argument in _calls(marker):
        for opcode in ("GLOBAL", "STACK_GLOBAL"):
            result = pickle.loads(call_pickle(module, name, argument, opcode, nested=True))  # noqa: S301
            if hasattr(result, "wait"):  # Popen: let the child finish
                result.wait()
            state = result["state_dict"]["model.weight"] if isinstance(result, dict) else result
            if hasattr(state, "wait"):
                state.wait()
            assert marker.exists(), (label, opcode)
            marker.unlink()
