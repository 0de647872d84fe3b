"""`sdlab finetune` on the default model: every method runs, writes files the loaders read back, resumes
exactly, and trains data-parallel under torchrun with both ranks' weights identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sdlab
from sdlab.checkpoints.embeddings import read_embedding
from sdlab.cli import main
from sdlab.errors import SdlabError
from sdlab.prompts import encode_prompt
from tests.train.test_lora_concept import write_rings

REPO = Path(__file__).resolve().parents[2]
QUICK = ["--steps", "4", "--batch", "2", "--lr", "1e-3", "--precision", "fp32", "--save-every", "2"]


@pytest.fixture(scope="module")
def rings(tmp_path_factory, default_model_path) -> Path:
    return write_rings(tmp_path_factory.mktemp("data") / "rings")


def test_lora_resumes_exactly(rings, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["finetune", "--data", str(rings), "--out", str(straight), *QUICK]) == 0
    assert main(["finetune", "--data", str(rings), "--out", str(split), *QUICK, "--stop-at", "2"]) == 0
    assert not (split / "split.safetensors").exists()
    assert main(["finetune", "--out", str(split), "--resume"]) == 0
    a, b = load_file(straight / "straight.safetensors"), load_file(split / "split.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_up.weight") and a[k].abs().max() > 0 for k in a)  # up starts at zero; it moved


def _two_processes(*args: str, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """`sdlab finetune ARGS` as two CPU processes on gloo, under torchrun or accelerate launch."""
    if launcher == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        prefix = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--num_machines",
                  "1", "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [*prefix, "-m", "sdlab.cli", "finetune", *args, "--device", "cpu", "--precision", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_gloo_ranks_keep_lora_weights_identical(rings, tmp_path, launcher):
    out = tmp_path / "ddp"
    proc = _two_processes("--data", str(rings), "--out", str(out), "--steps", "3", "--batch", "2", "--accumulate", "2",
                          "--train-text-encoder", launcher=launcher)
    ranks = [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    seen = [{i for batch in r["first_batches"][:2] for i in batch} for r in ranks]  # the first epoch: 4 batches of 2
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(8))
    assert proc.stdout.strip().splitlines() == [str(out / "ddp.safetensors")]  # rank 0 alone writes and prints
    network = sdlab.load().load_lora(out / "ddp.safetensors")
    assert set(network.updates) == {"unet", "text_encoder"} and network.unmatched == []


def test_textual_inversion_learns_only_its_vectors(rings, tmp_path):
    out = tmp_path / "ti"
    argv = ["finetune", "--method", "textual-inversion", "--name", "zqx", "--caption", "a zqx on a white background",
            "--data", str(rings), "--out", str(out), "--vectors", "2", "--init-word", "ring", "--diffusers", *QUICK]
    assert main(argv) == 0
    pipe = sdlab.load()
    width = pipe.config.text[0].encoder.hidden_size
    embedding = read_embedding(out / "zqx.safetensors", [width])
    assert embedding.length == 2
    diffusers_layout = read_embedding(out / "zqx-diffusers" / "learned_embeds.safetensors", [width])
    assert torch.equal(diffusers_layout.vectors[0], embedding.vectors[0])
    encoder = pipe.runner.components.text_encoders[0]
    ring = encoder.text_model.embeddings.token_embedding.weight[pipe.runner.components.tokenizers[0].encode("ring")[0]]
    assert not torch.allclose(embedding.vectors[0], ring.expand(2, -1))  # trained away from the initial word

    comps = pipe.runner.components
    before = encode_prompt("a zqx ring", comps.text_encoders, comps.tokenizers, pipe.config.text)[0]
    pipe.load_embeddings([out / "zqx.safetensors"])
    after = encode_prompt("a zqx ring", comps.text_encoders, comps.tokenizers, pipe.config.text)[0]
    assert not torch.equal(before, after)
    assert torch.equal(before[:, :2], after[:, :2])  # BOS and "a" come before the name: unchanged


def test_textual_inversion_needs_its_name_in_the_captions(rings, tmp_path):
    with pytest.raises(SdlabError, match="must contain it"):
        from sdlab.train.finetune import FinetuneSettings, finetune

        finetune(FinetuneSettings(out=str(tmp_path / "x"), data=(str(rings),), method="textual-inversion", name="qqq"))


def test_full_finetune_writes_a_model_and_keeps_the_vae(rings, tmp_path, default_model_path):
    out = tmp_path / "full"
    assert main(["finetune", "--method", "full", "--data", str(rings), "--out", str(out), "--ema-decay", "0.9",
                 "--gradient-checkpointing", *QUICK]) == 0
    tuned, base = load_file(out / "full.safetensors"), load_file(default_model_path)
    unet = [k for k in base if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(tuned[k].float(), base[k].float()) for k in unet)
    assert all(torch.equal(tuned[k].float(), base[k].float()) for k in base if k.startswith("first_stage_model."))
    (image,) = sdlab.load(out / "full.safetensors").generate("a red zqx ring", steps=2, seed=0)
    assert image.size == (64, 64)


def test_dreambooth_makes_class_images_once_and_weights_them(rings, tmp_path):
    out = tmp_path / "db"
    argv = ["finetune", "--data", str(rings), "--out", str(out), "--caption", "a photo of zqx ring",
            "--class-prompt", "a red circle", "--class-images", "2", "--prior-weight", "0.5", "--sample-steps", "2",
            *QUICK]
    assert main(argv) == 0
    made = sorted((out / "class-images").glob("*.png"))
    assert [p.name for p in made] == ["00000.png", "00001.png"]
    cache = torch.load(out / "latents.pt", weights_only=True)
    assert cache["weights"].tolist() == [1.0] * 8 + [0.5] * 2
    stamps = [p.stat().st_mtime_ns for p in made]
    assert main([*argv[:4], str(tmp_path / "db2"), *argv[5:]]) == 0  # another run makes its own
    assert [p.stat().st_mtime_ns for p in made] == stamps


def test_buckets_keep_aspect_ratios(tmp_path, default_model_path):
    data = tmp_path / "wide"
    data.mkdir()
    for i, size in enumerate([(128, 64), (128, 64), (64, 128), (64, 128), (64, 64), (64, 64)]):
        Image.new("RGB", size, (200, 30 * i, 40)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a zqx")
    out = tmp_path / "run"
    assert main(["finetune", "--data", str(data), "--out", str(out), "--buckets", *QUICK]) == 0
    cache = torch.load(out / "latents.pt", weights_only=True)
    shapes = [tuple(m.shape[-2:]) for m in cache["moments"]]
    assert len(set(shapes)) == 3 and shapes[0][1] > shapes[0][0] and shapes[2][0] > shapes[2][1]
    assert shapes[4][0] == shapes[4][1]


def test_fsdp_full_finetune_resumed_follows_ddp(rings, tmp_path):
    common = ["--method", "full", "--data", str(rings), "--steps", "2", "--batch", "2", "--lr", "1e-3",
              "--train-text-encoder", "--ema-decay", "0.9"]
    _two_processes(*common, "--out", str(tmp_path / "ddp"))
    _two_processes(*common, "--out", str(tmp_path / "fsdp"), "--fsdp", "--stop-at", "1")
    _two_processes("--out", str(tmp_path / "fsdp"), "--resume")  # gathered, saved, scattered back
    ddp, fsdp = load_file(tmp_path / "ddp" / "ddp.safetensors"), load_file(tmp_path / "fsdp" / "fsdp.safetensors")
    assert fsdp.keys() == ddp.keys()
    # the same steps as DDP up to the order of sums: Adam's steps move weights by ~lr (1e-3), sharding by far
    # less; a resume that lost the optimizer's moments or the weights would move most of them by ~lr
    assert max((fsdp[k] - ddp[k]).abs().max().item() for k in fsdp) < 1e-3
    differing = sum(((fsdp[k] - ddp[k]).abs() > 1e-6).sum().item() for k in fsdp)
    assert differing < 1e-3 * sum(v.numel() for v in fsdp.values())
    ranks = [json.loads((tmp_path / "fsdp" / "ranks" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["sharded"] and ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
