"""How much a shapes model listens to each part of its caption, long before its images show it.

For 48 one-object scenes (a large object at a 3x3 grid position on a plain background) the script noises
each scene's latents to timestep t and measures the model's v-prediction error (or ε error) with the
right caption, and with the same caption naming a wrong position, a wrong object colour, a wrong shape,
or with the empty caption. A model that uses a word errs more when the word is wrong: the table gives
each change as a percentage over the right caption's error, per t.

    python benchmarks/caption_sensitivity.py runs/floor/model.safetensors
"""

from __future__ import annotations

import argparse
import random

import torch

from sdlab import api
from sdlab.diffusion.schedules import alphas_cumprod
from sdlab.pipelines.settings import Settings
from sdlab.train.shapes import COLOURS, POSITION_CENTRES, POSITION_PHRASES, SHAPES, PlacedObject, Scene, render

TIMESTEPS = (300, 500, 650, 800)
CHANGES = ("position", "colour", "shape", "empty")


def caption(position: str, colour: str, shape: str, background: str) -> str:
    return f"a large {colour} {shape} {POSITION_PHRASES[position]} on a {background} background"


def scenes(count: int, rng: random.Random) -> list[tuple[str, str, str, str]]:
    """(position, colour, shape, background) of `count` one-object scenes."""
    out = []
    for _ in range(count):
        colour = rng.choice(COLOURS)
        background = rng.choice([c for c in COLOURS if c != colour])
        out.append((rng.choice(list(POSITION_CENTRES)), colour, rng.choice(SHAPES), background))
    return out


def changed(scene: tuple[str, str, str, str], change: str, rng: random.Random) -> str:
    position, colour, shape, background = scene
    if change == "position":
        position = rng.choice([p for p in POSITION_CENTRES if p != position])
    elif change == "colour":
        colour = rng.choice([c for c in COLOURS if c not in (colour, background)])
    elif change == "shape":
        shape = rng.choice([s for s in SHAPES if s != shape])
    else:
        return ""
    return caption(position, colour, shape, background)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--scenes", type=int, default=48)
    args = parser.parse_args()
    pipe = api.load(args.model)
    runner, comps = pipe.runner, pipe.runner.components
    cfg = comps.config
    rng = random.Random(0)
    drawn = scenes(args.scenes, rng)
    images = []
    for position, colour, shape, background in drawn:
        x, y = POSITION_CENTRES[position]
        scene = Scene(background, (PlacedObject(colour, shape, "large", x, y, 0.2),), position=position, relation=None)
        images.append(torch.from_numpy(render(scene, cfg.default_size)).permute(2, 0, 1) * 2 - 1)  # (3, H, W)
    latents = comps.vae.encode(torch.stack(images)).mean * cfg.vae.scaling_factor  # (N, 4, h, w)
    ac = alphas_cumprod(cfg.schedule)
    generator = torch.Generator().manual_seed(0)

    def context(prompt: str) -> torch.Tensor:
        return runner.condition(Settings(prompt=prompt).resolved(cfg)).context[1:]  # (1, L, D)

    print("| t | error, right caption | wrong position | wrong colour | wrong shape | empty caption |")
    print("|---:|---:|" + "---:|" * len(CHANGES))
    for t in TIMESTEPS:
        a = ac[t]
        errors = dict.fromkeys(("right", *CHANGES), 0.0)
        for scene, x0 in zip(drawn, latents):
            x0 = x0[None]
            noise = torch.randn(x0.shape, generator=generator)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            target = a.sqrt() * noise - (1 - a).sqrt() * x0 if cfg.prediction_type == "v_prediction" else noise
            prompts = {"right": caption(*scene), **{c: changed(scene, c, rng) for c in CHANGES}}
            for name, prompt in prompts.items():
                prediction = comps.unet(x_t, torch.tensor([t]), context(prompt))
                errors[name] += (prediction - target).pow(2).mean().item() / len(drawn)
        cells = [f"{100 * (errors[c] / errors['right'] - 1):+.1f}%" for c in CHANGES]
        print(f"| {t} | {errors['right']:.4f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
