"""Guidance and sampler sweeps: which image lands in which cell, wall times, scores, tables, files, bad input."""

from __future__ import annotations

import csv
import io
import math
import re
import time
from collections.abc import Mapping
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sdlab.analysis import sweeps
from sdlab.analysis.grids import CAPTION_LINES, LINE_HEIGHT
from sdlab.analysis.plot import COLOURS, Series, layout
from sdlab.analysis.sweeps import (
    PLOT_SIZE,
    ROW_LABEL_WIDTH,
    TITLE_HEIGHT,
    Prompt,
    cell_row,
    csv_text,
    default_prompts,
    guidance_sweep,
    markdown_table,
    parse_samplers,
    parse_scales,
    parse_steps,
    pipeline_generate,
    pooled,
    sampler_label,
    sampler_sweep,
    sweep_grid,
    sweep_plot,
    write_sweep,
)
from sdlab.errors import SdlabError
from sdlab.pipelines.images import read_png_text
from sdlab.train.shapes import ObjectSpec, PlacedObject, PromptSpec, Scene, heldout_prompts, render_pil

SIDE = 16  # fake images: SIDE x SIDE, one colour


class FakeGenerate:
    """Solid images whose colour says which (prompt, seed, options) made them; records every call."""

    def __init__(self, prompts: list[str], sleep: float = 0.0) -> None:
        self.prompts, self.sleep = prompts, sleep
        self.calls: list[tuple[str, int, dict]] = []

    def colour(self, prompt: str, seed: int, options: Mapping[str, object]) -> tuple[int, int, int]:
        knob = options.get("guidance", options.get("steps", 0))
        sampler = str(options.get("sampler", ""))
        return 10 * self.prompts.index(prompt) + len(sampler), 7 * seed, round(10 * float(knob))

    def __call__(self, prompt: str, seed: int, options: Mapping[str, object]) -> Image.Image:
        self.calls.append((prompt, seed, dict(options)))
        if self.sleep:
            time.sleep(self.sleep)
        image = Image.new("RGB", (SIDE, SIDE), self.colour(prompt, seed, options))
        image.info["parameters"] = f"{prompt}, seed {seed}, {dict(options)}"
        return image


# --- cells ----------------------------------------------------------------------------------------
def test_guidance_sweep_is_prompts_by_scales_row_major_with_the_same_seeds_everywhere():
    prompts = [Prompt("a red circle"), Prompt("a blue star")]
    fake = FakeGenerate([p.text for p in prompts])
    sweep = guidance_sweep(fake, prompts, [1, 7.5, 3], seeds=(0, 5))
    assert sweep.kind == "guidance" and sweep.title == "guidance sweep, seeds 0, 5"
    assert sweep.rows == ("a red circle", "a blue star") and sweep.columns == ("cfg 1", "cfg 7.5", "cfg 3")
    assert len(sweep.cells) == 6
    expected_calls = []
    for r, prompt in enumerate(prompts):
        for c, scale in enumerate((1.0, 7.5, 3.0)):
            cell = sweep.cells[r * 3 + c]
            assert (cell.row, cell.column) == (sweep.rows[r], sweep.columns[c])
            assert cell.axes == {"prompt": prompt.text, "guidance": scale}
            assert cell.jobs == ((prompt, 0), (prompt, 5))
            for image, (p, seed) in zip(cell.images, cell.jobs, strict=True):
                assert image.getpixel((0, 0)) == fake.colour(p.text, seed, {"guidance": scale})
            assert len(cell.seconds) == 2 and cell.report is None
            assert cell.all_right is None and cell.attributes_right is None
            expected_calls += [(prompt.text, seed, {"guidance": scale}) for seed in (0, 5)]
    assert fake.calls == expected_calls


def test_sampler_sweep_is_samplers_by_steps_each_cell_every_prompt_and_seed():
    prompts = [Prompt("one"), Prompt("two")]
    fake = FakeGenerate([p.text for p in prompts])
    sweep = sampler_sweep(fake, ["euler", "DPM++ 2M Karras", "euler_a"], [10, 2], prompts, seeds=(3, 1))
    assert sweep.kind == "sampler"
    assert sweep.rows == ("Euler", "DPM++ 2M Karras", "Euler a") and sweep.columns == ("10 steps", "2 steps")
    jobs = ((prompts[0], 3), (prompts[0], 1), (prompts[1], 3), (prompts[1], 1))
    expected_calls = []
    for r, name in enumerate(["euler", "DPM++ 2M Karras", "euler_a"]):
        for c, steps in enumerate((10, 2)):
            cell = sweep.cells[r * 2 + c]
            schedule = "karras" if name == "DPM++ 2M Karras" else "default"  # what the name gives, else the default
            options = {"sampler": name, "schedule": schedule, "steps": steps}
            assert (cell.row, cell.column, cell.axes, cell.jobs) == (sweep.rows[r], sweep.columns[c], options, jobs)
            assert [im.getpixel((0, 0)) for im in cell.images] == [fake.colour(p.text, s, options) for p, s in jobs]
            expected_calls += [(p.text, s, options) for p, s in jobs]
    assert fake.calls == expected_calls


def test_seconds_are_the_wall_time_of_each_generate_call():
    fake = FakeGenerate(["p"], sleep=0.02)
    sweep = guidance_sweep(fake, [Prompt("p")], [1, 5], seeds=(0, 1, 2))
    for cell in sweep.cells:
        assert len(cell.seconds) == 3 and all(s >= 0.02 for s in cell.seconds)
        assert cell.mean_seconds == pytest.approx(sum(cell.seconds) / 3) and cell.mean_seconds >= 0.02


def test_seconds_are_measured_around_generate_alone(monkeypatch):
    """A fake clock that only generate moves: each cell's seconds are exactly the times its calls took."""
    now = [100.0]
    monkeypatch.setattr(sweeps, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    fake = FakeGenerate(["p"])

    def generate(prompt: str, seed: int, options: Mapping[str, object]) -> Image.Image:
        now[0] += 0.25 * int(options["steps"]) + seed  # more steps and a larger seed: longer
        return fake(prompt, seed, options)

    sweep = sampler_sweep(generate, ["euler", "ddim"], [2, 4], [Prompt("p")], seeds=(0, 1))
    for cell in sweep.cells:
        steps = cell.axes["steps"]
        assert cell.seconds == (0.25 * steps, 0.25 * steps + 1)
        assert cell.mean_seconds == 0.25 * steps + 0.5


# --- scores ---------------------------------------------------------------------------------------
SQUARE_SPEC = PromptSpec((ObjectSpec("red", "square", "large"),), background="white", position="left")
SQUARE = Scene("white", (PlacedObject("red", "square", "large", 0.25, 0.5, 0.2),), "left", None)
PAIR_SPEC = PromptSpec(
    (ObjectSpec("red", "circle", "small"), ObjectSpec("blue", "star", "large")), background="black", relation="left of"
)
PAIR = Scene(
    "black",
    (PlacedObject("red", "circle", "small", 0.25, 0.5, 0.12), PlacedObject("blue", "star", "large", 0.72, 0.45, 0.2)),
    None,
    "left of",
)
# One small blue circle top right on black: of the square prompt's 6 stated attributes only the count is right;
# of the pair prompt's 7 only the background.
WRONG = Scene("black", (PlacedObject("blue", "circle", "small", 0.75, 0.2, 0.12),), "top right", None)
SCORED = (Prompt("a large red square on the left on a white background", SQUARE_SPEC),
          Prompt("a small red circle left of a large blue star on a black background", PAIR_SPEC))  # fmt: skip
RIGHT_SCENES = {SCORED[0].text: SQUARE, SCORED[1].text: PAIR}


def _shapes_generate(right_seeds_at: Mapping[float, int]):
    """Renders the prompt's own scene for seeds below `right_seeds_at[guidance]`, else the wrong scene."""

    def generate(prompt: str, seed: int, options: Mapping[str, object]) -> Image.Image:
        right = seed < right_seeds_at[float(options["guidance"])]
        return render_pil(RIGHT_SCENES[prompt] if right else WRONG)

    return generate


def test_scores_are_the_fractions_of_right_images_and_attributes():
    # four seeds; at scale 1 one image of each prompt is right, at 4 three, at 9 all four
    sweep = guidance_sweep(_shapes_generate({1.0: 1, 4.0: 3, 9.0: 4}), SCORED, [1, 4, 9], seeds=(0, 1, 2, 3))
    for r, (stated, wrong_right) in enumerate([(6, 1), (7, 1)]):  # stated attributes; of them right when wrong
        for c, right in enumerate((1, 3, 4)):
            cell = sweep.cells[r * 3 + c]
            assert cell.report.images == 4
            assert cell.all_right == right / 4
            assert cell.attributes_right == (right * stated + (4 - right) * wrong_right) / (4 * stated)
            row = cell_row(cell)
            assert row["scored"] == 4 and row["all_right"] == right / 4
            assert row["colour"] == right / 4 and row["count"] == (1.0 if r == 0 else right / 4)
            assert row["relation"] == (None if r == 0 else right / 4)
            assert row["position"] == (right / 4 if r == 0 else None)
    pools = pooled(sweep)
    assert list(pools) == ["cfg 1", "cfg 4", "cfg 9"]
    for column, right in zip(pools, (1, 3, 4)):
        assert pools[column].images == 8 and pools[column].tallies["all"].accuracy == right / 4
        assert pools[column].tallies["colour"].total == 8


def test_guidance_plot_draws_the_pooled_scores():
    sweep = guidance_sweep(_shapes_generate({1.0: 0, 4.0: 1, 9.0: 2}), SCORED, [1, 4, 9], seeds=(0, 1))
    all_right = (0.0, 0.5, 1.0)
    attributes = tuple((right * 13 + (2 - right) * 2) / 26 for right in (0, 1, 2))  # 13 stated, 2 right if wrong
    series = [Series("all attributes right", (1, 4, 9), all_right), Series("attributes right", (1, 4, 9), attributes)]
    image = sweep_plot(sweep)
    axes = layout(series, PLOT_SIZE, y_range=(0, 1))
    assert image.size == PLOT_SIZE
    for x, y in zip((1, 4, 9), attributes):  # the second series is drawn over the first
        px, py = axes.to_pixel(x, y)
        assert image.getpixel((round(px), round(py))) == COLOURS[1]
    px, py = axes.to_pixel(1, 0.0)
    assert image.getpixel((round(px), round(py))) == COLOURS[0]


def test_prompts_without_a_spec_are_not_scored():
    mixed = (SCORED[0], Prompt("a sunset over the sea"))
    fake = FakeGenerate([p.text for p in mixed])
    def generate(prompt: str, seed: int, options: Mapping[str, object]) -> Image.Image:
        return render_pil(SQUARE) if prompt == SCORED[0].text else fake(prompt, seed, options)

    sweep = guidance_sweep(generate, mixed, [1, 2])
    assert [c.report is None for c in sweep.cells] == [False, False, True, True]
    assert [c.all_right for c in sweep.cells] == [1.0, 1.0, None, None]
    assert sweep_plot(sweep).size == PLOT_SIZE  # falls back to time against guidance


# --- tables ---------------------------------------------------------------------------------------
def _parse_csv(text: str) -> tuple[list[str], list[dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(text))
    return list(reader.fieldnames), list(reader)


def test_csv_has_one_row_per_cell_with_exact_floats_and_empty_nones():
    prompts = [Prompt("a"), Prompt("b")]
    sweep = guidance_sweep(FakeGenerate(["a", "b"], sleep=0.001), prompts, [1, 7.5, 12.25], seeds=(0,))
    header, rows = _parse_csv(csv_text(sweep))
    assert header == list(cell_row(sweep.cells[0]))
    assert header[:4] == ["row", "column", "prompt", "guidance"] and header[-1] == "files"
    assert len(rows) == len(sweep.cells) == 6
    for row, cell in zip(rows, sweep.cells):
        assert (row["row"], row["column"], row["prompt"]) == (cell.row, cell.column, cell.axes["prompt"])
        assert float(row["guidance"]) == cell.axes["guidance"]
        assert float(row["seconds"]) == cell.mean_seconds  # repr: the exact float back
        assert row["images"] == "1" and row["scored"] == "0"
        assert row["all_right"] == row["attributes_right"] == row["colour"] == row["files"] == ""


def test_csv_scores_and_files():
    sweep = guidance_sweep(_shapes_generate({1.0: 1, 2.0: 3}), SCORED[:1], [1, 2], seeds=(0, 1, 2))
    files = [("images/a.png", "images/b.png", "images/c.png"), ("images/d.png", "images/e.png", "images/f.png")]
    _, rows = _parse_csv(csv_text(sweep, files))
    assert [float(r["all_right"]) for r in rows] == [1 / 3, 1.0]
    assert [float(r["attributes_right"]) for r in rows] == [(6 + 2) / 18, 1.0]
    assert [r["relation"] for r in rows] == ["", ""] and rows[0]["scored"] == "3"
    assert rows[1]["files"] == "images/d.png;images/e.png;images/f.png"


def _table_rows(text: str) -> list[str]:
    """The data rows of the Markdown tables (neither header nor rule)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [line for line in lines if not line.startswith("|---") and not line.startswith("| prompt |")
            and not line.startswith("| sampler |") and not line.startswith("| guidance |")]  # fmt: skip


def test_markdown_has_one_row_per_cell_then_the_pooled_scales():
    sweep = guidance_sweep(_shapes_generate({1.0: 0, 3.0: 2}), SCORED, [1, 3], seeds=(0, 1))
    text = markdown_table(sweep)
    assert text.startswith(f"## {sweep.title}\n")
    assert "| prompt | guidance | images | s/image | all right | attributes right |" in text
    rows = _table_rows(text)
    assert len(rows) == 4 + 2
    assert rows[0].startswith(f"| {SCORED[0].text} | 1 | 2 | ") and rows[0].endswith(" | 0.00 (0/2) | 0.17 (2/12) |")
    assert rows[1].endswith(" | 1.00 (2/2) | 1.00 (12/12) |")
    assert "Every prompt pooled:" in text
    assert rows[4] == "| 1 | 4 | 0.00 (0/4) | 0.15 (4/26) |" and rows[5] == "| 3 | 4 | 1.00 (4/4) | 1.00 (26/26) |"


@pytest.mark.parametrize("kind", ["one scored prompt", "unscored prompts", "sampler"])
def test_markdown_pools_only_several_scored_prompts(kind):
    if kind == "one scored prompt":
        sweep = guidance_sweep(_shapes_generate({1.0: 1, 2.0: 1}), SCORED[:1], [1, 2])
    elif kind == "unscored prompts":
        sweep = guidance_sweep(FakeGenerate(["a", "b"]), [Prompt("a"), Prompt("b")], [1, 2])
    else:
        sweep = sampler_sweep(FakeGenerate(["a"]), ["euler", "ddim"], [5, 10, 20], [Prompt("a")])
    text = markdown_table(sweep)
    assert "pooled" not in text
    assert len(_table_rows(text)) == len(sweep.cells)
    if kind != "one scored prompt":
        assert all(row.endswith(" | – | – |") for row in _table_rows(text))
    if kind == "sampler":
        assert _table_rows(text)[1].startswith("| euler | default | 10 | 1 | ")


# --- files ----------------------------------------------------------------------------------------
def test_write_sweep_writes_the_grid_tables_plot_and_every_image(tmp_path):
    fake = FakeGenerate(["one", "two"])
    sweep = sampler_sweep(fake, ["euler", "dpmpp_2m"], [2, 4, 8], [Prompt("one"), Prompt("two")], seeds=(0, 1))
    files = write_sweep(sweep, tmp_path / "out")
    out = tmp_path / "out"
    assert (files.grid, files.csv, files.markdown, files.plot) == (
        out / "grid.png", out / "cells.csv", out / "cells.md", out / "plot.png"
    )  # fmt: skip
    # grid: the row-label strip, the title strip, tiles enlarged to 128 px over their captions
    tile_w, tile_h = 128, 128 + CAPTION_LINES * LINE_HEIGHT + 4
    with Image.open(files.grid) as grid:
        assert grid.size == (ROW_LABEL_WIDTH + 3 * tile_w, TITLE_HEIGHT + 2 * tile_h)
        for i, cell in enumerate(sweep.cells):
            r, c = divmod(i, 3)
            corner = (ROW_LABEL_WIDTH + c * tile_w + 5, TITLE_HEIGHT + r * tile_h + 5)
            assert grid.getpixel(corner) == cell.images[0].getpixel((0, 0))  # the first image is the tile
    with Image.open(files.plot) as chart:
        assert chart.size == PLOT_SIZE
    assert files.csv.read_text() == csv_text(sweep, [[p.relative_to(out) for p in ps] for ps in files.images])
    assert files.markdown.read_text() == markdown_table(sweep)
    # every image, pixel for pixel, with its own metadata; the CSV names them relative to the folder
    assert len(files.images) == 6 and all(len(paths) == 4 for paths in files.images)
    _, rows = _parse_csv(files.csv.read_text())
    for i, (cell, paths, row) in enumerate(zip(sweep.cells, files.images, rows, strict=True)):
        r, c = divmod(i, 3)
        assert [p.name for p in paths] == [f"r{r:02d}-c{c:02d}-{k:02d}.png" for k in range(4)]
        assert row["files"] == ";".join(f"images/{p.name}" for p in paths)
        for image, path in zip(cell.images, paths, strict=True):
            with Image.open(path) as saved:
                assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(image))
            assert read_png_text(path)["parameters"] == image.info["parameters"]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(p.name for ps in files.images for p in ps)


def test_write_sweep_grid_scale_and_rewrite(tmp_path):
    sweep = guidance_sweep(FakeGenerate(["a"]), [Prompt("a")], [1, 2])
    write_sweep(sweep, tmp_path)  # an existing folder is fine, and writing twice replaces
    files = write_sweep(sweep, tmp_path, scale=3)
    with Image.open(files.grid) as grid:
        assert grid.size == (ROW_LABEL_WIDTH + 2 * 3 * SIDE, TITLE_HEIGHT + 3 * SIDE + CAPTION_LINES * LINE_HEIGHT + 4)
    assert sweep_grid(sweep).size == (ROW_LABEL_WIDTH + 2 * 128, TITLE_HEIGHT + 128 + CAPTION_LINES * LINE_HEIGHT + 4)


def test_write_sweep_refuses_a_file_for_a_folder(tmp_path):
    sweep = guidance_sweep(FakeGenerate(["a"]), [Prompt("a")], [1])
    (tmp_path / "taken").write_text("")
    with pytest.raises(SdlabError, match="taken: exists and is not a folder"):
        write_sweep(sweep, tmp_path / "taken")
    with pytest.raises(SdlabError, match="cannot make the folder"):
        write_sweep(sweep, tmp_path / "taken" / "below")


# --- bad input ------------------------------------------------------------------------------------
def _fail(*_) -> Image.Image:
    raise AssertionError("bad input must be refused before anything is generated")


@pytest.mark.parametrize(
    ("scales", "message"),
    [
        ([0.5], "must be finite and >= 1.*got 0.5"),
        ([1, 0], "got 0"),
        ([math.nan], "got nan"),
        ([1, math.inf], "got inf"),
        ([1, 3, 7, 3], r"guidance scales repeat \(3\); give each once"),
        ([], "no guidance scales to sweep"),
    ],
)
def test_guidance_sweep_refuses_bad_scales(scales, message):
    with pytest.raises(SdlabError, match=message):
        guidance_sweep(_fail, [Prompt("a")], scales)


@pytest.mark.parametrize(
    ("samplers", "steps", "message"),
    [
        (["euler"], [0], "step counts must be at least 1, got 0"),
        (["euler"], [5, -1], "got -1"),
        (["euler"], [5, 10, 5], r"step counts repeat \(5\)"),
        (["euler"], [], "no step counts to sweep"),
        (["eulerx"], [5], "unknown sampler 'eulerx'"),
        ([], [5], "no samplers to sweep"),
        (["euler", "Euler"], [5], r"samplers repeat \(Euler\)"),
        (["dpmpp_2m_karras", "DPM++ 2M Karras"], [5], r"samplers repeat \(DPM\+\+ 2M Karras\)"),
    ],
)
def test_sampler_sweep_refuses_bad_samplers_and_steps(samplers, steps, message):
    with pytest.raises(SdlabError, match=message):
        sampler_sweep(_fail, samplers, steps, [Prompt("a")])


def test_sweeps_refuse_no_prompts_or_no_seeds():
    with pytest.raises(SdlabError, match="at least one prompt"):
        guidance_sweep(_fail, [], [1])
    with pytest.raises(SdlabError, match="at least one seed"):
        guidance_sweep(_fail, [Prompt("a")], [1], seeds=())
    with pytest.raises(SdlabError, match="at least one prompt"):
        sampler_sweep(_fail, ["euler"], [5], [])
    with pytest.raises(SdlabError, match="at least one seed"):
        sampler_sweep(_fail, ["euler"], [5], [Prompt("a")], seeds=[])


def test_error_messages_are_one_line():
    for call in (lambda: parse_scales("1,x"), lambda: parse_steps(""), lambda: parse_samplers("nope")):
        with pytest.raises(SdlabError) as caught:
            call()
        assert "\n" not in str(caught.value)


# --- parsing --------------------------------------------------------------------------------------
def test_parse_lists():
    assert parse_scales("1,3,7.5") == (1.0, 3.0, 7.5)
    assert parse_scales(" 1 , 20 ,") == (1.0, 20.0)
    assert parse_steps("5,10,20,50") == (5, 10, 20, 50)
    assert parse_samplers("euler, euler_a,DPM++ 2M Karras") == ("euler", "euler_a", "DPM++ 2M Karras")


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (parse_scales, "1,x", "--scales: expected numbers such as 1,3,5,7.5, got '1,x'"),
        (parse_scales, " , ", "--scales: expected a comma-separated list"),
        (parse_scales, "0.5,2", "must be finite and >= 1"),
        (parse_scales, "1,nan", "got nan"),
        (parse_scales, "2,2", "repeat"),
        (parse_steps, "5,7.5", "--steps: expected whole numbers such as 5,10,20, got '5,7.5'"),
        (parse_steps, "", "--steps: expected a comma-separated list"),
        (parse_steps, "0,5", "at least 1"),
        (parse_samplers, "euler,warp", "unknown sampler 'warp'"),
        (parse_samplers, ",", "--samplers: expected a comma-separated list"),
    ],
)
def test_parse_refuses_bad_lists(parse, text, message):
    with pytest.raises(SdlabError, match=re.escape(message)):
        parse(text)


def test_sampler_labels_name_the_schedule_a_sampler_runs_with():
    assert sampler_label("euler") == "Euler" and sampler_label("euler_a") == "Euler a"
    assert sampler_label("euler", "karras") == "Euler Karras"  # the sweep's schedule, when the name gives none
    assert sampler_label("dpmpp_2m_exponential", "karras") == "DPM++ 2M Exponential"  # the name's own wins
    assert sampler_label("dpmpp_2m_karras") == "DPM++ 2M Karras" and sampler_label("DDIM") == "DDIM"


# --- glue -----------------------------------------------------------------------------------------
def test_default_prompts_are_the_held_out_prompts_with_their_specs():
    prompts = default_prompts(3, seed=2)
    assert [(p.text, p.spec) for p in prompts] == heldout_prompts(3, 2)
    assert len({p.text for p in prompts}) == 3 and all(p.spec is not None for p in prompts)


def test_pipeline_generate_passes_seed_and_lets_the_sweep_override_options():
    calls = []

    class Pipe:
        def generate(self, prompt: str, **options) -> list[Image.Image]:
            calls.append((prompt, options))
            return [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")]

    generate = pipeline_generate(Pipe(), steps=7, guidance=2.0)
    image = generate("a cat", 3, {"guidance": 5.0})
    assert image.getpixel((0, 0)) == (255, 0, 0)  # the first image
    assert calls == [("a cat", {"seed": 3, "steps": 7, "guidance": 5.0})]


# --- the default model ----------------------------------------------------------------------------
def test_sampler_sweep_on_the_default_model(default_model_path, tmp_path):
    import sdlab

    pipe = sdlab.load()
    pipe.generate("a red circle", seed=0, steps=1)  # warm up, so the first cell's time is like the others'
    prompts = default_prompts(2)
    sweep = sampler_sweep(pipeline_generate(pipe), ["euler", "dpmpp_2m"], [2, 8], prompts)
    assert [(c.axes["sampler"], c.axes["steps"]) for c in sweep.cells] == [
        ("euler", 2), ("euler", 8), ("dpmpp_2m", 2), ("dpmpp_2m", 8)
    ]  # fmt: skip
    assert all(im.size == (64, 64) for c in sweep.cells for im in c.images)
    _, rows = _parse_csv(csv_text(sweep))
    assert len(rows) == 4 and len(_table_rows(markdown_table(sweep))) == 4
    for row in rows:
        assert row["images"] == row["scored"] == "2" and float(row["seconds"]) > 0
        assert 0 <= float(row["all_right"]) <= 1 and 0 <= float(row["attributes_right"]) <= 1
    by_steps = {n: sum(c.mean_seconds for c in sweep.cells if c.axes["steps"] == n) for n in (2, 8)}
    assert by_steps[8] > by_steps[2], by_steps  # four times the U-Net calls
    files = write_sweep(sweep, tmp_path)
    with Image.open(files.grid) as grid:
        assert grid.size == (ROW_LABEL_WIDTH + 2 * 128, TITLE_HEIGHT + 2 * (128 + CAPTION_LINES * LINE_HEIGHT + 4))


def test_a_sampler_runs_with_the_schedule_its_label_names():
    fake = FakeGenerate(["p"])
    sweep = sampler_sweep(fake, ["euler", "euler karras"], [4], [Prompt("p")], schedule="default")
    assert sweep.rows == ("Euler", "Euler Karras")
    assert [call[2]["schedule"] for call in fake.calls] == ["default", "karras"]
    sweep = sampler_sweep(fake, ["euler"], [4], [Prompt("p")], schedule="karras")
    assert sweep.rows == ("Euler Karras",) and fake.calls[-1][2]["schedule"] == "karras"
    with pytest.raises(SdlabError, match="repeat"):
        sampler_sweep(fake, ["euler", "euler karras"], [4], [Prompt("p")], schedule="karras")
