"""ControlNet runs against diffusers' StableDiffusionControlNetPipeline (one and two ControlNets, strength,
start/end windows, guess mode) and StableDiffusionXLControlNetPipeline: the same model and ControlNet
folders, hint image, prompt, seed and scheduler twin give PNGs within 2/255 per pixel."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import sdlab
from sdlab.cli import main
from sdlab.config import controlnet_preset, preset
from sdlab.errors import SdlabError
from sdlab.pipelines.metadata import parse_parameters
from tests.models.test_controlnet import diffusers_controlnet
from tests.reference import diffusers_pipeline, smooth_picture, use_twin

PROMPT, NEGATIVE, STEPS, GUIDANCE = "a red circle on a blue background", "blurry", 8, 6.0
MAX_PIXEL_DIFF = 2


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def _hint(size: int, seed: int) -> Image.Image:
    """A scribble-like hint: white strokes on black."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        draw.line([tuple(rng.integers(0, size, 2)) for _ in range(3)], fill=(255, 255, 255), width=2)
    return image


def _folders(tmp_path_factory, family: str, count: int, seed: int):
    cfg = preset(f"tiny-{family}")
    pipe = diffusers_pipeline(cfg, seed=seed)
    root = tmp_path_factory.mktemp(f"control-{family}")
    pipe.save_pretrained(root / "model")
    nets = []
    for i in range(count):
        net = diffusers_controlnet(controlnet_preset(f"tiny-controlnet-{family}"), seed=seed + 10 * (i + 1))
        net.save_pretrained(root / f"controlnet{i}")
        nets.append(net)
    return cfg, pipe, nets, root


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    cfg, pipe, nets, root = _folders(tmp_path_factory, "sd1", 2, 70)
    return cfg, pipe, nets, root, sdlab.load(root / "model")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    cfg, pipe, nets, root = _folders(tmp_path_factory, "sdxl", 1, 80)
    return cfg, pipe, nets, root, sdlab.load(root / "model")


def _reference(cls, pipe, nets, hints, sampler, seed, *, scales, starts, ends, guess=False):
    many = len(nets) > 1
    reference = cls.from_pipe(pipe, controlnet=nets if many else nets[0])
    use_twin(reference, sampler)
    return reference(
        PROMPT, image=hints if many else hints[0], negative_prompt=NEGATIVE, num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(seed),
        controlnet_conditioning_scale=scales if many else scales[0], control_guidance_start=starts if many else starts[0],
        control_guidance_end=ends if many else ends[0], guess_mode=guess,
    ).images[0]


CASES = [  # sampler, scales, starts, ends, guess mode
    ("euler", [0.8], [0.0], [1.0], False),
    ("dpmpp_2m", [1.3], [0.2], [0.7], False),
    ("ddim", [1.0], [0.0], [1.0], True),
    ("euler_a", [0.7, 1.2], [0.0, 0.3], [1.0, 0.8], False),
    ("unipc", [1.0, 0.5], [0.0, 0.0], [0.5, 1.0], True),
]


@pytest.mark.parametrize("sampler, scales, starts, ends, guess", CASES)
def test_controlnet_matches_diffusers(sd1, sampler, scales, starts, ends, guess):
    cfg, pipe, nets, root, ours = sd1
    n = len(scales)
    hints = [_hint(cfg.default_size, seed=i) for i in range(n)]
    control = [sdlab.Control(root / f"controlnet{i}", hints[i], strength=scales[i], start=starts[i], end=ends[i],
                             guess_mode=guess) for i in range(n)]
    for seed in (1, 314):
        ref = _reference(diffusers.StableDiffusionControlNetPipeline, pipe, nets[:n], hints, sampler, seed,
                         scales=scales, starts=starts, ends=ends, guess=guess)
        out = ours.generate(PROMPT, negative=NEGATIVE, steps=STEPS, guidance=GUIDANCE, seed=seed, sampler=sampler,
                            schedule="default", control=control)[0]
        assert np.abs(_pixels(out) - _pixels(ref)).max() <= MAX_PIXEL_DIFF, (sampler, seed)
    pairs = parse_parameters(out.info["parameters"])[2]
    assert f"Weight: {scales[0]:g}" in pairs["ControlNet 0"] and "Model: controlnet0" in pairs["ControlNet 0"]


def test_controlnet_changes_the_image(sd1):
    cfg, pipe, nets, root, ours = sd1
    common = dict(steps=4, seed=2, sampler="euler")
    plain = _pixels(ours.generate(PROMPT, **common)[0])
    steered = _pixels(ours.generate(PROMPT, control=[sdlab.Control(root / "controlnet0", _hint(32, 0))], **common)[0])
    off = _pixels(ours.generate(PROMPT, control=[sdlab.Control(root / "controlnet0", _hint(32, 0), strength=0.0)],
                                **common)[0])
    assert not np.array_equal(plain, steered)
    assert np.abs(plain - off).max() <= 1


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_sdxl_controlnet_matches_diffusers(sdxl, sampler):
    cfg, pipe, nets, root, ours = sdxl
    hint = _hint(cfg.default_size, seed=5)
    control = [sdlab.Control(root / "controlnet0", hint, strength=0.9, end=0.8)]
    for seed in (3, 40):
        ref = _reference(diffusers.StableDiffusionXLControlNetPipeline, pipe, nets, [hint], sampler, seed,
                         scales=[0.9], starts=[0.0], ends=[0.8])
        out = ours.generate(PROMPT, negative=NEGATIVE, steps=STEPS, guidance=GUIDANCE, seed=seed, sampler=sampler,
                            schedule="default", control=control)[0]
        assert np.abs(_pixels(out) - _pixels(ref)).max() <= MAX_PIXEL_DIFF, (sampler, seed)


def test_controlnet_of_another_family_is_refused(sd1, sdxl):
    _, _, _, root_xl, _ = sdxl
    _, _, _, _, ours = sd1
    with pytest.raises(SdlabError, match="cannot steer this sd1 model"):
        ours.generate(PROMPT, steps=2, control=[sdlab.Control(root_xl / "controlnet0", _hint(32, 0))])


def test_cli_controlnet_with_canny(sd1, tmp_path, capsys):
    cfg, pipe, nets, root, ours = sd1
    picture = tmp_path / "picture.png"
    smooth_picture(32, seed=4).save(picture)
    out = tmp_path / "out.png"
    argv = ["generate", PROMPT, "--model", str(root / "model"), "--steps", "3", "--seed", "1", "--out", str(out),
            "--controlnet", str(root / "controlnet0"), "--control-image", str(picture), "--control-preprocess", "canny",
            "--control-strength", "0.6", "--control-end", "0.5"]
    assert main(argv) == 0
    with Image.open(out) as im:
        unit = parse_parameters(im.info["parameters"])[2]["ControlNet 0"]
    assert "Module: canny" in unit and "Weight: 0.6" in unit and "Guidance End: 0.5" in unit
    bad = tmp_path / "bad.png"
    assert main(["generate", PROMPT, "--model", str(root / "model"), "--steps", "3", "--out", str(bad),
                 "--controlnet", str(root / "controlnet0"), "--control-image", str(picture),
                 "--control-image", str(picture)]) == 1
    assert "1 --controlnet but 2 --control-image" in capsys.readouterr().err
    assert not bad.exists()
