"""Textual-inversion files: AUTOMATIC1111 (.pt and .safetensors), diffusers and SDXL layouts read and
written; a round trip keeps every value; bad files are refused in one line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdlab.checkpoints.embeddings import Embedding, read_embedding, write_embedding
from sdlab.errors import CheckpointError


def _vectors(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", ["a1111", "diffusers"])
def test_single_encoder_round_trip(tmp_path, layout):
    original = Embedding("ink-style", (_vectors(3, 32),))
    path = write_embedding(tmp_path / "ink-style.safetensors", original, layout)
    back = read_embedding(path, dims=[32])
    assert back.name == "ink-style" and back.length == 3
    assert torch.equal(back.vectors[0], original.vectors[0])


def test_sdxl_round_trip_keeps_both_encoders(tmp_path):
    original = Embedding("ink", (_vectors(2, 32), _vectors(2, 48, seed=1)))
    path = write_embedding(tmp_path / "ink.safetensors", original)
    back = read_embedding(path, dims=[32, 48])
    assert all(torch.equal(a, b) for a, b in zip(back.vectors, original.vectors))
    with pytest.raises(CheckpointError, match="one text encoder"):
        write_embedding(tmp_path / "x.safetensors", original, "diffusers")


def test_a1111_pickle_and_diffusers_bin_are_read(tmp_path):
    vectors = _vectors(2, 32)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors)},
                "name": "old", "step": 1500, "sd_checkpoint": "abcdef", "sd_checkpoint_name": "model"}, tmp_path / "old.pt")
    assert torch.equal(read_embedding(tmp_path / "old.pt", [32]).vectors[0], vectors)
    torch.save({"<cat-toy>": vectors[0]}, tmp_path / "learned_embeds.bin")  # one vector, shape (D,)
    assert read_embedding(tmp_path / "learned_embeds.bin", [32]).vectors[0].shape == (1, 32)


@pytest.mark.parametrize("tensors, dims, message", [
    ({"emb_params": torch.zeros(2, 32)}, [48], "width 48"),
    ({"emb_params": torch.zeros(2, 32)}, [32, 48], "needs clip_l and clip_g"),
    ({"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(3, 48)}, [32, 48], "different numbers"),
    ({"emb_params": torch.full((1, 32), float("nan"))}, [32], "NaN"),
    ({"a": torch.zeros(1, 32), "b": torch.zeros(1, 32)}, [32], "expected one tensor"),
])
def test_bad_embeddings_are_refused(tmp_path, tensors, dims, message):
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=message) as e:
        read_embedding(tmp_path / "bad.safetensors", dims)
    assert "\n" not in str(e.value)


def test_pickle_with_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"string_to_param": {"*": Payload()}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        read_embedding(tmp_path / "evil.pt", [32])
