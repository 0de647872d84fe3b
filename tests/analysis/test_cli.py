"""The lab's commands on the default model: each exits 0, writes what it says, and prints where it went;
bad input ends in one line on stderr and exit 1."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sdlab.analysis.trace import trace_unet
from sdlab.cli import main
from sdlab.config import preset


@pytest.fixture(autouse=True)
def _default_model(default_model_path):
    """Every command here runs the shipped model (skips without it)."""


def _printed_paths(out: str) -> list[Path]:
    return [Path(line) for line in out.splitlines() if line.endswith((".png", ".gif", ".csv", ".md"))]


def test_trace_writes_the_table_it_prints(tmp_path, capsys):
    out = tmp_path / "trace.md"
    assert main(["trace", "a red circle on a blue background", "--flops", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(f"trace of shapes-64 written to {out}")
    text = out.read_text()
    assert text in printed
    # the shipped model: 16x16 latents of 4 channels, a guided batch of 2, a 64x64 image
    assert "| (2, 4, 16, 16) " in text and "| (1, 3, 64, 64) " in text
    flops = trace_unet(preset("shapes-64")).unet_flops
    assert f"{flops / 1e6:,.2f} MFLOP" in text  # the same count as the U-Net alone on the meta device


def test_trace_of_a_preset_as_json(tmp_path, capsys):
    out = tmp_path / "sd15.json"
    assert main(["trace", "--preset", "sd15", "--size", "512x512", "--json", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["size"] == [512, 512] and report["unet_batch"] == 2
    assert report["unet_flops"] == trace_unet(preset("sd15"), (512, 512)).unet_flops
    assert abs(report["unet_params"] - 859_520_964) < 1  # SD 1.5's U-Net
    assert str(out) in capsys.readouterr().out


def test_trace_refuses_a_preset_with_a_prompt(capsys):
    assert main(["trace", "a cat", "--preset", "sd15"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sdlab: error: --preset") and err.count("\n") == 1


def test_attention_writes_one_overlay_per_word(tmp_path, capsys):
    argv = ["attention", "a red circle above a blue square", "--words", "red,blue", "--pixel", "32,16",
            "--steps", "4", "--animate", "--out", str(tmp_path)]
    assert main(argv) == 0
    paths = _printed_paths(capsys.readouterr().out)
    assert [p.name for p in paths] == ["image.png", "words.png", "pixel.png", "steps.gif"]
    from PIL import Image

    image, words = Image.open(paths[0]), Image.open(paths[1])
    assert words.width == 3 * 4 * image.width  # the image and two overlays, each enlarged 4 times
    assert Image.open(paths[3]).n_frames == 4  # one frame per step


def test_attention_names_the_prompts_words_when_one_is_missing(tmp_path, capsys):
    assert main(["attention", "a red circle", "--words", "green", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "'green' is not a word of the prompt" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir()), "nothing is written for a refused request"


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_guidance_sweep_has_a_timed_and_scored_row_per_cell(tmp_path, capsys):
    argv = ["sweep", "guidance", "--scales", "1,7", "--prompts", "2", "--steps", "3", "--out", str(tmp_path)]
    assert main(argv) == 0
    paths = _printed_paths(capsys.readouterr().out)
    assert [p.name for p in paths] == ["grid.png", "cells.csv", "cells.md", "plot.png"]
    rows = _rows(tmp_path / "cells.csv")
    assert [(r["column"], r["guidance"]) for r in rows] == [("cfg 1", "1.0"), ("cfg 7", "7.0")] * 2
    for r in rows:
        assert float(r["seconds"]) > 0
        assert 0 <= float(r["attributes_right"]) <= 1 and int(r["scored"]) == 1  # held-out prompts are scored


def test_sampler_sweep_has_a_row_per_sampler_and_step_count(tmp_path, capsys):
    argv = ["sweep", "sampler", "--samplers", "euler,DPM++ 2M Karras", "--steps", "2,4",
            "--prompt", "a red circle on a blue background", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = _rows(tmp_path / "cells.csv")
    assert [(r["row"], r["steps"]) for r in rows] == [
        ("Euler", "2"), ("Euler", "4"), ("DPM++ 2M Karras", "2"), ("DPM++ 2M Karras", "4")
    ]
    assert all(float(r["seconds"]) > 0 and r["scored"] == "0" for r in rows)  # a user's prompt is not scored
    assert (tmp_path / "grid.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["sweep", "guidance", "--scales", "1,x"], "--scales: expected numbers"),
    (["sweep", "guidance", "--scales", "0.5"], "guidance scales must be finite and >= 1"),
    (["sweep", "sampler", "--samplers", "nonsense"], "nonsense"),
    (["sweep", "sampler", "--steps", "0,5"], "step counts must be at least 1"),
    (["sweep", "guidance", "--prompts", "0"], "--prompts must be at least 1"),
])
def test_sweep_refuses_bad_input_in_one_line(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "sweep")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "sweep").exists()


def test_denoise_video_writes_a_frame_per_step(tmp_path, capsys):
    argv = ["denoise-video", "a red circle on a blue background", "--steps", "5", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"5 frames in {tmp_path / 'frames'}"
    assert [p.name for p in _printed_paths(out)] == ["final.png", "strip.png", "denoise.gif"]
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [f"step-{k:03d}.png" for k in range(5)]


def test_denoise_video_refuses_a_file_as_its_folder_before_any_work(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    assert main(["denoise-video", "a red circle", "--out", str(taken)]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert taken.read_text() == "mine"
