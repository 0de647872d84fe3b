"""Attention maps: the recomputed probabilities are the ones applied, maps add up as documented, words find
their tokens, the hooks leave the image alone, and on the default model each object's words look at it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.analysis.adherence import analyse
from sdlab.analysis.attention import (
    attention_probs,
    normalise,
    pixel_map,
    prompt_words,
    recording,
    token_map,
    trace_attention,
    word_map,
    word_positions,
    write_attention,
)
from sdlab.analysis.heatmaps import VIRIDIS_ANCHORS, colourise, overlay
from sdlab.config import SHAPES, preset
from sdlab.errors import SdlabError
from sdlab.models.layers import Attention, BasicTransformerBlock, _merge_heads, split_heads
from sdlab.tokenizer import Tokenizer
from tests.reference import perturb_


# --- a tiny random model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from sdlab.api import ModelInfo, Pipeline
    from sdlab.checkpoints.load import Components
    from sdlab.models.clip import CLIPTextModel
    from sdlab.models.unet import UNet
    from sdlab.models.vae import AutoencoderKL
    from sdlab.pipelines.runner import Runner

    cfg = preset("tiny-sd1")
    torch.manual_seed(0)
    unet, vae = perturb_(UNet(cfg.unet), 1).eval(), perturb_(AutoencoderKL(cfg.vae), 2).eval()
    text = perturb_(CLIPTextModel(cfg.text[0].encoder), 3).eval()
    comps = Components(cfg, unet, vae, (text,), (Tokenizer(cfg.text[0].tokenizer),), "tiny")
    return Pipeline(Runner(comps), ModelInfo("tiny", "0" * 64, "tiny"))


def _heads(unet, layer: str) -> int:
    return sum(getattr(b, layer).heads for b in unet.modules() if isinstance(b, BasicTransformerBlock))


def test_recomputed_probabilities_are_the_ones_applied(tiny):
    attn = next(m.attn2 for m in tiny.runner.components.unet.modules() if isinstance(m, BasicTransformerBlock))
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 16, attn.to_q.in_features, generator=g), torch.randn(2, 77, 32, generator=g)
    applied = []
    handle = attn.to_out.register_forward_pre_hook(lambda m, args: applied.append(args[0]))  # (B, N, inner)
    with torch.no_grad():
        attn(x, context)
        probs = attention_probs(attn, x, context)  # (2, heads, 16, 77)
        v = split_heads(attn.to_v(context), attn.heads)  # (2, heads, 77, d)
    handle.remove()
    assert probs.shape == (2, attn.heads, 16, 77)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, attn.heads, 16))
    torch.testing.assert_close(_merge_heads(probs @ v), applied[0], atol=1e-5, rtol=1e-5)
    some = attention_probs(attn, x, context, queries=slice(3, 5))
    torch.testing.assert_close(some, probs[:, :, 3:5])


def test_self_attention_probabilities_are_the_ones_applied():
    torch.manual_seed(0)
    attn = Attention(16, 2, 16).eval()
    x = torch.randn(1, 9, 16)
    applied = []
    attn.to_out.register_forward_pre_hook(lambda m, args: applied.append(args[0]))
    with torch.no_grad():
        attn(x)
        probs, v = attention_probs(attn, x), split_heads(attn.to_v(x), 2)
    torch.testing.assert_close(_merge_heads(probs @ v), applied[0], atol=1e-5, rtol=1e-5)


def test_only_the_conditional_half_is_recorded(tiny):
    unet = tiny.runner.components.unet
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad(), recording(unet) as both:
        unet(x, t, context)
        both.end_step()
    with torch.no_grad(), recording(unet) as alone:
        unet(x[1:], t[1:], context[1:])
        alone.end_step()
    assert set(both.steps[0][0]) == {(8, 8), (4, 4), (2, 2)}  # tiny-sd1: two levels and the middle
    for size, maps in both.steps[0][0].items():
        assert maps.shape == (77, *size)
        torch.testing.assert_close(maps, alone.steps[0][0][size], atol=1e-5, rtol=1e-5)
    blocks = [b for b in unet.modules() if isinstance(b, BasicTransformerBlock)]
    assert not any(b._forward_pre_hooks or b.attn1._forward_hooks or b.attn2._forward_hooks for b in blocks)


def test_hooks_leave_the_image_unchanged(tiny):
    options = {"seed": 5, "steps": 4, "guidance": 5.0}
    plain = tiny.generate("a red cat", **options)[0]
    trace = trace_attention(tiny, "a red cat", words=["red"], pixel=(3, 30), **options)
    assert np.array_equal(np.asarray(plain), np.asarray(trace.image))


@pytest.mark.parametrize("sampler, calls", [("euler", [1, 1, 1, 1]), ("heun", [2, 2, 2, 1])])
def test_maps_add_up_as_documented(tiny, sampler, calls):
    trace = trace_attention(tiny, "a red cat", pixel=(10, 20), seed=1, steps=4, guidance=5.0, sampler=sampler)
    heads = _heads(tiny.runner.components.unet, "attn2")
    assert trace.attended == tuple(heads * c for c in calls)  # heun's last step is an Euler step: one call
    total = token_map(trace, range(77))  # every token: each query's probabilities sum to 1
    torch.testing.assert_close(total, torch.full((32, 32), float(sum(trace.attended))), rtol=1e-5, atol=1e-3)
    per_step = sum(word_map(trace, "red", t) for t in range(trace.steps))
    torch.testing.assert_close(per_step, word_map(trace, "red"))
    self_heads = _heads(tiny.runner.components.unet, "attn1")
    keys = sum(m.sum(dim=(1, 2)) for m in trace.self_attention.values())  # the pixel's query: 1 over its keys
    torch.testing.assert_close(keys, torch.tensor([float(self_heads * c) for c in calls]))
    shown = normalise(pixel_map(trace))
    assert shown.shape == (32, 32) and float(shown.min()) == 0 and float(shown.max()) == 1


def test_words_find_every_token():
    tok = Tokenizer(SHAPES.text[0].tokenizer)  # the default model's: 24 ids a chunk
    prompt = "a zorblax circle left of a blue square"
    assert len(tok.encode("zorblax")) == 3
    assert word_positions(prompt, "zorblax", tok) == (2, 3, 4)  # BOS at 0, "a" at 1
    assert word_positions(prompt, "a", tok) == (1, 8)  # every occurrence
    assert word_positions(prompt, "Blue Square", tok) == (9, 10)  # a phrase; case as the tokenizer folds it
    assert word_positions("a (red:1.4) star", "red", tok) == (2,)  # emphasis syntax is not text
    long = " ".join(["red"] * 22 + ["blue"])  # 22 tokens fill the first chunk
    assert word_positions(long, "blue", tok) == (24 + 1,)  # the second chunk, after its BOS
    assert prompt_words("a red, red (star:1.2)") == ("a", "red", "star")


@pytest.mark.parametrize("word", ["green", "x", "zorb", ""])
def test_unknown_words_name_the_prompts_words(word):
    tok = Tokenizer(SHAPES.text[0].tokenizer)
    with pytest.raises(SdlabError, match="its words: a, zorblax, circle") as err:
        word_positions("a zorblax circle", word, tok)
    assert repr(word) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"words": ["dog"]}, "'dog' is not a word of the prompt; its words: a, red, cat"),
        ({"pixel": (32, 0)}, "outside the 32x32 image"),
        ({"batch": 2}, "one image"),
        ({"colour": "red"}, "unexpected keyword"),
    ],
)
def test_bad_input_fails_before_any_work(tiny, kwargs, message):
    with pytest.raises(SdlabError, match=message):
        trace_attention(tiny, "a red cat", steps=2, **kwargs)


def test_written_pictures(tiny, tmp_path):
    trace = trace_attention(tiny, "a red cat", pixel=(4, 4), seed=2, steps=3, guidance=5.0)
    files = write_attention(trace, ["red", "cat"], tmp_path, animate=True, scale=4)
    assert Image.open(files.image).size == (32, 32)
    assert Image.open(files.words).size[0] == 3 * 32 * 4  # image | red | cat
    assert Image.open(files.pixel).size[0] == 2 * 32 * 4
    with Image.open(files.steps) as gif:
        assert gif.n_frames == 3 and gif.size[0] == 4 * 32 * 4  # image | red | cat | pixel, per step
    assert "parameters" in Image.open(files.image).info


def test_colour_map_ends_and_overlay_size():
    ends = np.asarray(colourise(torch.tensor([[0.0, 1.0, -3.0, 7.0]])))[0]
    assert np.array_equal(ends, VIRIDIS_ANCHORS[[0, -1, 0, -1]].astype(np.uint8))
    with pytest.raises(SdlabError, match="heat map is"):
        overlay(Image.new("RGB", (8, 8)), torch.zeros(4, 4))


# --- the default model: each object's words look at that object ------------------------------------
# Measured (seeds 0-5, 20 steps, guidance 7): on every seed where both colours were detected, each of the four
# words had a higher mean map inside its own object's box than inside the other's; the smallest ratio was 1.09.
TWO_OBJECTS = [
    ("a blue circle below a red triangle on a yellow background", ("blue", "circle"), ("red", "triangle")),
    ("a red circle above a blue square on a black background", ("red", "circle"), ("blue", "square")),
]
SEEDS = range(6)
MIN_DETECTED = 4  # seeds of 6 where both objects must come out apart (5 of 6 did, for both prompts)


def _box(d, height: int, width: int) -> torch.Tensor:
    """A detection's fitted bounding box as an (H, W) mask."""
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    half = d.half * min(height, width)
    return ((xs - d.x * width).abs() <= half) & ((ys - d.y * height).abs() <= half)


def own_region_ratios(trace, first: tuple[str, str], second: tuple[str, str]) -> dict[str, float] | None:
    """Per word: mean map over its object's box / mean over the other object's box (overlap left out);
    objects are the largest detection of each prompt colour; None unless both colours were found."""
    found = analyse(trace.image).objects  # largest first
    a = next((d for d in found if d.colour == first[0]), None)
    b = next((d for d in found if d.colour == second[0]), None)
    if a is None or b is None:
        return None
    box_a, box_b = _box(a, *trace.size), _box(b, *trace.size)
    own = {word: (box_a & ~box_b, box_b & ~box_a) for word in first}
    own |= {word: (box_b & ~box_a, box_a & ~box_b) for word in second}
    ratios = {}
    for word, (mine, other) in own.items():
        m = word_map(trace, word)
        ratios[word] = float(m[mine].mean() / m[other].mean())
    return ratios


@pytest.fixture(scope="module")
def default_pipe(default_model_path):
    from sdlab import api

    return api.load(default_model_path)


@pytest.mark.parametrize("prompt, first, second", TWO_OBJECTS, ids=["below", "above"])
def test_each_objects_words_attend_to_it(default_pipe, prompt, first, second):
    measured = {}
    for seed in SEEDS:
        trace = trace_attention(default_pipe, prompt, words=[*first, *second], seed=seed)
        measured[seed] = own_region_ratios(trace, first, second)
    detected = {s: r for s, r in measured.items() if r is not None}
    assert len(detected) >= MIN_DETECTED, measured
    assert all(ratio > 1 for r in detected.values() for ratio in r.values()), measured
