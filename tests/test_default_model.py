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

# prompts in the training distribution's phrasing; colour is what the acceptance checks on every one.
# The shipped model gets object colour right for only 36-39% of held-out prompts (README); green objects
# are its plainest failure (seeds 0-5 of "a green circle on a blue background" draw none), kept here as a
# strict xfail so that a better model turns it into a failure to update, not a silent pass.
WEAK_ON_GREEN = pytest.mark.xfail(strict=True, reason="the shipped model seldom draws a green object")
CASES = [
    ("a red circle on a blue background", "red", "circle"),
    ("a yellow square on a black background", "yellow", "square"),
    pytest.param("a green star on a white background", "green", "star", marks=WEAK_ON_GREEN),
    ("a blue heart on an orange background", "blue", "heart"),
]


def _shipped() -> bool:
    try:
        default_model()
    except SdlabError:
        return False
    return True


# sdlab/data/shapes-64.safetensors is committed; an install without it (a trimmed wheel) skips these.
pytestmark = pytest.mark.skipif(not _shipped(), reason="this install has no default model")


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


# Timings take the fastest of a few runs: on a shared machine a run can only be slowed by others, so the
# fastest is the closest to what the code costs (this VM's speed has been seen to halve for tens of seconds).
def test_one_image_samples_within_a_second(pipe):
    pipe.generate("a red circle on a blue background", seed=0)  # warm-up
    times = []
    for seed in range(1, 6):
        start = time.perf_counter()
        image = pipe.generate("a red circle on a blue background", seed=seed)[0]
        times.append(time.perf_counter() - start)
    assert "Steps: 15," in image.info["parameters"], "the default model's own step count"
    assert min(times) <= 1.0, [f"{t:.2f} s" for t in times]


def test_the_default_model_samples_fifteen_steps_unless_asked(pipe):
    assert pipe.config.default_steps == 15
    assert pipe.settings("a red circle").steps == 15 and pipe.settings("a red circle", steps=20).steps == 20
    assert pipe.runner.onednn is False, "a network this small convolves faster without oneDNN (api._runner)"


def test_generate_from_a_cold_start(tmp_path):
    walls = []
    for attempt in range(3):
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "sdlab.cli", "generate", "a red circle on a blue background", "--seed", "0",
             "--out", str(tmp_path / f"{attempt}.png")], capture_output=True, text=True,
        )
        walls.append(time.perf_counter() - start)
        assert out.returncode == 0, out.stderr
        assert (tmp_path / f"{attempt}.png").is_file()
    assert min(walls) <= 5.0, f"cold starts took {', '.join(f'{w:.1f}' for w in walls)} s"


# --- editing with the default model (issue 5) ---------------------------------------------------------
def _scene_with_a_blue_square_on_the_left():
    from sdlab.train.shapes import PlacedObject, Scene, render_pil

    square = PlacedObject("blue", "square", "large", x=0.25, y=0.5, half=0.2)
    return render_pil(Scene("yellow", (square,), position="left", relation=None), size=64)


def test_inpainting_paints_the_prompt_into_the_mask_and_keeps_the_rest(pipe):
    import numpy as np
    from PIL import Image

    from sdlab.analysis.adherence import analyse

    image = _scene_with_a_blue_square_on_the_left()
    from sdlab.pipelines.masks import blur_mask

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # the empty right half
    kept = np.asarray(blur_mask(mask, 4)) == 0  # beyond the reach of the default 4-pixel blur (21 taps)
    assert kept[:, :20].all() and not kept[:, 22:].any()
    for seed in range(4):
        out = pipe.inpaint(image, mask, "a red circle on a yellow background", seed=seed)[0]
        found = analyse(out).objects
        assert any(d.colour == "red" and d.x > 0.5 for d in found), (seed, found)
        assert any(d.colour == "blue" and d.x < 0.5 for d in found), (seed, found)
        assert np.array_equal(np.asarray(out)[kept], np.asarray(image)[kept])


def test_img2img_strength_zero_keeps_the_image_and_one_ignores_it(pipe):
    import numpy as np

    from sdlab.analysis.adherence import analyse

    image = _scene_with_a_blue_square_on_the_left()
    kept = pipe.img2img(image, "a red circle on a yellow background", strength=0.0, seed=0)[0]
    error = np.abs(np.asarray(kept).astype(int) - np.asarray(image).astype(int)).mean()
    assert error < 4, error  # the VAE's round trip, a few levels out of 255
    assert [(d.colour, d.shape) for d in analyse(kept).objects] == [("blue", "square")]
    prompt = "a red circle on a green background"
    ignored = pipe.img2img(image, prompt, strength=1.0, seed=5)[0]
    assert np.array_equal(np.asarray(ignored), np.asarray(pipe.generate(prompt, seed=5)[0]))


def test_tiled_images_wrap_without_a_seam(pipe):
    import numpy as np

    for seed in range(3):
        x = np.asarray(pipe.generate("a large red star on a blue background", tiling=True, seed=seed)[0]).astype(float)
        seam = (np.abs(x[:, 0] - x[:, -1]).mean() + np.abs(x[0] - x[-1]).mean()) / 2
        interior = (np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=0)).mean()) / 2
        assert seam <= 1.5 * interior + 1.0, (seed, seam, interior)
