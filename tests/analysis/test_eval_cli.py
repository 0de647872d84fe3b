"""`sdlab eval adherence` end to end on a tiny random model: it runs, prints the table, writes it."""

from __future__ import annotations

import pytest

from sdlab.cli import main
from sdlab.config import preset
from tests.reference import diffusers_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "tiny"
    cfg = preset("tiny-sd1")
    diffusers_pipeline(cfg, seed=3).save_pretrained(path)
    return path


def test_eval_adherence_table(folder, tmp_path, capsys):
    out = tmp_path / "table.md"
    argv = ["eval", "adherence", "--model", str(folder), "--prompts", "3", "--guidance", "1", "4",
            "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    lines = table.strip().splitlines()
    assert lines[0].startswith("| guidance | images | count | colour | shape")
    assert lines[2].startswith("| 1 | 3 |") and lines[3].startswith("| 4 | 3 |")
    assert out.read_text().strip() == table.strip()


def test_vae_roundtrip_ceiling(folder, capsys):
    assert main(["eval", "adherence", "--model", str(folder), "--prompts", "4", "--vae-roundtrip"]) == 0
    assert "(VAE round trip)" in capsys.readouterr().out


def test_bad_numbers(folder, capsys):
    assert main(["eval", "adherence", "--model", str(folder), "--prompts", "0"]) == 1
    assert "at least 1" in capsys.readouterr().err
