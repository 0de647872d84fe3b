"""The adherence evaluator: right on the dataset's own renders (clean and degraded), not fooled by wrong images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdlab.analysis.adherence import (
    ATTRIBUTES,
    AdherenceReport,
    Tally,
    analyse,
    evaluate,
    format_report,
    label_components,
    run_adherence,
    score_image,
)
from sdlab.errors import SdlabError
from sdlab.train.shapes import ObjectSpec, PlacedObject, PromptSpec, Scene, ShapesDataset, render_pil

RED_SQUARE = Scene("white", (PlacedObject("red", "square", "large", 0.25, 0.5, 0.2),), "left", None)
PAIR = Scene(
    "black",
    (PlacedObject("red", "circle", "small", 0.25, 0.5, 0.12), PlacedObject("blue", "star", "large", 0.72, 0.45, 0.2)),
    None,
    "left of",
)
PAIR_SPEC = PromptSpec(
    (ObjectSpec("red", "circle", "small"), ObjectSpec("blue", "star", "large")), "black", None, "left of"
)


def _examples(split: str, n: int, seed: int = 11):
    data = ShapesDataset(split, n, seed=seed)
    return [data.example(i) for i in range(n)]


def _degrade(image: Image.Image, rng: np.random.Generator, blur: float = 0.7, noise: float = 0.03) -> np.ndarray:
    """Mild Gaussian blur then Gaussian pixel noise: a stand-in for a generated image's imperfections."""
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64) / 255
    return np.clip(pixels + rng.normal(0, noise, pixels.shape), 0, 1)


def _assert_accurate(report: AdherenceReport, floor: float = 0.99) -> None:
    for name in ATTRIBUTES:
        tally = report.tallies[name]
        assert tally.total > 0 and tally.accuracy >= floor, f"{name}: {tally}"


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_ground_truth_renders_score_right(split):
    report = evaluate((render_pil(e.scene), e.spec) for e in _examples(split, 300))
    assert report.images == 300
    _assert_accurate(report)


def test_blurred_noisy_renders_score_right():
    rng = np.random.default_rng(0)
    examples = _examples("train", 150, seed=12) + _examples("heldout", 150, seed=12)
    _assert_accurate(evaluate((_degrade(render_pil(e.scene), rng), e.spec) for e in examples))


def test_larger_images_are_read_too():
    examples = _examples("heldout", 30, seed=13)
    _assert_accurate(evaluate((render_pil(e.scene, 256), e.spec) for e in examples), floor=1.0)


def test_unstated_attributes_are_not_checked():
    results = score_image(render_pil(RED_SQUARE), PromptSpec((ObjectSpec("red", "square"),))).results
    assert results == {
        "count": True,
        "colour": True,
        "shape": True,
        "size": None,
        "position": None,
        "relation": None,
        "binding": None,
        "background": None,
    }


def test_a_red_square_is_not_a_blue_circle():
    spec = PromptSpec((ObjectSpec("blue", "circle", "large"),), "white", "left")
    results = score_image(render_pil(RED_SQUARE), spec).results
    assert results["colour"] is False and results["shape"] is False
    assert results["count"] and results["size"] and results["position"] and results["background"]


def test_wrong_place_size_and_background_are_caught():
    spec = PromptSpec((ObjectSpec("red", "square", "small"),), "black", "top right")
    results = score_image(render_pil(RED_SQUARE), spec).results
    assert results["colour"] and results["shape"]
    assert results["size"] is False and results["position"] is False and results["background"] is False


def test_a_blank_image_has_nothing_in_it():
    blank = Image.new("RGB", (64, 64), (245, 245, 245))
    score = score_image(blank, PromptSpec((ObjectSpec("red", "square", "large"),), "white", "left"))
    assert score.analysis.objects == () and score.analysis.background == "white"
    assert score.results["count"] is False and score.results["colour"] is False and score.results["shape"] is False
    assert score.results["size"] is False and score.results["position"] is False and score.results["background"]
    assert not score.all_correct


def test_two_objects_relation_and_binding():
    image = render_pil(PAIR)
    assert score_image(image, PAIR_SPEC).all_correct
    swapped = PromptSpec(PAIR_SPEC.objects[::-1], "black", None, "left of")  # blue star left of red circle: no
    results = score_image(image, swapped).results
    assert results["relation"] is False and results["binding"] and results["colour"] and results["shape"]
    rebound = PromptSpec((ObjectSpec("blue", "circle"), ObjectSpec("red", "star")), None, None, "left of")
    results = score_image(image, rebound).results  # the right colours and shapes, on the wrong objects
    assert results["colour"] and results["shape"] and results["count"] and results["binding"] is False
    one = score_image(image, PromptSpec((ObjectSpec("red", "circle"),)))
    assert one.results["count"] is False and one.results["colour"] and one.results["binding"] is None


def test_analysis_reads_objects_back():
    analysis = analyse(render_pil(PAIR, 128))
    assert analysis.background == "black"
    (star, circle) = analysis.objects  # largest first
    assert (star.colour, star.shape, star.size, star.region) == ("blue", "star", "large", "right")
    assert (circle.colour, circle.shape, circle.size, circle.region) == ("red", "circle", "small", "left")
    assert abs(circle.x - 0.25) < 0.02 and abs(circle.half - 0.12) < 0.01


def test_label_components_uses_eight_neighbours():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # one diagonal line
    mask[4:6, 4:6] = True  # one block
    labels, count = label_components(mask)
    assert count == 2 and len({labels[0, 0], labels[1, 1], labels[2, 2]}) == 1 and labels[4, 4] != labels[0, 0]
    assert (labels[~mask] == 0).all()


def test_bad_specs_are_refused():
    with pytest.raises(SdlabError, match="one or two objects"):
        score_image(render_pil(RED_SQUARE), PromptSpec(()))


def test_run_adherence_generates_every_prompt_at_every_seed():
    examples = _examples("heldout", 6, seed=14)
    scenes = {e.caption: e.scene for e in examples}
    calls = []

    def generate(caption: str, seed: int) -> Image.Image:
        calls.append((caption, seed))
        return render_pil(scenes[caption]) if seed % 2 == 0 else Image.new("RGB", (64, 64), (0, 0, 0))

    report = run_adherence(generate, [(e.caption, e.spec) for e in examples], seeds=[0, 1])
    assert len(calls) == 12 and report.images == 12
    assert report.tallies["count"] == Tally(6, 12) and report.tallies["all"] == Tally(6, 12)


def test_format_report_is_a_markdown_table():
    good = Tally(9, 10)
    report = AdherenceReport(10, {**{a: good for a in ATTRIBUTES}, "relation": Tally(0, 0), "all": Tally(8, 10)})
    table = format_report({7.5: report, 1.0: report})
    lines = table.splitlines()
    assert lines[0] == "| guidance | images | " + " | ".join((*ATTRIBUTES, "all")) + " |"
    assert lines[1].count("|") == len(ATTRIBUTES) + 4
    assert lines[2].startswith("| 1 | 10 | 90.0% (9/10) |") and lines[3].startswith("| 7.5 |")
    assert "| – |" in lines[2] and lines[2].endswith("| 80.0% (8/10) |")
    assert report.as_dict()["colour"] == {"correct": 9, "total": 10, "accuracy": 0.9}
