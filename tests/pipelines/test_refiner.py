"""SDXL base + refiner hand-off at a switch fraction, against diffusers' ensemble of experts
(`denoising_end` on the base, `denoising_start` on the refiner)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdlab
from sdlab.config import preset
from sdlab.errors import SdlabError
from sdlab.pipelines.metadata import parse_parameters
from tests.reference import diffusers_pipeline

PROMPT, NEGATIVE, STEPS, GUIDANCE, SEED = "a red circle", "blurry", 10, 5.0, 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("xl")
    base = diffusers_pipeline(preset("tiny-sdxl"), seed=31)
    refiner = diffusers_pipeline(preset("tiny-sdxl-refiner"), seed=32)
    base.save_pretrained(root / "base")
    refiner.save_pretrained(root / "refiner")
    return base, refiner, root


@pytest.mark.parametrize("sampler, switch", [("euler", 0.8), ("euler_a", 0.6), ("dpmpp_2m", 0.7)])
def test_hand_off_matches_diffusers(models, sampler, switch):
    import diffusers

    base, refiner, root = models
    cls, extra = {
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
        "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    }[sampler]
    for pipe in (base, refiner):
        pipe.scheduler = cls.from_config({**pipe.scheduler.config, **extra})
    generator = torch.Generator().manual_seed(SEED)
    common = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generator)
    latents = base(PROMPT, denoising_end=switch, output_type="latent", height=32, width=32, **common).images
    ref = refiner(PROMPT, image=latents, denoising_start=switch, **common).images[0]

    pipe = sdlab.load(root / "base", refiner=root / "refiner")
    ours = pipe.generate(PROMPT, negative=NEGATIVE, steps=STEPS, guidance=GUIDANCE, seed=SEED, sampler=sampler,
                         schedule="default", refiner_switch=switch)[0]
    assert np.abs(np.asarray(ours).astype(int) - np.asarray(ref).astype(int)).max() <= 2
    pairs = parse_parameters(ours.info["parameters"])[2]
    assert pairs["Refiner switch at"] == str(switch) and pairs["Refiner"].startswith("refiner [")


def test_refiner_needs_sdxl_pair(models):
    _, _, root = models
    with pytest.raises(SdlabError, match="SDXL base to an SDXL refiner"):
        sdlab.load(root / "refiner", refiner=root / "base")
