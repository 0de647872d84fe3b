"""The approximate speed-ups, off by default: CFG truncation (`cfg_end`) and token merging (`token_merging`)."""

from __future__ import annotations

import numpy as np
import pytest

import sdlab
from sdlab.config import preset
from sdlab.errors import SdlabError
from sdlab.pipelines.metadata import parse_parameters
from tests.reference import diffusers_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("speedups") / "tiny-sd1"
    diffusers_pipeline(preset("tiny-sd1"), seed=4).save_pretrained(path)
    return sdlab.load(path, backend="torch")


def _batches(pipe, **options) -> tuple[list[int], np.ndarray, dict]:
    """The batch size of every U-Net call of one generation, the image and its infotext pairs."""
    sizes = []
    hook = pipe.runner.components.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        image = pipe.generate("a cat", seed=3, guidance=6, **options)[0]
    finally:
        hook.remove()
    return sizes, np.asarray(image).astype(int), parse_parameters(image.info["parameters"])[2]


def test_cfg_end_skips_the_unconditional_pass_for_late_steps(pipe):
    full, image, pairs = _batches(pipe, steps=6, sampler="euler")
    assert full == [2] * 6 and "CFG end" not in pairs
    half, truncated, pairs = _batches(pipe, steps=6, sampler="euler", cfg_end=0.5)
    assert half == [2, 2, 2, 1, 1, 1] and pairs["CFG end"] == "0.5"
    assert np.abs(truncated - image).max() > 0  # approximate: the late steps lost their guidance


def test_cfg_end_goes_by_noise_level_for_second_order_samplers(pipe):
    # Heun evaluates each step at σ_i and again at σ_i+1 (not after the last step); calls at or below the σ of
    # the first unguided step (here step 2 of 4) are conditional only, the corrector of step 1 included
    sizes, _, _ = _batches(pipe, steps=4, sampler="heun", cfg_end=0.5)
    assert sizes == [2, 2, 2, 1, 1, 1, 1]


def test_cfg_end_edges(pipe):
    _, exact, _ = _batches(pipe, steps=4, sampler="euler")
    _, one, _ = _batches(pipe, steps=4, sampler="euler", cfg_end=1.0)
    assert np.array_equal(exact, one)
    sizes, none, _ = _batches(pipe, steps=4, sampler="euler", cfg_end=0.0)
    unguided = np.asarray(pipe.generate("a cat", seed=3, guidance=1, steps=4, sampler="euler")[0]).astype(int)
    assert sizes == [1] * 4 and np.array_equal(none, unguided)  # no guided step: the conditional pass alone


@pytest.mark.parametrize("options, message", [
    ({"cfg_end": 1.5}, "cfg end must be in [0, 1]"),
    ({"cfg_end": float("nan")}, "cfg end must be in [0, 1]"),
    ({"token_merging": 0.9}, "token merging must be in [0, 0.75]"),
    ({"token_merging": -0.1}, "token merging must be in [0, 0.75]"),
])
def test_bad_values_are_one_line_errors(pipe, options, message):
    with pytest.raises(SdlabError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pipe.generate("a cat", steps=1, **options)


def test_token_merging_shortens_full_resolution_self_attention_only_during_the_run(pipe):
    from sdlab.models.token_merging import highest_resolution_blocks

    blocks = highest_resolution_blocks(pipe.runner.components.unet)
    seen = []
    hooks = [b.attn1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])) for b in blocks]
    try:
        _, exact, pairs = _batches(pipe, steps=3, sampler="euler")
        full_tokens = set(seen)
        seen.clear()
        _, merged, merged_pairs = _batches(pipe, steps=3, sampler="euler", token_merging=0.5)
    finally:
        for h in hooks:
            h.remove()
    (n,) = full_tokens
    assert set(seen) == {n - n // 2}  # half the tokens merged away, in every call of those blocks
    assert "Token merging ratio" not in pairs and merged_pairs["Token merging ratio"] == "0.5"
    assert 0 < np.abs(merged - exact).mean() < 8  # approximate, and close
    assert all(b.merge is None for b in blocks)  # restored after the run
