"""img2img against diffusers' StableDiffusionImg2ImgPipeline and StableDiffusionXLImg2ImgPipeline (the SDXL
refiner refining an image): same model folder, image, prompt, strength, seed and scheduler twin give PNGs
within 2/255 per pixel. Strength 0 and 1 behave as documented."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

import sdlab
from sdlab.config import preset
from sdlab.errors import SdlabError
from sdlab.pipelines.metadata import parse_parameters
from tests.reference import diffusers_pipeline, smooth_picture, use_twin

PROMPT, NEGATIVE, STEPS, GUIDANCE = "a red circle on a blue background", "blurry", 10, 6.5
MAX_PIXEL_DIFF = 2


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


@pytest.fixture(scope="module", params=["tiny-sd1", "tiny-sd2", "tiny-sdxl", "tiny-sdxl-refiner"])
def model(request, tmp_path_factory):
    cfg = preset(request.param)
    pipe = diffusers_pipeline(cfg, seed=41)
    folder = tmp_path_factory.mktemp(request.param) / "model"
    pipe.save_pretrained(folder)
    if cfg.family == "sdxl":
        img2img = diffusers.StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    elif cfg.family == "sdxl-refiner":
        img2img = pipe  # already StableDiffusionXLImg2ImgPipeline(requires_aesthetics_score=True)
    else:
        img2img = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    return cfg, img2img, sdlab.load(folder)


@pytest.mark.parametrize("sampler, strength", [("euler", 0.6), ("ddim", 0.75), ("euler_a", 0.5), ("dpmpp_2m", 0.8),
                                               ("unipc", 0.45)])
def test_img2img_matches_diffusers(model, sampler, strength):
    cfg, reference, ours = model
    image = smooth_picture(cfg.default_size, seed=7)
    use_twin(reference, sampler)
    for seed in (2, 77):
        ref = reference(PROMPT, image=image, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(seed)).images[0]
        out = ours.img2img(image, PROMPT, strength=strength, negative=NEGATIVE, steps=STEPS, guidance=GUIDANCE,
                           seed=seed, sampler=sampler, schedule="default")[0]
        assert np.abs(_pixels(out) - _pixels(ref)).max() <= MAX_PIXEL_DIFF, (cfg.name, sampler, seed)
    assert parse_parameters(out.info["parameters"])[2]["Denoising strength"] == f"{strength:g}"


def test_strength_one_ignores_the_image_and_zero_keeps_it(tmp_path):
    pipe = diffusers_pipeline(preset("tiny-sd1"), seed=42)
    pipe.save_pretrained(tmp_path / "model")
    ours = sdlab.load(tmp_path / "model")
    image, other = smooth_picture(32, seed=1), smooth_picture(32, seed=2)
    common = dict(steps=6, guidance=5.0, seed=3, sampler="euler")
    text = _pixels(ours.generate(PROMPT, **common)[0])
    assert np.array_equal(_pixels(ours.img2img(image, PROMPT, strength=1.0, **common)[0]), text)
    assert np.array_equal(_pixels(ours.img2img(other, PROMPT, strength=1.0, **common)[0]), text)
    kept = ours.img2img(image, PROMPT, strength=0.0, **common)[0]
    runner = ours.runner
    with torch.no_grad():
        vae = runner.components.vae
        z = vae.encode(torch.from_numpy(_pixels(image) / 127.5 - 1).permute(2, 0, 1)[None].float())
        round_trip = vae.decode(z.sample(torch.Generator().manual_seed(3)))
    expected = ((round_trip[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).round().numpy().astype(int)
    assert np.abs(_pixels(kept) - expected).max() <= 1
    assert not np.array_equal(_pixels(ours.img2img(image, PROMPT, strength=0.5, **common)[0]), _pixels(kept))


def test_bad_strength_and_images_are_one_line_errors(tmp_path):
    pipe = diffusers_pipeline(preset("tiny-sd1"), seed=43)
    pipe.save_pretrained(tmp_path / "model")
    ours = sdlab.load(tmp_path / "model")
    image = smooth_picture(32)
    for strength in (-0.1, 1.5, float("nan")):
        with pytest.raises(SdlabError, match="strength must be in"):
            ours.img2img(image, PROMPT, strength=strength, steps=2)
    with pytest.raises(SdlabError, match="no such file"):
        ours.img2img(tmp_path / "missing.png", PROMPT)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(SdlabError, match="not a readable image"):
        ours.img2img(tmp_path / "junk.png", PROMPT)
