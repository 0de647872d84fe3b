"""Data-parallel training under torchrun: two CPU processes on gloo end with the same weights, having
trained on disjoint shares of the data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sdlab
from tests.train.synthetic import write_folder

REPO = Path(__file__).resolve().parents[2]


def test_two_gloo_ranks_end_equal_on_disjoint_data(tmp_path):
    data = write_folder(tmp_path / "data", count=16)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "sdlab.cli", "train", "--preset", "tiny-sd1", "--data", str(data), "--out", str(out),
        "--vae-steps", "2", "--vae-batch", "2", "--steps", "3", "--batch", "2", "--accumulate", "2",
        "--warmup", "1", "--sample-every", "0", "--device", "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert ranks[0]["ema_sha256"] == ranks[1]["ema_sha256"]
    assert [r["samples_seen"] for r in ranks] == [3 * 2 * 2] * 2  # steps x accumulate x batch, each
    first_epoch = [set(r["first_samples"][:8]) for r in ranks]  # 16 samples, 8 per rank per epoch
    assert not first_epoch[0] & first_epoch[1] and first_epoch[0] | first_epoch[1] == set(range(16))

    assert proc.stdout.strip().splitlines() == [str(out / "model.safetensors")]  # printed by rank 0 only
    (image,) = sdlab.load(out / "model.safetensors").generate("a red disc", steps=2, seed=0)
    assert image.size == (32, 32)
