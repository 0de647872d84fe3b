"""Inpainting: the 9-channel way against diffusers' StableDiffusionInpaintPipeline, the blended way (any model)
against the same pipeline on a 4-channel model and by its invariant (outside the mask the network always sees
the original's latents noised to the current σ), "only masked" crops, fills and outpainting."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import sdlab
from sdlab.config import preset
from sdlab.diffusion.denoiser import eps_scalings
from sdlab.errors import SdlabError
from sdlab.pipelines.masks import blur_mask, crop_region, extend_canvas
from sdlab.pipelines.metadata import parse_parameters
from sdlab.pipelines.runner import Runner
from tests.reference import diffusers_pipeline, smooth_picture, use_twin

PROMPT, NEGATIVE, STEPS, GUIDANCE = "a red circle", "blurry", 10, 6.0
MAX_PIXEL_DIFF = 2
DIFFUSERS_LIKE = dict(mask_blur=0, composite=False)  # diffusers neither blurs the mask nor overlays the original


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def _disc_mask(size: int, box=(6, 4, 22, 26)) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return mask


def _block_mask(size: int, x0=8, y0=8, x1=24, y1=32) -> Image.Image:
    """Edges on the 8-pixel latent grid: every latent is wholly kept or wholly repainted."""
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (x0, y0, x1, y1))
    return mask


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory):
    pipe = diffusers_pipeline(preset("tiny-sd1-inpainting"), seed=51)
    folder = tmp_path_factory.mktemp("inpainting") / "model"
    pipe.save_pretrained(folder)
    return pipe, sdlab.load(folder)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    pipe = diffusers_pipeline(preset("tiny-sd1"), seed=52)
    folder = tmp_path_factory.mktemp("plain") / "model"
    pipe.save_pretrained(folder)
    return diffusers.StableDiffusionInpaintPipeline.from_pipe(pipe), sdlab.load(folder)


def _reference(pipe, image, mask, sampler, strength, seed):
    use_twin(pipe, sampler)
    return pipe(PROMPT, image=image, mask_image=mask, strength=strength, negative_prompt=NEGATIVE,
                num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=image.height, width=image.width,
                generator=torch.Generator().manual_seed(seed)).images[0]


@pytest.mark.parametrize("sampler, strength", [("euler", 1.0), ("ddim", 0.7), ("euler_a", 1.0), ("dpmpp_2m", 0.85)])
def test_inpainting_model_matches_diffusers(inpainting_model, sampler, strength):
    reference, ours = inpainting_model
    image, mask = smooth_picture(32, seed=3), _disc_mask(32)
    for seed in (4, 1001):
        ref = _reference(reference, image, mask, sampler, strength, seed)
        out = ours.inpaint(image, mask, PROMPT, strength=strength, negative=NEGATIVE, steps=STEPS, guidance=GUIDANCE,
                           seed=seed, sampler=sampler, schedule="default", **DIFFUSERS_LIKE)[0]
        assert np.abs(_pixels(out) - _pixels(ref)).max() <= MAX_PIXEL_DIFF, (sampler, seed)


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m", "euler_a"])
def test_blended_inpainting_matches_diffusers(plain_model, sampler):
    """diffusers blends x after each step; we blend the network's input and output. With a mask on the latent
    grid and strength < 1 (diffusers' first step at strength 1 sees no original) both give the same image."""
    reference, ours = plain_model
    image, mask = smooth_picture(32, seed=5), _block_mask(32)
    for seed in (6, 99):
        ref = _reference(reference, image, mask, sampler, 0.8, seed)
        out = ours.inpaint(image, mask, PROMPT, strength=0.8, negative=NEGATIVE, steps=STEPS, guidance=GUIDANCE,
                           seed=seed, sampler=sampler, schedule="default", **DIFFUSERS_LIKE)[0]
        assert np.abs(_pixels(out) - _pixels(ref)).max() <= MAX_PIXEL_DIFF, (sampler, seed)


@pytest.mark.parametrize("sampler, strength", [("euler", 1.0), ("euler_a", 0.8), ("dpmpp_2m", 1.0), ("ddim", 0.6),
                                               ("heun", 1.0)])
def test_blended_latents_outside_the_mask_follow_the_original(plain_model, monkeypatch, sampler, strength):
    """At every network call the latents outside the mask are the original's, noised to that call's σ with
    the run's own noise; at the end they are the original's exactly."""
    _, ours = plain_model
    runner = ours.runner
    starts, calls, finals = [], [], []
    start, unet_forward, finish = Runner.start, type(runner.components.unet).forward, Runner.finish
    monkeypatch.setattr(Runner, "start", lambda self, *a: starts.append(start(self, *a)) or starts[-1])
    monkeypatch.setattr(Runner, "finish", lambda self, st, x: finals.append(finish(self, st, x)) or finals[-1])

    def spy(self, x, t, context, y=None, control=None):
        calls.append((x.clone(), float(t[0])))
        return unet_forward(self, x, t, context, y=y, control=control)

    monkeypatch.setattr(type(runner.components.unet), "forward", spy)
    ours.inpaint(smooth_picture(32, seed=8), _disc_mask(32), PROMPT, strength=strength, steps=6, guidance=GUIDANCE,
                 seed=12, sampler=sampler, schedule="default", mask_blur=2)
    blend, plan = starts[0].blend, starts[0].plan
    keep = blend.keep.bool().expand(2, 4, -1, -1)
    assert 0 < keep.float().mean() < 1
    assert len(calls) >= len(plan.timesteps)
    schedule = plan.schedule
    for x_in, t in calls:
        sigma = float(schedule.t_to_sigma(torch.tensor([t], dtype=torch.float64))[0])
        expected = (blend.noised(sigma) * eps_scalings(sigma)[2]).expand(2, -1, -1, -1)
        assert torch.allclose(x_in[keep], expected[keep], atol=1e-4, rtol=1e-4), (sampler, t)
    assert torch.equal(finals[0][keep[:1]], blend.known[keep[:1]])


def test_only_masked_changes_nothing_outside_the_padded_crop(plain_model):
    _, ours = plain_model
    image = smooth_picture(64, seed=9)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (40, 6, 52, 16))
    out = ours.inpaint(image, mask, PROMPT, steps=4, seed=1, only_masked=True, padding=4, width=32, height=32,
                       mask_blur=2)[0]
    assert out.size == image.size
    x0, y0, x1, y1 = crop_region(blur_mask(mask, 2), 4, 32, 32)  # the box of the blurred mask, as inpainting uses
    outside = np.ones((64, 64), bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(_pixels(out)[outside], _pixels(image)[outside])
    assert not np.array_equal(_pixels(out)[y0:y1, x0:x1], _pixels(image)[y0:y1, x0:x1])
    pairs = parse_parameters(out.info["parameters"])[2]
    assert pairs["Inpaint area"] == "Only masked" and pairs["Masked area padding"] == "4"


def test_composite_keeps_original_pixels_outside_the_blurred_mask(plain_model):
    _, ours = plain_model
    image, mask = smooth_picture(32, seed=10), _block_mask(32, 16, 0, 32, 32)
    out = _pixels(ours.inpaint(image, mask, PROMPT, steps=4, seed=2, mask_blur=2)[0])
    far = np.zeros((32, 32), bool)
    far[:, :10] = True  # more than the blur kernel's reach (2.5 sigma) from the mask's edge
    assert np.array_equal(out[far], _pixels(image)[far])
    assert not np.array_equal(out[:, 20:], _pixels(image)[:, 20:])


@pytest.mark.parametrize("fill", ["original", "noise", "nothing", "fill"])
def test_fills_start_differently_and_are_recorded(plain_model, fill):
    _, ours = plain_model
    image, mask = smooth_picture(32, seed=11), _block_mask(32)
    out = ours.inpaint(image, mask, PROMPT, strength=0.5, steps=4, seed=3, fill=fill)[0]
    pairs = parse_parameters(out.info["parameters"])[2]
    assert pairs["Masked content"] == {"original": "original", "noise": "latent noise", "nothing": "latent nothing",
                                       "fill": "fill"}[fill]
    assert pairs["Denoising strength"] == "0.5" and pairs["Mask blur"] == "4"


def test_fills_differ(plain_model):
    _, ours = plain_model
    image, mask = smooth_picture(32, seed=11), _block_mask(32)
    results = {f: _pixels(ours.inpaint(image, mask, PROMPT, strength=0.5, steps=4, seed=3, fill=f)[0])
               for f in ("original", "noise", "nothing", "fill")}
    values = list(results.values())
    assert all(not np.array_equal(a, b) for i, a in enumerate(values) for b in values[i + 1:])


def test_outpaint_keeps_the_image_and_paints_the_new_area(plain_model):
    _, ours = plain_model
    image = smooth_picture(32, seed=12)
    out = _pixels(ours.outpaint(image, PROMPT, extend=(16, 0, 8, 5), steps=4, seed=4, mask_blur=0)[0])
    assert out.shape == (32 + 8, 32 + 16 + 8, 3)  # height 37 rounded up to 40
    # the old image sits at x 16..48, y 0..32; 8 px of it along each grown side (left, right, bottom) are repainted
    assert np.array_equal(out[0:24, 24:40], _pixels(image)[0:24, 8:24])
    canvas, _ = extend_canvas(image, 16, 0, 8, 5)
    assert np.abs(out[:, :16] - _pixels(canvas)[:, :16]).mean() > 5  # the new area is painted, not the edge fill


def test_inpaint_bad_input_is_a_one_line_error(plain_model, inpainting_model):
    _, ours = plain_model
    image = smooth_picture(32)
    with pytest.raises(SdlabError, match="mask is 16x16 but the image is 32x32"):
        ours.inpaint(image, Image.new("L", (16, 16)), PROMPT, steps=2)
    with pytest.raises(SdlabError, match="the mask is empty"):
        ours.inpaint(image, Image.new("L", (32, 32)), PROMPT, steps=2, only_masked=True)
    with pytest.raises(SdlabError, match="unknown fill"):
        ours.inpaint(image, _block_mask(32), PROMPT, steps=2, fill="paint")
    with pytest.raises(SdlabError, match="outpainting sizes"):
        ours.outpaint(image, PROMPT, extend=(-8, 0, 0, 0), steps=2)


def test_inpainting_model_makes_whole_images_too(inpainting_model, monkeypatch):
    """txt2img and img2img with a 9-channel model: everything masked, the masked image blank."""
    _, ours = inpainting_model
    concats = []
    start = Runner.start

    def spy(self, *args):
        out = start(self, *args)
        concats.append(out.concat)
        return out

    monkeypatch.setattr(Runner, "start", spy)
    assert ours.generate(PROMPT, steps=2, seed=1)[0].size == (32, 32)
    assert ours.img2img(smooth_picture(32), PROMPT, strength=0.5, steps=2, seed=1)[0].size == (32, 32)
    for concat in concats:
        assert concat.shape == (1, 5, 16, 16) and torch.equal(concat[:, 0], torch.ones_like(concat[:, 0]))
