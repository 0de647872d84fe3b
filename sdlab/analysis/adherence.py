"""Prompt adherence of shapes images: read colour, shape, size, place and count back from pixels.

An image is analysed in five steps:
1. background: the median colour of the outer ring of pixels, named by the nearest palette colour;
2. objects: pixels far (CIELAB ΔE) from that background, split into 8-connected components, specks dropped;
3. colour: the median CIELAB colour of the component's half farthest from the background, named by the
   nearest palette colour (never the background's own);
4. coverage: each pixel's fraction of object colour (its projection on the background -> object line);
5. shape: every shape is placed where its area and centroid equal the coverage's (both survive blur),
   rendered anti-aliased, sharp and blurred, and compared with the coverage; the least squared difference
   wins — fill ratio, concavities and symmetry in one test. The winner's box gives size (half its larger
   side against SIZE_THRESHOLD) and place (the 3x3 grid cell of its centre).

`score_image` checks what a `PromptSpec` states against that; `evaluate` totals many images,
`run_adherence` generates them through a caller's function, `format_report` tabulates guidance x attribute.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdlab.errors import SdlabError
from sdlab.train.shapes import (
    GRID_COLS,
    GRID_ROWS,
    PALETTE,
    SHAPES,
    SIZE_THRESHOLD,
    ObjectSpec,
    PromptSpec,
    shape_coverage,
)

ATTRIBUTES: tuple[str, ...] = ("count", "colour", "shape", "size", "position", "relation", "binding", "background")
MAX_SIDE = 128  # larger images are box-downsampled to this side first
BORDER = 2  # pixels of the outer ring that sample the background
FOREGROUND_DELTA_E = 22.0  # CIELAB ΔE76 from the background above which a pixel belongs to an object
OBJECT_DELTA_E = 36.0  # an object needs a core this far from the background (palette colours are >= 47 apart)
MIN_OBJECT_FRACTION = 0.004  # components smaller than this fraction of the canvas are specks
MIN_OBJECT_PIXELS = 6  # ... and than this many pixels
TEMPLATE_BLURS: tuple[float, ...] = (0.0, 0.8, 1.6)  # Gaussian sigmas (pixels) each shape's render is tried at

ImageLike = Image.Image | np.ndarray


# --- colour ---------------------------------------------------------------------------------------
def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] (..., 3) -> CIELAB (D65) (..., 3)."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


PALETTE_NAMES: tuple[str, ...] = tuple(PALETTE)
PALETTE_LAB = srgb_to_lab(np.array([PALETTE[n] for n in PALETTE_NAMES], dtype=np.float64) / 255)  # (C, 3)


def nearest_colour(lab: np.ndarray, exclude: str | None = None) -> str:
    """The palette name nearest (ΔE76) to one CIELAB colour, optionally never `exclude`."""
    distances = np.linalg.norm(PALETTE_LAB - lab, axis=1)
    if exclude is not None:
        distances[PALETTE_NAMES.index(exclude)] = np.inf
    return PALETTE_NAMES[int(distances.argmin())]


# --- pixels ---------------------------------------------------------------------------------------
def as_rgb(image: ImageLike) -> np.ndarray:
    """PIL image or (H, W, 3) array (uint8, or float in [0, 1]) -> float64 (H, W, 3) in [0, 1], side <= MAX_SIDE."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise SdlabError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
        if image.dtype == np.uint8:
            image = Image.fromarray(image)
        else:
            image = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        scale = MAX_SIDE / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BOX)
    return np.asarray(image, dtype=np.float64) / 255


def border_colour(rgb: np.ndarray) -> np.ndarray:
    """Median RGB of the outer BORDER-pixel ring: (3,)."""
    sides = (rgb[:BORDER], rgb[-BORDER:], rgb[:, :BORDER], rgb[:, -BORDER:])
    return np.median(np.concatenate([s.reshape(-1, 3) for s in sides]), axis=0)


def neighbourhoods(values: np.ndarray, **pad) -> np.ndarray:
    """Every pixel's 3x3 neighbourhood: (9, H, W); outside the image as `np.pad(values, 1, **pad)` fills it."""
    height, width = values.shape
    padded = np.pad(values, 1, **pad)
    return np.stack([padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)])


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean (H, W) mask -> (labels (H, W) int, 0 = none; count)."""
    height, width = mask.shape
    none = height * width
    labels = np.where(mask, np.arange(none).reshape(height, width), none)  # each pixel starts as its own label
    while True:
        smallest = np.where(mask, neighbourhoods(labels, constant_values=none).min(axis=0), none)
        flat = smallest.ravel()
        smallest[mask] = flat[smallest[mask]]  # pointer jumping: adopt the label of the label's own pixel
        if np.array_equal(smallest, labels):
            break
        labels = smallest
    roots = np.unique(labels[mask])
    out = np.zeros((height, width), dtype=np.int64)
    out[mask] = np.searchsorted(roots, labels[mask]) + 1
    return out, len(roots)


def median3(values: np.ndarray) -> np.ndarray:
    """3x3 median of an (H, W) array, edges repeated: removes pixel noise, keeps edges where they are."""
    return np.median(neighbourhoods(values, mode="edge"), axis=0)


def gaussian_blur(values: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W) array, zero outside; sigma 0 returns it unchanged."""
    if sigma <= 0:
        return values
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    height, width = values.shape
    padded = np.pad(values, radius)  # (H + 2r, W + 2r)
    rows = sum(k * padded[:, i : i + width] for i, k in enumerate(kernel))  # (H + 2r, W)
    return sum(k * rows[i : i + height] for i, k in enumerate(kernel))  # (H, W)


def dilate(mask: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask grown by one pixel in all eight directions."""
    return neighbourhoods(mask).any(axis=0)


# --- objects --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Detection:
    """One object found in an image; coordinates are fractions of the canvas."""

    colour: str
    shape: str
    size: str  # "small" | "large"
    x: float  # centre of the fitted shape's bounding box (0 = left)
    y: float  # (0 = top)
    half: float  # half the box's larger side, fraction of the canvas side
    area: int  # pixels in the component

    @property
    def region(self) -> str:
        """Grid cell of the centre: "top left", "top", …, "center", …, "bottom right"."""
        row = GRID_ROWS[min(2, int(self.y * 3))]
        col = GRID_COLS[min(2, int(self.x * 3))]
        return f"{row} {col}".strip() or "center"


@dataclass(frozen=True)
class Analysis:
    background: str
    objects: tuple[Detection, ...]  # largest first


def _coverage(rgb: np.ndarray, background: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Per pixel, how far along the background -> colour line it lies, clipped to [0, 1]: (H, W)."""
    direction = colour - background
    return np.clip((rgb - background) @ direction / max(float(direction @ direction), 1e-6), 0, 1)


@functools.cache
def shape_moments(shape: str) -> tuple[float, float, float]:
    """(area, centroid x, centroid y) of a shape whose box has half-side 1, centred at the origin."""
    half, side = 200.0, 440
    alpha = shape_coverage(shape, (side / 2, side / 2), half, side, side).astype(np.float64)
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    mass = alpha.sum()
    return mass / half**2, ((alpha * xs).sum() / mass - side / 2) / half, ((alpha * ys).sum() / mass - side / 2) / half


@dataclass(frozen=True)
class ShapeFit:
    shape: str
    centre: tuple[float, float]  # box centre (x, y), pixels
    half: float  # half the box's larger side, pixels
    error: float  # least squared difference to the coverage, over the blurs tried


def fit_shape(alpha: np.ndarray, window: tuple[slice, slice], shape: str) -> ShapeFit:
    """Place `shape` where its area and centroid equal the coverage's (blur keeps both) and measure the misfit."""
    area, ox, oy = shape_moments(shape)
    ys, xs = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]] + 0.5
    mass = alpha.sum()
    half = float(np.sqrt(mass / area))
    centre = (float((alpha * xs).sum() / mass - ox * half), float((alpha * ys).sum() / mass - oy * half))
    template = shape_coverage(shape, centre, half, *alpha.shape)[window]
    error = min(((gaussian_blur(template, sigma) - alpha[window]) ** 2).sum() for sigma in TEMPLATE_BLURS)
    return ShapeFit(shape, centre, half, float(error))


def _describe(
    rgb: np.ndarray, lab: np.ndarray, component: np.ndarray, others: np.ndarray, bg_rgb: np.ndarray, bg_name: str
) -> Detection | None:
    """Colour, shape, size and place of one component (`others`: every other component's pixels)."""
    height, width = component.shape
    delta = np.linalg.norm(lab[component] - srgb_to_lab(bg_rgb), axis=1)
    core = delta >= np.median(delta)  # the half least mixed with the background
    colour = nearest_colour(np.median(lab[component][core], axis=0), exclude=bg_name)
    reach = dilate(dilate(component)) & ~others  # thin tips and soft edges the filtered mask left out
    alpha = _coverage(rgb, bg_rgb, rgb[component][core].mean(axis=0)) * reach  # (H, W)
    if alpha.sum() < 1:
        return None
    ys, xs = np.nonzero(reach)
    margin = 3
    window = (
        slice(max(0, ys.min() - margin), min(height, ys.max() + margin + 1)),
        slice(max(0, xs.min() - margin), min(width, xs.max() + margin + 1)),
    )
    best = min((fit_shape(alpha, window, s) for s in SHAPES), key=lambda f: f.error)
    half = best.half / min(height, width)
    return Detection(
        colour=colour,
        shape=best.shape,
        size="large" if half > SIZE_THRESHOLD else "small",
        x=float(best.centre[0] / width),
        y=float(best.centre[1] / height),
        half=float(half),
        area=int(component.sum()),
    )


def analyse(image: ImageLike) -> Analysis:
    """Background colour and every object (component above speck size) of one image."""
    rgb = as_rgb(image)  # (H, W, 3)
    lab = srgb_to_lab(rgb)
    bg_rgb = border_colour(rgb)
    bg_name = nearest_colour(srgb_to_lab(bg_rgb))
    delta = median3(np.linalg.norm(lab - srgb_to_lab(bg_rgb), axis=-1))  # (H, W) ΔE from the background
    foreground, strong = delta > FOREGROUND_DELTA_E, delta > OBJECT_DELTA_E
    labels, count = label_components(foreground)
    min_area = max(MIN_OBJECT_PIXELS, MIN_OBJECT_FRACTION * labels.size)
    found = []
    for k in range(1, count + 1):
        component = labels == k
        if (component & strong).sum() >= min_area / 2:
            detection = _describe(rgb, lab, component, foreground & ~component, bg_rgb, bg_name)
            found += [detection] if detection is not None else []
    return Analysis(background=bg_name, objects=tuple(sorted(found, key=lambda d: -d.area)))


# --- scoring one image ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageScore:
    """Per attribute: True/False, or None where the prompt does not ask (or it does not apply)."""

    results: dict[str, bool | None]
    analysis: Analysis

    @property
    def all_correct(self) -> bool:
        return all(v for v in self.results.values() if v is not None)


def _contains(found: Iterable, wanted: Iterable) -> bool:
    """Every wanted item is found, counting repeats (multiset inclusion)."""
    return not Counter(wanted) - Counter(found)


def _match(wanted: tuple[ObjectSpec, ...], found: tuple[Detection, ...]) -> tuple[Detection, ...] | None:
    """Distinct detections for the wanted objects, agreeing on the most colours and shapes; None if too few."""
    best, best_score = None, -1
    for candidate in itertools.permutations(found, len(wanted)):  # `found` is largest first: ties keep the big ones
        score = sum((d.colour == w.colour) + (d.shape == w.shape) for d, w in zip(candidate, wanted))
        if score > best_score:
            best, best_score = candidate, score
    return best


def relation_holds(a: Detection, b: Detection, relation: str) -> bool:
    """`a <relation> b`, judged along whichever axis separates their centres more."""
    dx, dy = b.x - a.x, b.y - a.y
    horizontal = abs(dx) >= abs(dy)
    return {
        "left of": horizontal and dx > 0,
        "right of": horizontal and dx < 0,
        "above": not horizontal and dy > 0,
        "below": not horizontal and dy < 0,
    }[relation]


def _check_spec(spec: PromptSpec) -> None:
    if len(spec.objects) not in (1, 2):
        raise SdlabError(f"a shapes prompt has one or two objects, got {len(spec.objects)}")


def judge(analysis: Analysis, spec: PromptSpec) -> ImageScore:
    """Compare what was found with what the prompt states, attribute by attribute."""
    _check_spec(spec)
    wanted, found = spec.objects, analysis.objects
    match = _match(wanted, found)  # None when fewer objects were found than asked for

    def on_match(check: Callable[[tuple[Detection, ...]], bool]) -> bool:
        return match is not None and bool(check(match))

    sized = [i for i, w in enumerate(wanted) if w.size is not None]
    results: dict[str, bool | None] = {
        "count": len(found) == len(wanted),
        "colour": _contains((d.colour for d in found), (w.colour for w in wanted)),
        "shape": _contains((d.shape for d in found), (w.shape for w in wanted)),
        "size": on_match(lambda m: all(m[i].size == wanted[i].size for i in sized)) if sized else None,
        "position": None if spec.position is None else on_match(lambda m: m[0].region == spec.position),
        "relation": None if spec.relation is None else on_match(lambda m: relation_holds(*m, spec.relation)),
        "binding": None
        if len(wanted) < 2
        else _contains(((d.colour, d.shape) for d in found), ((w.colour, w.shape) for w in wanted)),
        "background": None if spec.background is None else analysis.background == spec.background,
    }
    return ImageScore(results=results, analysis=analysis)


def score_image(image: ImageLike, spec: PromptSpec) -> ImageScore:
    return judge(analyse(image), spec)


# --- many images ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tally:
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.total if self.total else None


@dataclass(frozen=True)
class AdherenceReport:
    images: int
    tallies: dict[str, Tally]  # ATTRIBUTES, then "all" (every asked attribute right)

    def as_dict(self) -> dict:
        return {
            "images": self.images,
            **{k: {"correct": t.correct, "total": t.total, "accuracy": t.accuracy} for k, t in self.tallies.items()},
        }


def tally(scores: Iterable[ImageScore]) -> AdherenceReport:
    correct, total, images = Counter(), Counter(), 0
    for score in scores:
        images += 1
        for name, ok in [*score.results.items(), ("all", score.all_correct)]:
            if ok is not None:
                total[name] += 1
                correct[name] += bool(ok)
    return AdherenceReport(images, {k: Tally(correct[k], total[k]) for k in (*ATTRIBUTES, "all")})


def evaluate(images_and_specs: Iterable[tuple[ImageLike, PromptSpec]]) -> AdherenceReport:
    """Score every (image, spec) pair and total per attribute."""
    return tally(score_image(image, spec) for image, spec in images_and_specs)


def run_adherence(
    generate: Callable[[str, int], ImageLike], prompts: Sequence[tuple[str, PromptSpec]], seeds: Sequence[int]
) -> AdherenceReport:
    """Generate every prompt at every seed through `generate(caption, seed)` and score the images."""
    return evaluate((generate(caption, seed), spec) for caption, spec in prompts for seed in seeds)


def _cell(t: Tally) -> str:
    return "–" if t.accuracy is None else f"{100 * t.accuracy:.1f}% ({t.correct}/{t.total})"


def format_report(reports_by_guidance: Mapping[float, AdherenceReport]) -> str:
    """A Markdown table: one row per guidance scale, one column per attribute, cells "% (correct/total)"."""
    columns = (*ATTRIBUTES, "all")
    lines = [
        "| guidance | images | " + " | ".join(columns) + " |",
        "|---:|---:|" + "---:|" * len(columns),
    ]
    for guidance, report in sorted(reports_by_guidance.items()):
        cells = [_cell(report.tallies[c]) for c in columns]
        lines.append(f"| {guidance:g} | {report.images} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
