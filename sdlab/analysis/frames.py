"""Watching an image form: the sampler's estimate of the clean image x̂0 after every step, decoded.

    prompt --Pipeline.run--> each step i: x̂0_i = D(x_i, σ_i), VP latents (1, 4, h, w) --full VAE decode--> frame i
                             after the last step: latents --VAE decode--> the image

Each frame is the exact VAE decode (never the cheap previewer), so it is the picture the run would make
if it stopped and trusted the network at step i. Samplers that end at σ = 0 by returning x̂0 itself
(DPM++ 2M, DPM++ 2M SDE, DPM++ SDE, DPM++ 2S a, UniPC, DDPM, and DDIM with a Karras or exponential
schedule) make the last frame the image exactly; the Euler-type last step (Euler, Euler a, Heun, DPM2)
gets there up to float rounding; LMS and PLMS, and DDIM and PLMS with their default schedule (ending at
σ(t=0) > 0), need not.

    frames = denoise_frames(pipe, "a red circle on a blue background", seed=1)
    write_frames(frames, "out/")   # out/frames/step-000.png ..., out/final.png, out/strip.png, out/denoise.gif
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from torch import Tensor

from sdlab.analysis.grids import captioned
from sdlab.analysis.heatmaps import save_gif
from sdlab.errors import SdlabError
from sdlab.pipelines.images import image_grid, save_png
from sdlab.pipelines.runner import Runner, split_plan
from sdlab.pipelines.settings import Settings

if TYPE_CHECKING:
    from sdlab.api import Pipeline

FRAME_MS = 150  # each step of the animation
HOLD_MS = 1500  # the last frame, before the loop starts again
TILE_PX = 128  # default enlargement: tiles at least this wide, so a caption line holds about 21 characters


@dataclass(frozen=True)
class DenoiseFrame:
    """One step of the run: the decoded x̂0 and the noise level it was estimated at."""

    step: int  # the sampler's step, from 0
    sigma: float  # σ_i of x_i = x0 + σ_i·ε, where the network looked
    timestep: float  # the network's timestep there
    image: Image.Image  # the full VAE decode of x̂0_i


@dataclass(frozen=True)
class DenoiseFrames:
    """Every step's frame of one image, the image itself (with its metadata) and the settings that made it."""

    frames: tuple[DenoiseFrame, ...]
    image: Image.Image
    settings: Settings  # resolved: the seed is the one used


@dataclass(frozen=True)
class FrameFiles:
    """What `write_frames` wrote; strip and gif are None when not asked for."""

    frames: tuple[Path, ...]
    final: Path
    strip: Path | None
    gif: Path | None


def denoise_frames(
    pipe: Pipeline, prompt: str, *, on_step: Callable[[int, int], None] | None = None, **options
) -> DenoiseFrames:
    """Generate one image of `prompt` (options as `Pipeline.generate`'s) and decode every step's x̂0."""
    if options.get("batch", 1) != 1:
        raise SdlabError(f"denoising frames follow one image; got batch {options['batch']} (vary the seed instead)")
    s = pipe.settings(prompt, **options)
    steps = _steps(pipe, s)
    tiled = pipe.decodes_in_tiles(s)  # frames decoded as the image will be
    frames: list[DenoiseFrame] = []

    def keep(denoised: Tensor) -> None:  # (1, 4, h, w) x̂0 latents, guided when CFG is on
        runner, sigma, timestep = steps[len(frames)]
        frames.append(DenoiseFrame(len(frames), sigma, timestep, runner.decode(denoised, tiled)[0]))

    image = pipe.run(s, on_step, on_preview=keep)[0]
    return DenoiseFrames(tuple(frames), image, s)


def _steps(pipe: Pipeline, s: Settings) -> list[tuple[Runner, float, float]]:
    """(the runner that takes it, σ, timestep) for each step; with a refiner, the base hands over at refiner_switch."""
    plan = pipe.runner.plan(s)
    if pipe.refiner is None:
        parts = [(pipe.runner, plan)]
    else:
        refiner = pipe.refiner[0]
        train_steps = pipe.config.schedule.num_train_timesteps
        parts = list(zip((pipe.runner, refiner), split_plan(plan, refiner.plan(s), s.refiner_switch, train_steps)))
    return [(r, float(sigma), float(t)) for r, p in parts for sigma, t in zip(p.sigmas[:-1], p.timesteps)]


def chosen(steps: int, every: int) -> list[int]:
    """Every `every`-th step from the first, and always the last."""
    picked = list(range(0, steps, every))
    return picked if picked[-1] == steps - 1 else [*picked, steps - 1]


def caption(frame: DenoiseFrame) -> str:
    return f"step {frame.step} sigma {frame.sigma:.3g}"


def check_output(out: str | os.PathLike, every: int = 1, scale: int | None = None) -> Path:
    """The folder `write_frames` would write, refused with a one-line error before any work: a CLI calls it first."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SdlabError(f"{out}: exists and is not a folder; frames go into a folder")
    for name, value in (("every", every), ("scale", 1 if scale is None else scale)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SdlabError(f"{name} must be a whole number, at least 1; got {value!r}")
    return out


def write_frames(
    frames: DenoiseFrames, out: str | os.PathLike, *, gif: bool = True, strip: bool = True, every: int = 1,
    scale: int | None = None,
) -> FrameFiles:
    """Into the folder `out`: frames/step-000.png ... (every `every`-th step and the last, at the image's size),
    final.png (the image with its metadata), strip.png (the chosen frames side by side, each enlarged `scale`
    times above its caption) and denoise.gif (the same captioned tiles, the last held for a while).
    `scale` defaults to the smallest whole enlargement making tiles at least TILE_PX wide."""
    out = check_output(out, every, scale)
    if not frames.frames:
        raise SdlabError("no frames to write: the run took no steps")
    scale = max(1, -(-TILE_PX // frames.image.width)) if scale is None else scale
    picked = [frames.frames[i] for i in chosen(len(frames.frames), every)]
    files = tuple(
        save_png(f.image, out / "frames" / f"step-{f.step:03d}.png",
                 {"step": str(f.step), "sigma": f"{f.sigma:g}", "timestep": f"{f.timestep:g}"})
        for f in picked
    )
    info = {k: v for k, v in frames.image.info.items() if isinstance(v, str)}
    final = save_png(frames.image, out / "final.png", info)
    # captioned, which also keeps any two GIF frames apart (PIL merges identical neighbours into one frame)
    tiles = [captioned(f.image, caption(f), scale) for f in picked]  # each (scale·W, scale·H + caption)
    strip_file = gif_file = None
    if strip:
        strip_file = save_png(image_grid(tiles, len(tiles)), out / "strip.png", {"prompt": frames.settings.prompt})
    if gif:
        gif_file = save_gif(tiles, out / "denoise.gif", [FRAME_MS] * (len(tiles) - 1) + [HOLD_MS])
    return FrameFiles(files, final, strip_file, gif_file)
