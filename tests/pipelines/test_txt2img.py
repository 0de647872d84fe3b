"""`sdlab generate` against diffusers' own pipelines: the same model folder, prompt, negative prompt,
seed, steps, guidance and size give PNGs within 2/255 per pixel, for every sampler with a diffusers
twin, for an SD1-style, a v-prediction SD2-style and an SDXL-style model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.cli import main
from sdlab.config import preset
from tests.reference import TWINS, diffusers_pipeline, use_twin

PROMPT, NEGATIVE = "a red circle on a blue background", "blurry, lowres"  # no A1111 syntax: diffusers reads it literally
STEPS, GUIDANCE = 8, 6.5
MAX_PIXEL_DIFF = 2  # out of 255

KARRAS = ["dpmpp_2m", "dpmpp_2m_sde", "euler", "lms", "heun", "dpm2", "unipc"]
CASES = [(s, "default") for s in TWINS] + [(s, "karras") for s in KARRAS]


@pytest.fixture(scope="module", params=["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def model(request, tmp_path_factory):
    cfg = preset(request.param)
    pipe = diffusers_pipeline(cfg, seed=21)
    folder = tmp_path_factory.mktemp(request.param) / "model"
    pipe.save_pretrained(folder)
    return cfg, pipe, folder


def _reference(pipe, sampler: str, schedule: str, seed: int, size: int, negative: str | None) -> np.ndarray:
    use_twin(pipe, sampler, schedule)
    out = pipe(
        PROMPT, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(seed), height=size, width=size,
    )
    return np.asarray(out.images[0]).astype(int)


def _ours(folder, tmp_path, sampler, schedule, seed, size, negative: str) -> tuple[np.ndarray, str]:
    out = tmp_path / f"{sampler}-{schedule}-{seed}.png"
    argv = ["generate", PROMPT, "--model", str(folder), "--negative", negative, "--steps", str(STEPS),
            "--guidance", str(GUIDANCE), "--sampler", sampler, "--schedule", schedule, "--seed", str(seed),
            "--width", str(size), "--height", str(size), "--out", str(out)]
    assert main(argv) == 0
    with Image.open(out) as im:
        return np.asarray(im.convert("RGB")).astype(int), im.info["parameters"]


@pytest.mark.parametrize("sampler, schedule", CASES)
def test_generate_matches_diffusers(model, tmp_path, sampler, schedule):
    cfg, pipe, folder = model
    seeds = [3, 1234]
    for seed in seeds:
        ours, parameters = _ours(folder, tmp_path, sampler, schedule, seed, cfg.default_size, NEGATIVE)
        ref = _reference(pipe, sampler, schedule, seed, cfg.default_size, NEGATIVE)
        assert np.abs(ours - ref).max() <= MAX_PIXEL_DIFF, (sampler, schedule, seed)
        assert f"Seed: {seed}" in parameters


def test_sdxl_empty_negative_is_zeroed_like_diffusers(tmp_path):
    cfg = preset("tiny-sdxl")
    pipe = diffusers_pipeline(cfg, seed=22)
    pipe.save_pretrained(tmp_path / "model")
    ours, _ = _ours(tmp_path / "model", tmp_path, "euler", "default", 5, cfg.default_size, "")
    ref = _reference(pipe, "euler", "default", 5, cfg.default_size, None)  # force_zeros_for_empty_prompt
    assert np.abs(ours - ref).max() <= MAX_PIXEL_DIFF


def test_record_and_replay_reproduce_exactly(tmp_path):
    diffusers_pipeline(preset("tiny-sd1"), seed=23).save_pretrained(tmp_path / "model")
    first = tmp_path / "first.png"
    assert main(["generate", PROMPT, "--model", str(tmp_path / "model"), "--steps", "4", "--sampler", "Euler a",
                 "--seed", "9", "--out", str(first)]) == 0
    assert main(["generate", "--replay", str(first), "--out", str(tmp_path / "again.png")]) == 0
    with Image.open(first) as a, Image.open(tmp_path / "again.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
        record = json.loads(a.info["sdlab"])
    assert record["settings"]["sampler"] == "euler_a" and record["settings"]["seed"] == 9


@pytest.mark.parametrize("sampler, schedule", [("euler", "default"), ("euler_a", "default"), ("dpmpp_2m", "default"),
                                               ("dpmpp_2m", "karras"), ("ddim", "default"), ("unipc", "default"),
                                               ("heun", "default")])
def test_default_models_schedule_matches_diffusers(tmp_path, sampler, schedule):
    """The shipped model's schedule (DDPM linear betas, v-prediction, trailing timesteps) on a tiny network."""
    from dataclasses import replace

    cfg = replace(preset("tiny-sd1"), schedule=preset("shapes-64").schedule)
    pipe = diffusers_pipeline(cfg, seed=24)
    pipe.save_pretrained(tmp_path / "model")
    for seed in (3, 8):
        ours, _ = _ours(tmp_path / "model", tmp_path, sampler, schedule, seed, cfg.default_size, NEGATIVE)
        ref = _reference(pipe, sampler, schedule, seed, cfg.default_size, NEGATIVE)
        assert np.abs(ours - ref).max() <= MAX_PIXEL_DIFF, (sampler, schedule, seed)
