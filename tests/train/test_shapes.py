"""Procedural shapes: deterministic from seeds, held-out pairs kept out of training, honest captions."""

from __future__ import annotations

import pytest
import torch

from sdlab.errors import SdlabError
from sdlab.train.shapes import (
    COLOURS,
    HELDOUT_PAIRS,
    PALETTE,
    POSITION_PHRASES,
    RELATION_PHRASES,
    SHAPES,
    SIZE_JITTER,
    SIZE_THRESHOLD,
    SIZES,
    ShapesDataset,
    heldout_prompts,
    make_example,
    render,
)


def _pairs(scene) -> set[tuple[str, str]]:
    return {(o.colour, o.shape) for o in scene.objects}


def test_same_seed_same_items_and_other_seeds_differ():
    a, b = ShapesDataset("train", 20, seed=5), ShapesDataset("train", 20, seed=5)
    other = ShapesDataset("train", 20, seed=6)
    for i in range(20):
        (xa, ca), (xb, cb) = a[i], b[i]
        assert ca == cb and torch.equal(xa, xb)
    assert sum(a[i][1] != other[i][1] for i in range(20)) >= 15
    assert sum(not torch.equal(a[i][0], other[i][0]) for i in range(20)) >= 18


def test_captions_are_pinned():
    """String-seeded generators: these captions are the same on every machine and Python version."""
    assert [make_example("train", 0, i).caption for i in range(3)] == [
        "a red background with a small green circle above a small white heart",
        "a picture of a black cross at the bottom",
        "a purple heart at the bottom on a green background",
    ]
    assert make_example("heldout", 0, 1).caption == "a picture of a blue cross at the top"


def test_items_are_images_in_range():
    for size in (64, 40):
        data = ShapesDataset("heldout", 4, seed=1, size=size)
        image, caption = data[3]
        assert image.shape == (3, size, size) and image.dtype == torch.float32
        assert -1.0 <= image.min().item() and image.max().item() <= 1.0
        assert isinstance(caption, str) and caption
    assert len(data) == 4


def test_render_uses_the_palette_and_antialiases():
    scene = make_example("train", 0, 2).scene  # one purple heart on green
    pixels = render(scene, 64).reshape(-1, 3) * 255
    background = torch.tensor(PALETTE[scene.background], dtype=torch.float32)
    colour = torch.tensor(PALETTE[scene.objects[0].colour], dtype=torch.float32)
    as_bg = (torch.from_numpy(pixels) - background).abs().max(dim=1).values < 0.5
    as_obj = (torch.from_numpy(pixels) - colour).abs().max(dim=1).values < 0.5
    edges = ~as_bg & ~as_obj
    assert as_bg.sum() > 2000 and as_obj.sum() > 50 and edges.sum() > 10  # blended edge pixels exist


def test_heldout_pairs_never_in_train_and_always_in_heldout():
    train = ShapesDataset("train", 3000, seed=0)
    seen: set[tuple[str, str]] = set()
    for i in range(len(train)):
        seen |= _pairs(train.scene(i))
    assert not seen & HELDOUT_PAIRS
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)
    heldout = ShapesDataset("heldout", 500, seed=0)
    assert all(_pairs(heldout.scene(i)) & HELDOUT_PAIRS for i in range(len(heldout)))
    assert len(HELDOUT_PAIRS) >= 6


def test_scenes_are_well_formed():
    data = ShapesDataset("train", 600, seed=2)
    for i in range(len(data)):
        scene = data.scene(i)
        colours = [o.colour for o in scene.objects]
        assert scene.background not in colours
        for o in scene.objects:
            assert abs(o.half / SIZES[o.size] - 1) <= SIZE_JITTER + 1e-9
            assert (o.half > SIZE_THRESHOLD) == (o.size == "large")
            assert o.half <= min(o.x, o.y, 1 - o.x, 1 - o.y)  # inside the canvas
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert a.colour != b.colour and a.shape != b.shape
            apart_x = abs(a.x - b.x) >= a.half + b.half
            apart_y = abs(a.y - b.y) >= a.half + b.half
            assert apart_x or apart_y  # boxes never overlap
            dx, dy = b.x - a.x, b.y - a.y
            along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[scene.relation]
            across = dy if scene.relation in ("left of", "right of") else dx
            assert along > abs(across)
        else:
            col = "left" if scene.objects[0].x < 1 / 3 else "right" if scene.objects[0].x > 2 / 3 else ""
            row = "top" if scene.objects[0].y < 1 / 3 else "bottom" if scene.objects[0].y > 2 / 3 else ""
            assert (f"{row} {col}".strip() or "center") == scene.position


def test_captions_state_every_attribute_the_spec_holds():
    for split in ("train", "heldout"):
        data = ShapesDataset(split, 400, seed=3)
        for i in range(len(data)):
            example = data.example(i)
            caption, spec, scene = example.caption, example.spec, example.scene
            for o in spec.objects:
                assert f"{o.colour} {o.shape}" in caption
                if o.size is not None:
                    assert f"{o.size} {o.colour} {o.shape}" in caption
            if all(o.size is None for o in spec.objects):
                assert "small" not in caption and "large" not in caption
            assert {(o.colour, o.shape) for o in spec.objects} == _pairs(scene)
            assert (spec.background is not None) == (f"{scene.background} background" in caption)
            if spec.position is not None:
                assert POSITION_PHRASES[spec.position] in caption and spec.position == scene.position
            elif len(spec.objects) == 1:
                assert not any(p in caption for p in POSITION_PHRASES.values())
            if len(spec.objects) == 2:
                assert RELATION_PHRASES[spec.relation] in caption
                first, second = (f"{o.colour} {o.shape}" for o in spec.objects)
                assert caption.index(first) < caption.index(second)  # the spec keeps the caption's order


def test_heldout_prompts():
    prompts = heldout_prompts(300, seed=0)
    assert len({c for c, _ in prompts}) == 300
    assert prompts == heldout_prompts(300, seed=0) and prompts != heldout_prompts(300, seed=1)
    counts = [len(spec.objects) for _, spec in prompts]
    assert 100 < counts.count(1) < 200
    for caption, spec in prompts:
        assert {(o.colour, o.shape) for o in spec.objects} & HELDOUT_PAIRS
        assert all(o.size is not None for o in spec.objects)
        assert (spec.position if len(spec.objects) == 1 else spec.relation) is not None


def test_bad_arguments():
    with pytest.raises(SdlabError, match="split"):
        ShapesDataset("test", 10)
    with pytest.raises(IndexError):
        ShapesDataset("train", 3)[3]
