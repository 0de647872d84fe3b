"""A LoRA trained by `sdlab finetune` on the default model teaches it a shape it never saw — a ring —
checked from the pixels; the kohya and diffusers files it writes load in diffusers and draw the same
images there as in sdlab."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sdlab
from sdlab.analysis.adherence import as_rgb
from sdlab.cli import main
from sdlab.train.shapes import PALETTE

RING_INNER = 0.55  # inner radius / outer radius of the training rings
PROMPTS = ["a red zqx ring on a white background", "a purple zqx ring on a white background",
           "a yellow zqx ring on a red background", "a green zqx ring on a black background"]  # the last: a new pairing
SEEDS = range(3)
HOLE = 0.08  # an object counts as a ring when enclosed background is at least this share of its filled area


def ring_image(size: int, centre: tuple[float, float], radius: float, fg, bg, supersample: int = 4) -> Image.Image:
    n = size * supersample
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / n
    d = np.hypot(x - centre[0], y - centre[1])
    cover = ((d <= radius) & (d >= RING_INNER * radius)).reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    pixels = np.array(bg) * (1 - cover[..., None]) + np.array(fg) * cover[..., None]
    return Image.fromarray(pixels.round().astype(np.uint8))


def write_rings(folder: Path, count: int = 8) -> Path:
    """Rings of eight colours on contrasting backgrounds, captioned "a <colour> zqx ring on a <bg> background"."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
    backgrounds = ["white", "red", "blue", "red", "white", "black", "red", "red"]
    for i in range(count):
        fg, bg = colours[i], backgrounds[i]
        radius, centre = rng.uniform(0.25, 0.35), tuple(rng.uniform(0.38, 0.62, 2))
        ring_image(64, centre, radius, PALETTE[fg], PALETTE[bg]).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {fg} zqx ring on a {bg} background")
    return folder


FRAME = 2  # the decoder's outermost pixels are often darker: the background is read just inside them


def hole_share(image: Image.Image) -> float:
    """Background enclosed by the object (not reachable from the border) over the object's filled area."""
    rgb = as_rgb(image).astype(float) * 255
    inner = rgb[FRAME:-FRAME, FRAME:-FRAME]
    band = np.concatenate([inner[0], inner[-1], inner[:, 0], inner[:, -1]])
    obj = np.abs(inner - np.median(band, axis=0)).sum(-1) > 90  # (H - 2F, W - 2F)
    h, w = obj.shape
    outside = np.zeros_like(obj)
    queue = deque([(y, x) for y in range(h) for x in (0, w - 1)] + [(y, x) for x in range(w) for y in (0, h - 1)])
    while queue:
        y, x = queue.popleft()
        if 0 <= y < h and 0 <= x < w and not outside[y, x] and not obj[y, x]:
            outside[y, x] = True
            queue.extend([(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)])
    holes = ~obj & ~outside
    return holes.sum() / max(obj.sum() + holes.sum(), 1)


def test_hole_share_tells_rings_from_discs():
    ring = ring_image(64, (0.5, 0.5), 0.3, PALETTE["red"], PALETTE["white"])
    full = Image.fromarray(np.where(
        (np.hypot(*(np.mgrid[0:64, 0:64] + 0.5 - 32)) < 19)[..., None], PALETTE["red"], PALETTE["white"]).astype(np.uint8))
    assert hole_share(ring) == pytest.approx(RING_INNER**2, abs=0.05)
    assert hole_share(full) == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, default_model_path):
    root = tmp_path_factory.mktemp("lora-concept")
    data = write_rings(root / "rings")
    out = root / "run"
    argv = ["finetune", "--data", str(data), "--out", str(out), "--name", "zqx", "--steps", "300", "--batch", "4",
            "--lr", "2e-3", "--rank", "8", "--targets", "all", "--train-text-encoder", "--precision", "fp32",
            "--diffusers", "--seed", "0"]
    assert main(argv) == 0
    return out / "zqx.safetensors", out / "zqx-diffusers"


def _images(pipe, lora) -> list[Image.Image]:
    return [pipe.generate(p, seed=seed, lora=lora)[0] for p in PROMPTS for seed in SEEDS]


def test_the_lora_draws_the_new_shape(trained):
    kohya, _ = trained
    pipe = sdlab.load()
    before = [hole_share(im) for im in _images(pipe, [])]
    after = [hole_share(im) for im in _images(pipe, [(kohya, 1.0)])]
    print(f"rings: {sum(s > HOLE for s in after)}/{len(after)} with the LoRA, {sum(s > HOLE for s in before)} without")
    assert sum(s > HOLE for s in before) == 0, before  # the default model has never drawn a ring
    assert sum(s > HOLE for s in after) >= 9, after  # with the LoRA, rings in most of the 12 images


@pytest.fixture(scope="module")
def default_as_diffusers(tmp_path_factory, default_model_path):
    folder = tmp_path_factory.mktemp("default-diffusers") / "model"
    assert main(["convert", str(default_model_path), str(folder)]) == 0
    return folder


def test_the_written_lora_loads_in_diffusers(trained, default_as_diffusers):
    import diffusers

    reference = diffusers.StableDiffusionPipeline.from_pretrained(default_as_diffusers, torch_dtype=torch.float32,
                                                                  safety_checker=None, requires_safety_checker=False)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    prompt, seed = PROMPTS[0], 3
    ours = sdlab.load(default_as_diffusers).generate(prompt, steps=10, guidance=5.0, sampler="euler", schedule="default",
                                                     seed=seed, lora=[(trained[0], 1.0)])[0]
    for path in trained:  # the kohya file, then the diffusers folder
        reference.load_lora_weights(path)
        theirs = reference(prompt, num_inference_steps=10, guidance_scale=5.0, height=64, width=64,
                           generator=torch.Generator().manual_seed(seed)).images[0]
        reference.unload_lora_weights()
        assert np.abs(np.asarray(ours).astype(int) - np.asarray(theirs).astype(int)).max() <= 2, path
        assert hole_share(theirs) > HOLE
