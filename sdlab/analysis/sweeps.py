"""Sweeps: one setting along each side of a grid of images, every cell timed and, for shapes prompts, scored.

    guidance: rows = prompts,  columns = guidance scales; every cell the same seeds
    sampler:  rows = samplers, columns = step counts;      every cell the same prompts x seeds

A cell makes its images one at a time through `generate(prompt, seed, options)` with a wall clock
(perf_counter) around each call and nothing else inside; its first image is its grid tile. A prompt that
comes with a `PromptSpec` (the default model's held-out prompts, `default_prompts`) is scored by
sdlab.analysis.adherence, so a cell also holds a measured fraction: of images with every stated attribute
right ("all right"), and of stated attributes right ("attributes right"). A guidance cell holds one
prompt x the seeds; `pooled` adds a column's cells up (every prompt x seed at one scale).

`write_sweep` saves grid.png, cells.csv, cells.md, plot.png and every image under images/.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sdlab.analysis.adherence import ATTRIBUTES, AdherenceReport, Tally, score_image, tally
from sdlab.analysis.grids import captioned
from sdlab.analysis.plot import Series, plot
from sdlab.atomic import atomic_write
from sdlab.diffusion.samplers import display_name, resolve_sampler
from sdlab.errors import SdlabError
from sdlab.pipelines.images import image_grid, save_png
from sdlab.train.shapes import PromptSpec, heldout_prompts

# (prompt, seed, options over the generation's own, e.g. {"guidance": 7.5}) -> one image
Generate = Callable[[str, int, Mapping[str, object]], Image.Image]

TILE_SIDE = 128  # tiles are enlarged (nearest) by whole times toward this many pixels a side
ROW_LABEL_WIDTH = 150  # pixels of the strip left of the grid that names each row
TITLE_HEIGHT = 18  # pixels of the strip above the grid
LABEL_LINE = 12  # pixels a line of PIL's default font takes
PLOT_SIZE = (720, 420)


@dataclass(frozen=True)
class Prompt:
    text: str
    spec: PromptSpec | None = None  # what it states, when known: its images are then scored


@dataclass(frozen=True)
class Cell:
    """One grid cell: the images of its jobs at one pair of axis values, their wall times and their score."""

    row: str  # row label, e.g. the prompt or "DPM++ 2M"
    column: str  # column label, e.g. "cfg 7.5" or "20 steps"
    axes: dict[str, str | float | int]  # axis name -> value, e.g. {"sampler": "euler", "steps": 20}
    jobs: tuple[tuple[Prompt, int], ...]  # (prompt, seed) of each image, in order
    images: tuple[Image.Image, ...]  # the first is the grid tile
    seconds: tuple[float, ...]  # wall time of each generation
    report: AdherenceReport | None  # over the jobs whose prompt has a spec; None when none has

    @property
    def mean_seconds(self) -> float:
        return sum(self.seconds) / len(self.seconds)

    @property
    def all_right(self) -> float | None:
        """Fraction of scored images with every stated attribute right."""
        return None if self.report is None else self.report.tallies["all"].accuracy

    @property
    def attributes_right(self) -> float | None:
        """Fraction of stated attributes right, over every scored image."""
        return None if self.report is None else attribute_tally(self.report).accuracy


@dataclass(frozen=True)
class Sweep:
    kind: str  # "guidance" | "sampler"
    title: str
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    cells: tuple[Cell, ...]  # row-major: cells[r * len(columns) + c]


@dataclass(frozen=True)
class SweepFiles:
    grid: Path
    csv: Path
    markdown: Path
    plot: Path
    images: tuple[tuple[Path, ...], ...]  # per cell, its images in job order (cells.csv: relative to the folder)


@dataclass(frozen=True)
class _Plan:
    """A cell before it runs: labels, axis values, the options it generates with, and its jobs."""

    row: str
    column: str
    axes: dict[str, str | float | int]
    options: dict[str, object]
    jobs: tuple[tuple[Prompt, int], ...]


# --- input ----------------------------------------------------------------------------------------
def _items(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise SdlabError(f"{what}: expected a comma-separated list, got {text!r}")
    return items


def parse_scales(text: str) -> tuple[float, ...]:
    """'1,3,7.5' -> (1.0, 3.0, 7.5), checked as `check_scales` does."""
    try:
        scales = tuple(float(t) for t in _items(text, "--scales"))
    except ValueError:
        raise SdlabError(f"--scales: expected numbers such as 1,3,5,7.5, got {text!r}") from None
    return check_scales(scales)


def parse_steps(text: str) -> tuple[int, ...]:
    """'5,10,20' -> (5, 10, 20), checked as `check_steps` does."""
    try:
        steps = tuple(int(t) for t in _items(text, "--steps"))
    except ValueError:
        raise SdlabError(f"--steps: expected whole numbers such as 5,10,20, got {text!r}") from None
    return check_steps(steps)


def parse_samplers(text: str) -> tuple[str, ...]:
    """'euler,DPM++ 2M Karras' -> ("euler", "DPM++ 2M Karras"), each a sampler sdlab knows."""
    return check_samplers(tuple(_items(text, "--samplers")))


def _distinct(values: Sequence, what: str) -> None:
    if not values:
        raise SdlabError(f"no {what} to sweep; give at least one")
    repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
    if repeated:
        raise SdlabError(f"{what} repeat ({', '.join(repeated)}); give each once")


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    bad = [s for s in scales if not (math.isfinite(s) and s >= 1)]
    if bad:
        raise SdlabError(f"guidance scales must be finite and >= 1 (1 = no guidance; below 1 is the same), got {bad[0]}")
    _distinct(scales, "guidance scales")
    return tuple(float(s) for s in scales)


def check_steps(steps: Sequence[int]) -> tuple[int, ...]:
    bad = [s for s in steps if s < 1]
    if bad:
        raise SdlabError(f"step counts must be at least 1, got {bad[0]}")
    _distinct(steps, "step counts")
    return tuple(int(s) for s in steps)


def check_samplers(samplers: Sequence[str], schedule: str = "default") -> tuple[str, ...]:
    for name in samplers:
        resolve_sampler(name)  # an unknown name raises, listing the known ones
    _distinct([sampler_label(n, schedule) for n in samplers], "samplers")  # "euler" and "Euler" are one sampler
    return tuple(samplers)


def sampler_schedule(name: str, schedule: str = "default") -> str:
    """The sigma schedule `name` runs with: the one its name gives ("... Karras"), else `schedule`."""
    named = resolve_sampler(name)[1]
    return schedule if named == "default" else named


def sampler_label(name: str, schedule: str = "default") -> str:
    """("dpmpp_2m_karras") -> "DPM++ 2M Karras", ("euler", "karras") -> "Euler Karras": the schedule it runs with
    is named unless it is the sampler's default."""
    run_with = sampler_schedule(name, schedule)
    return display_name(name) + ("" if run_with == "default" else f" {run_with.capitalize()}")



def default_prompts(count: int, seed: int = 0) -> tuple[Prompt, ...]:
    """Held-out prompts of the default (shapes) model, each with the spec its images are scored on."""
    return tuple(Prompt(text, spec) for text, spec in heldout_prompts(count, seed))


def pipeline_generate(pipe, **options) -> Generate:
    """`pipe.generate` (an sdlab.api.Pipeline) as a Generate; a sweep's options override these."""
    return lambda prompt, seed, overrides: pipe.generate(prompt, seed=seed, **{**options, **overrides})[0]


# --- running --------------------------------------------------------------------------------------
def _run(generate: Generate, plans: Sequence[_Plan], progress: bool, desc: str) -> tuple[Cell, ...]:
    from tqdm import tqdm

    cells = []
    with tqdm(total=sum(len(p.jobs) for p in plans), unit="image", desc=desc, file=sys.stderr,
              disable=not progress) as bar:
        for plan in plans:
            bar.set_postfix_str(f"{plan.row[:24]} | {plan.column}")
            images, seconds = [], []
            for prompt, seed in plan.jobs:
                start = time.perf_counter()
                image = generate(prompt.text, seed, plan.options)
                seconds.append(time.perf_counter() - start)
                images.append(image)
                bar.update(1)
            scored = [score_image(im, p.spec) for im, (p, _) in zip(images, plan.jobs) if p.spec is not None]
            report = tally(scored) if scored else None
            cells.append(Cell(plan.row, plan.column, plan.axes, plan.jobs, tuple(images), tuple(seconds), report))
    return tuple(cells)


def _check_jobs(prompts: Sequence[Prompt], seeds: Sequence[int]) -> None:
    if not prompts:
        raise SdlabError("a sweep needs at least one prompt")
    if not seeds:
        raise SdlabError("a sweep needs at least one seed")


def guidance_sweep(
    generate: Generate, prompts: Sequence[Prompt], scales: Sequence[float], seeds: Sequence[int] = (0,),
    *, progress: bool = False,
) -> Sweep:
    """One row per prompt, one column per scale; each cell that prompt at every seed (`options["guidance"]`)."""
    scales = check_scales(scales)
    _check_jobs(prompts, seeds)
    plans = [
        _Plan(p.text, f"cfg {g:g}", {"prompt": p.text, "guidance": g}, {"guidance": g}, tuple((p, s) for s in seeds))
        for p in prompts for g in scales
    ]  # fmt: skip
    cells = _run(generate, plans, progress, "guidance sweep")
    title = f"guidance sweep, seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"
    return Sweep("guidance", title, tuple(p.text for p in prompts), tuple(f"cfg {g:g}" for g in scales), cells)


def sampler_sweep(
    generate: Generate, samplers: Sequence[str], steps: Sequence[int], prompts: Sequence[Prompt],
    seeds: Sequence[int] = (0,), *, schedule: str = "default", progress: bool = False,
) -> Sweep:
    """One row per sampler, one column per step count; each cell every prompt at every seed
    (`options["sampler"]`, `options["schedule"]`, `options["steps"]`); the tile is the first prompt at the
    first seed. A sampler runs with the schedule its name gives ("DPM++ 2M Karras"), else with `schedule`."""
    samplers, steps = check_samplers(samplers, schedule), check_steps(steps)
    _check_jobs(prompts, seeds)
    jobs = tuple((p, s) for p in prompts for s in seeds)
    labels = tuple(sampler_label(name, schedule) for name in samplers)
    plans = []
    for name, label in zip(samplers, labels):
        for n in steps:
            options = {"sampler": name, "schedule": sampler_schedule(name, schedule), "steps": n}
            plans.append(_Plan(label, f"{n} steps", dict(options), options, jobs))
    cells = _run(generate, plans, progress, "sampler sweep")
    title = f"sampler sweep, {len(prompts)} prompt(s) x seed(s) {', '.join(map(str, seeds))}; tile: first of each"
    return Sweep("sampler", title, labels, tuple(f"{n} steps" for n in steps), cells)


# --- scores ---------------------------------------------------------------------------------------
def attribute_tally(report: AdherenceReport) -> Tally:
    """Every stated attribute of every image as one trial."""
    return Tally(sum(report.tallies[a].correct for a in ATTRIBUTES), sum(report.tallies[a].total for a in ATTRIBUTES))


def merge_reports(reports: Iterable[AdherenceReport]) -> AdherenceReport:
    reports = list(reports)
    keys = (*ATTRIBUTES, "all")
    tallies = {
        k: Tally(sum(r.tallies[k].correct for r in reports), sum(r.tallies[k].total for r in reports)) for k in keys
    }
    return AdherenceReport(sum(r.images for r in reports), tallies)


def pooled(sweep: Sweep) -> dict[str, AdherenceReport]:
    """Column label -> every scored image of that column (all rows); columns without a score are left out."""
    out = {}
    for c, column in enumerate(sweep.columns):
        reports = [cell.report for cell in sweep.cells[c :: len(sweep.columns)] if cell.report is not None]
        if reports:
            out[column] = merge_reports(reports)
    return out


# --- pictures -------------------------------------------------------------------------------------
def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def tile_caption(cell: Cell) -> str:
    text = f"{cell.column}, {cell.mean_seconds:.2f} s/image"
    if cell.report is not None:
        text += f", all right {_percent(cell.all_right)}, attributes {_percent(cell.attributes_right)}"
    return text


def _label_strip(height: int, width: int, text: str) -> Image.Image:
    strip = Image.new("RGB", (width, height), "white")
    lines = textwrap.wrap(text, width=max(8, width // 6 - 1))[: max(1, height // LABEL_LINE - 1)]
    draw, font = ImageDraw.Draw(strip), ImageFont.load_default()
    for i, line in enumerate(lines):
        draw.text((4, 4 + i * LABEL_LINE), line, fill="black", font=font)
    return strip


def sweep_grid(sweep: Sweep, scale: int | None = None) -> Image.Image:
    """The tiles (captioned, `scale` times larger; default toward TILE_SIDE) in rows x columns, each row
    named in a strip on the left, the sweep's title above."""
    side = sweep.cells[0].images[0].width
    scale = scale or max(1, TILE_SIDE // side)
    tiles = [captioned(cell.images[0], tile_caption(cell), scale) for cell in sweep.cells]
    grid = image_grid(tiles, columns=len(sweep.columns))  # (columns·w, rows·h)
    tile_h = tiles[0].height
    out = Image.new("RGB", (ROW_LABEL_WIDTH + grid.width, TITLE_HEIGHT + grid.height), "white")
    out.paste(grid, (ROW_LABEL_WIDTH, TITLE_HEIGHT))
    out.paste(_label_strip(TITLE_HEIGHT, out.width, sweep.title), (0, 0))
    for r, row in enumerate(sweep.rows):
        out.paste(_label_strip(tile_h, ROW_LABEL_WIDTH, row), (0, TITLE_HEIGHT + r * tile_h))
    return out


def sweep_plot(sweep: Sweep) -> Image.Image:
    """Guidance: adherence (pooled over prompts) against the scale. Samplers: attributes right against
    seconds per image, one line per sampler through its step counts. Without scores: seconds per image."""
    per_row = [sweep.cells[r * len(sweep.columns) : (r + 1) * len(sweep.columns)] for r in range(len(sweep.rows))]
    scored = all(cell.report is not None for cell in sweep.cells)
    if sweep.kind == "guidance":
        scales = [float(cell.axes["guidance"]) for cell in per_row[0]]
        if scored:
            reports = [pooled(sweep)[c] for c in sweep.columns]
            series = [
                Series("all attributes right", tuple(scales), tuple(r.tallies["all"].accuracy for r in reports)),
                Series("attributes right", tuple(scales), tuple(attribute_tally(r).accuracy for r in reports)),
            ]
            return plot(series, title="prompt adherence against guidance (all prompts x seeds)",
                        x_label="guidance scale", y_label="fraction right", y_range=(0, 1), size=PLOT_SIZE)
        columns = [sweep.cells[c :: len(sweep.columns)] for c in range(len(sweep.columns))]
        times = tuple(sum(cell.mean_seconds for cell in col) / len(col) for col in columns)
        return plot([Series("mean over prompts", tuple(scales), times)], title="time against guidance",
                    x_label="guidance scale", y_label="seconds per image", size=PLOT_SIZE)
    if scored:
        series = [
            Series(row, tuple(c.mean_seconds for c in cells), tuple(c.attributes_right for c in cells))
            for row, cells in zip(sweep.rows, per_row)
        ]
        return plot(series, title="attributes right against time (points: step counts, fewest first)",
                    x_label="seconds per image", y_label="fraction of attributes right", y_range=(0, 1),
                    size=PLOT_SIZE)
    series = [
        Series(row, tuple(float(c.axes["steps"]) for c in cells), tuple(c.mean_seconds for c in cells))
        for row, cells in zip(sweep.rows, per_row)
    ]
    return plot(series, title="time against steps", x_label="steps", y_label="seconds per image", size=PLOT_SIZE)


# --- tables ---------------------------------------------------------------------------------------
def cell_row(cell: Cell, files: Sequence[Path] = ()) -> dict[str, str | float | int | None]:
    """One CSV/Markdown row: labels, axis values, images, mean seconds, scores (None when not scored)."""
    tallies = {} if cell.report is None else cell.report.tallies
    return {
        "row": cell.row,
        "column": cell.column,
        **cell.axes,
        "images": len(cell.images),
        "seconds": cell.mean_seconds,
        "scored": 0 if cell.report is None else cell.report.images,
        "all_right": cell.all_right,
        "attributes_right": cell.attributes_right,
        **{a: (tallies[a].accuracy if a in tallies else None) for a in ATTRIBUTES},
        "files": ";".join(str(f) for f in files),
    }


def csv_text(sweep: Sweep, files: Sequence[Sequence[Path]] | None = None) -> str:
    """One row per cell (header `cell_row`'s keys); floats written exactly (repr), None as an empty field."""
    rows = [cell_row(cell, () if files is None else files[i]) for i, cell in enumerate(sweep.cells)]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return out.getvalue()


def _fraction(t: Tally) -> str:
    return "–" if t.accuracy is None else f"{t.accuracy:.2f} ({t.correct}/{t.total})"


def markdown_table(sweep: Sweep) -> str:
    """One row per cell: axis values, images, seconds per image, and the two scores when measured; for a
    guidance sweep over several prompts, then one row per scale with every prompt pooled."""
    axes = list(sweep.cells[0].axes)
    lines = [f"## {sweep.title}", "", "| " + " | ".join([*axes, "images", "s/image", "all right", "attributes right"]) + " |",
             "|" + "---|" * len(axes) + "---:|---:|---:|---:|"]  # fmt: skip
    for cell in sweep.cells:
        report = cell.report
        scores = ["–", "–"] if report is None else [_fraction(report.tallies["all"]), _fraction(attribute_tally(report))]
        values = [f"{v:g}" if isinstance(v, float) else str(v) for v in cell.axes.values()]
        lines.append("| " + " | ".join([*values, str(len(cell.images)), f"{cell.mean_seconds:.3f}", *scores]) + " |")
    if sweep.kind == "guidance" and len(sweep.rows) > 1 and pooled(sweep):
        lines += ["", "Every prompt pooled:", "", "| guidance | images | all right | attributes right |",
                  "|---:|---:|---:|---:|"]  # fmt: skip
        for column, report in pooled(sweep).items():
            lines.append(f"| {column.removeprefix('cfg ')} | {report.images} | {_fraction(report.tallies['all'])} | "
                         f"{_fraction(attribute_tally(report))} |")
    return "\n".join(lines) + "\n"


# --- files ----------------------------------------------------------------------------------------
def write_sweep(sweep: Sweep, out: str | Path, scale: int | None = None) -> SweepFiles:
    """Every image (images/r<row>-c<column>-<job>.png, with the metadata it came with), grid.png,
    cells.csv, cells.md and plot.png under the folder `out`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SdlabError(f"{out}: exists and is not a folder; a sweep writes several files into a folder")
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SdlabError(f"{out}: cannot make the folder ({e.strerror})") from None
    files = []
    for i, cell in enumerate(sweep.cells):
        r, c = divmod(i, len(sweep.columns))
        names = [Path("images") / f"r{r:02d}-c{c:02d}-{k:02d}.png" for k in range(len(cell.images))]
        for image, name in zip(cell.images, names):
            save_png(image, out / name, {k: v for k, v in image.info.items() if isinstance(v, str)})
        files.append(tuple(names))
    grid = save_png(sweep_grid(sweep, scale), out / "grid.png", {"title": sweep.title})
    table = atomic_write(out / "cells.csv", lambda tmp: Path(tmp).write_text(csv_text(sweep, files)))
    markdown = atomic_write(out / "cells.md", lambda tmp: Path(tmp).write_text(markdown_table(sweep)))
    chart = save_png(sweep_plot(sweep), out / "plot.png", {"title": sweep.title})
    return SweepFiles(grid, table, markdown, chart, tuple(tuple(out / name for name in names) for names in files))
