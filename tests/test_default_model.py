"""The model sdlab ships: it loads with no --model, draws what simple prompts ask for, and is fast."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import sdlab
from sdlab.analysis.adherence import score_image
from sdlab.api import DEFAULT_MODEL, default_model
from sdlab.errors import SdlabError
from sdlab.train.shapes import ObjectSpec, PromptSpec

# prompts in the training distribution's phrasing; colour is what the acceptance checks on every one
CASES = [
    ("a red circle on a blue background", "red", "circle"),
    ("a yellow square on a black background", "yellow", "square"),
    ("a green star on a white background", "green", "star"),
    ("a blue heart on an orange background", "blue", "heart"),
]


def _shipped() -> bool:
    try:
        default_model()
    except SdlabError:
        return False
    return True


# Until `sdlab train` has produced the shipped weights (issue 4), there is nothing to test here; once
# sdlab/data/shapes-64.safetensors exists every test below runs.
pytestmark = pytest.mark.skipif(not _shipped(), reason="the default model is not shipped yet")


@pytest.fixture(scope="module")
def pipe():
    assert default_model().name == DEFAULT_MODEL
    assert default_model().stat().st_size <= 50 * 2**20, "the shipped weights must stay within 50 MB"
    return sdlab.load()


@pytest.mark.parametrize("prompt, colour, shape", CASES)
def test_object_colour_follows_the_prompt(pipe, prompt, colour, shape):
    spec = PromptSpec(objects=(ObjectSpec(colour, shape, None),), background=None, position=None, relation=None)
    for seed in (0, 1):
        image = pipe.generate(prompt, seed=seed)[0]
        assert image.size == (64, 64)
        assert score_image(image, spec).results["colour"], (prompt, seed)


def test_one_image_samples_within_a_second(pipe):
    pipe.generate("a red circle on a blue background", seed=0)  # warm-up
    start = time.perf_counter()
    pipe.generate("a red circle on a blue background", seed=1)
    assert time.perf_counter() - start <= 1.0


def test_generate_from_a_cold_start(tmp_path):
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "sdlab.cli", "generate", "a red circle on a blue background", "--seed", "0",
         "--out", str(tmp_path / "a.png")], capture_output=True, text=True,
    )
    wall = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "a.png").is_file()
    assert wall <= 5.0, f"cold start took {wall:.1f} s"
