"""Weight files: safe reading, clear refusals, atomic writing."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from sdlab.checkpoints import formats
from sdlab.cli import main
from sdlab.errors import CheckpointError, SdlabError


class RunsCode:
    """A pickle payload that would create `marker` if anything ever unpickled it unsafely."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_code_running_ckpt_is_refused_and_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(2)}, "extra": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        formats.read_weights(path)
    assert "refused" in _one_line(err) and "evil.ckpt" in str(err.value)
    assert not marker.exists()
    # the plain-pickle route is refused the same way (the payload still never runs)
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump({"w": RunsCode(marker)}, f)
    with pytest.raises(CheckpointError):
        formats.read_weights(tmp_path / "evil.bin")
    assert not marker.exists()


def test_cli_refuses_evil_ckpt_without_traceback(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    torch.save({"extra": RunsCode(marker)}, tmp_path / "evil.ckpt")
    assert main(["convert", str(tmp_path / "evil.ckpt"), str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sdlab: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_weights_only_ckpt_loads_with_extras(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.int64)}, "global_step": 42}, path)
    tensors, extras = formats.read_weights(path, dtype=torch.float16)
    assert tensors["a"].dtype == torch.float16 and tensors["b"].dtype == torch.int64
    assert extras["global_step"] == 42


def test_truncated_safetensors_is_one_line(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.randn(64, 64)}, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        formats.read_weights(bad)
    assert "bad.safetensors" in _one_line(err) and "truncated" in str(err.value)


def test_truncated_ckpt_is_one_line(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"a": torch.randn(256, 256)}}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError) as err:
        formats.read_weights(path)
    assert "cut.ckpt" in _one_line(err)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        formats.read_weights(tmp_path / "nope.safetensors")
    (tmp_path / "x.onnx").write_bytes(b"0")
    with pytest.raises(CheckpointError, match="unknown weights format"):
        formats.read_weights(tmp_path / "x.onnx")


def test_dtype_conversion_and_filter(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"keep.a": torch.randn(4), "drop.b": torch.randn(4)}, path, metadata={"k": "v"})
    tensors, meta = formats.read_weights(path, keep=lambda k: k.startswith("keep."), dtype=torch.bfloat16)
    assert list(tensors) == ["keep.a"] and tensors["keep.a"].dtype == torch.bfloat16
    assert meta == {"k": "v"}


def test_sharded_index(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "m-00001.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "m-00002.safetensors")
    index = {"weight_map": {"a": "m-00001.safetensors", "b": "m-00002.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    state = formats.read_sharded(tmp_path / "m.safetensors.index.json")
    assert set(state) == {"a", "b"}
    index["weight_map"]["c"] = "m-00002.safetensors"
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing"):
        formats.read_sharded(tmp_path / "m.safetensors.index.json")


def test_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "out.safetensors"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(formats, "save_file", boom)
    with pytest.raises(SdlabError, match="could not be written \\(disk full\\); nothing was saved"):
        formats.write_safetensors(target, {"a": torch.ones(1)}, {})
    assert not target.exists() and os.listdir(tmp_path) == []
