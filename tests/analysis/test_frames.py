"""Denoising frames on the default model: one per step, each the VAE decode of the sampler's own x̂0 (recomputed
from the trajectory), the last one the image where the sampler ends on x̂0, closer to the image as the run goes,
and written as PNGs, a strip and a GIF of the promised sizes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import sdlab
from sdlab.analysis.frames import FRAME_MS, HOLD_MS, caption, chosen, denoise_frames, write_frames
from sdlab.analysis.grids import captioned
from sdlab.errors import SdlabError
from sdlab.pipelines.runner import Inputs, Start

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe(default_model_path):
    return sdlab.load(default_model_path)


@pytest.fixture(scope="module")
def run20(pipe):
    return denoise_frames(pipe, PROMPT, seed=1, steps=20)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)  # (H, W, 3)


def worst(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


# samplers whose last step returns x̂0 itself (σ_last = 0), and the Euler-type ones whose x - σ·(x - x̂0)/σ
# reaches it up to float rounding
ENDS_ON_X0 = [
    {"sampler": "dpmpp_2m"}, {"sampler": "dpmpp_2m_sde"}, {"sampler": "dpmpp_sde"}, {"sampler": "dpmpp_2s_a"},
    {"sampler": "unipc"}, {"sampler": "ddpm"}, {"sampler": "ddim", "schedule": "karras"},
]  # fmt: skip
NEARLY_ON_X0 = [{"sampler": "euler"}, {"sampler": "euler_a"}, {"sampler": "heun"}, {"sampler": "dpm2"}]


@pytest.mark.parametrize("options", ENDS_ON_X0 + NEARLY_ON_X0, ids=lambda o: "-".join(o.values()))
def test_one_frame_per_step_and_the_last_is_the_image(pipe, options):
    made = denoise_frames(pipe, PROMPT, seed=2, steps=4, **options)
    plan = pipe.runner.plan(made.settings)
    assert [f.step for f in made.frames] == [0, 1, 2, 3]
    assert [f.sigma for f in made.frames] == plan.sigmas[:-1].tolist()
    assert [f.timestep for f in made.frames] == plan.timesteps.tolist()
    assert all(f.image.size == made.image.size == (64, 64) for f in made.frames)
    assert worst(made.frames[-1].image, made.image) <= (0 if options in ENDS_ON_X0 else 1)


def test_collecting_frames_leaves_the_image_alone(pipe, run20):
    image = pipe.generate(PROMPT, seed=1, steps=20)[0]
    assert worst(run20.image, image) == 0
    assert run20.image.info == image.info
    assert run20.settings.seed == 1 and run20.settings.steps == 20


def test_frame_k_decodes_the_x0_recomputed_from_the_euler_trajectory(pipe):
    """Euler steps x_{k+1} = x_k + (x_k - x̂0_k)/σ_k·(σ_{k+1} - σ_k),
    so x̂0_k = x_k - σ_k·(x_{k+1} - x_k)/(σ_{k+1} - σ_k); each x_k comes from running the first k steps alone,
    with no callback involved."""
    made = denoise_frames(pipe, PROMPT, seed=3, steps=5, sampler="euler")
    s, runner = made.settings, pipe.runner
    plan, cond = runner.plan(s), runner.condition(s)
    start = runner.start(s, plan, Inputs(), torch.Generator().manual_seed(s.seed))
    xs = [start.x] + [
        runner.denoise(s, Start(replace(plan, sigmas=plan.sigmas[: k + 1], timesteps=plan.timesteps[:k]), start.x),
                       cond, torch.Generator())
        for k in range(1, s.steps + 1)
    ]  # x_0 .. x_n, each (1, 4, 16, 16)
    sig = plan.sigmas.tolist()
    for k, frame in enumerate(made.frames):
        x0 = xs[k] - sig[k] * (xs[k + 1] - xs[k]) / (sig[k + 1] - sig[k])  # (1, 4, 16, 16)
        assert worst(frame.image, runner.decode(x0)[0]) <= 1, k
    assert worst(made.frames[0].image, made.frames[-1].image) > 10  # the frames do differ


def _tiny_runner(name: str, seed: int):
    from sdlab.api import ModelInfo
    from sdlab.checkpoints.load import Components
    from sdlab.config import preset
    from sdlab.models.clip import CLIPTextModel
    from sdlab.models.unet import UNet
    from sdlab.models.vae import AutoencoderKL
    from sdlab.pipelines.runner import Runner
    from sdlab.tokenizer import Tokenizer

    cfg = preset(name)
    torch.manual_seed(seed)  # PyTorch's own random initialisation (tests.reference would import diffusers: seconds)
    texts = tuple(CLIPTextModel(t.encoder).eval() for t in cfg.text)
    tokenizers = tuple(Tokenizer(t.tokenizer) for t in cfg.text)
    comps = Components(cfg, UNet(cfg.unet).eval(), AutoencoderKL(cfg.vae).eval(), texts, tokenizers, name)
    return Runner(comps), ModelInfo(name, "0" * 64, name)


def test_refiner_steps_are_decoded_by_the_refiner():
    """Random tiny SDXL base and refiner with different VAEs: the last frame can only be the image if the
    refiner's steps go through the refiner's VAE."""
    from sdlab.api import Pipeline

    pipe = Pipeline(*_tiny_runner("tiny-sdxl", 1), refiner=_tiny_runner("tiny-sdxl-refiner", 11))
    zero = torch.zeros(1, 4, 16, 16)
    assert worst(pipe.runner.decode(zero)[0], pipe.refiner[0].decode(zero)[0]) > 100
    made = denoise_frames(pipe, "a red circle", seed=0, steps=6, refiner_switch=0.5)
    assert len(made.frames) == 6
    assert worst(made.frames[-1].image, made.image) == 0
    sigmas, timesteps = [f.sigma for f in made.frames], [f.timestep for f in made.frames]
    assert sigmas == sorted(sigmas, reverse=True) and len(set(sigmas)) == 6
    assert min(timesteps[:3]) >= 500 > max(timesteps[3:])  # the hand-off at half the schedule


def test_frames_approach_the_final_image(run20):
    distance = [float(np.abs(pixels(f.image) - pixels(run20.image)).mean()) for f in run20.frames]
    assert len(distance) == 20
    assert distance[-1] == 0  # DPM++ 2M Karras ends on x̂0
    assert distance[-2] < distance[0]
    # not monotone: around the middle of the run x̂0 commits to a layout and may first move away from the image
    assert np.mean(distance[10:]) < np.mean(distance[:10]) / 2
    assert max(distance[15:]) < min(distance[:5])


def test_chosen_steps_start_at_zero_and_end_at_the_last():
    assert chosen(20, 1) == list(range(20))
    assert chosen(20, 5) == [0, 5, 10, 15, 19]
    assert chosen(20, 19) == [0, 19]
    assert chosen(20, 50) == [0, 19]
    assert chosen(1, 3) == [0]


def test_write_frames_every_step(run20, tmp_path):
    files = write_frames(run20, tmp_path / "out", scale=3)
    assert [p.name for p in files.frames] == [f"step-{i:03d}.png" for i in range(20)]
    for frame, path in zip(run20.frames, files.frames):
        with Image.open(path) as im:
            assert worst(im, frame.image) == 0 and im.info["step"] == str(frame.step)
    with Image.open(files.final) as im:
        assert worst(im, run20.image) == 0 and im.info["parameters"] == run20.image.info["parameters"]
    tile = captioned(run20.frames[0].image, caption(run20.frames[0]), 3)
    assert tile.width == 64 * 3
    with Image.open(files.strip) as im:
        assert im.size == (20 * tile.width, tile.height)
    with Image.open(files.gif) as im:
        assert im.n_frames == 20 and im.size == tile.size
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
    assert durations == [FRAME_MS] * 19 + [HOLD_MS]


def test_write_frames_every_fifth_step_without_extras(run20, tmp_path):
    files = write_frames(run20, tmp_path, every=5, gif=False, strip=False)
    assert [p.name for p in files.frames] == ["step-000.png", "step-005.png", "step-010.png", "step-015.png",
                                              "step-019.png"]
    assert files.gif is None and files.strip is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.png", "frames"]
    files = write_frames(run20, tmp_path, every=5)  # default scale: 64 px tiles twice over
    with Image.open(files.strip) as strip, Image.open(files.gif) as gif:
        assert strip.width == 5 * 128 and gif.n_frames == 5 and gif.width == 128


def test_bad_input_is_refused(pipe, run20, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("x")
    with pytest.raises(SdlabError, match="not a folder"):
        write_frames(run20, taken)
    for every in (0, -1, 1.5):
        with pytest.raises(SdlabError, match="every"):
            write_frames(run20, tmp_path / "a", every=every)
    for scale in (0, 2.0):
        with pytest.raises(SdlabError, match="scale"):
            write_frames(run20, tmp_path / "a", scale=scale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    with pytest.raises(SdlabError, match="batch"):
        denoise_frames(pipe, PROMPT, batch=2)
    with pytest.raises(SdlabError, match="option"):
        denoise_frames(pipe, PROMPT, stpes=3)
    with pytest.raises(SdlabError, match="steps"):
        denoise_frames(pipe, PROMPT, steps=0)
