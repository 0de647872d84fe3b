"""Procedural captioned shapes: one or two coloured objects on a plain background, rendered anti-aliased.

A scene is drawn from a string-seeded `random.Random` (SHA-512 of "split:seed:index"), so the same
(split, seed, index) gives the same scene, caption and pixels on every machine. Geometry lives in
canvas fractions; each object is placed by the centre of its bounding box and sized by half the box's
larger side, so the evaluator (`sdlab.analysis.adherence`) can read every attribute back from pixels.

Some colour-shape pairs (`HELDOUT_PAIRS`) never appear in the "train" split; every "heldout" scene holds
at least one. A caption states colour and shape always, and size, position, relation and background
when its template does; the `PromptSpec` beside it records exactly what was stated.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sdlab.errors import SdlabError

Split = Literal["train", "heldout"]
SPLITS: tuple[str, ...] = ("train", "heldout")

# Eight colours far apart in CIELAB (smallest pairwise ΔE76: 47, red-orange and blue-purple), so they survive
# a VAE + diffusion round trip.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 40),
    "green": (40, 165, 60),
    "blue": (20, 120, 235),
    "purple": (150, 45, 175),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("purple", "star"),
        ("orange", "heart"),
        ("green", "triangle"),
        ("blue", "cross"),
        ("yellow", "circle"),
        ("red", "square"),
        ("white", "triangle"),
        ("black", "heart"),
    }
)  # each colour once; every shape still seen in training in six or seven colours

SIZES: dict[str, float] = {"small": 0.12, "large": 0.20}  # half the bounding box's larger side / canvas side
SIZE_JITTER = 0.08  # half-extent is scaled by 1 ± this
SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])  # evaluator: half-extent above this is "large"
EDGE_MARGIN = 0.015  # objects keep this far from the canvas edge
PAIR_GAP = 0.08  # two objects' boxes are at least this far apart along their relation's axis
ACROSS_RATIO = 0.4  # two objects' offset across the relation's axis is at most this x their offset along it
POSITION_JITTER = 0.05
SUPERSAMPLE = 4  # sub-samples per pixel side when rendering coverage

# Single-object positions: the 3x3 grid of the canvas, and where each cell's object is centred.
GRID_ROWS: tuple[str, ...] = ("top", "", "bottom")
GRID_COLS: tuple[str, ...] = ("left", "", "right")
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    (f"{row} {col}".strip() or "center"): (0.25 + 0.25 * c, 0.25 + 0.25 * r)
    for r, row in enumerate(GRID_ROWS)
    for c, col in enumerate(GRID_COLS)
}
POSITIONS: tuple[str, ...] = tuple(POSITION_CENTRES)
POSITION_PHRASES: dict[str, str] = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    **{p: f"in the {p} corner" for p in POSITIONS if " " in p},
}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")  # objects[0] <relation> objects[1]
RELATION_PHRASES: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
INVERSE_RELATION: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Caption templates. {a}/{b}: an object with its article ("an orange heart"); {sa}/{sb}: its shape alone;
# {bg}: the background colour with its article. A template states the position, relation or background
# exactly when it holds {pos}, {rel} or {bg}.
ONE_OBJECT_TEMPLATES: tuple[str, ...] = (
    "{a} {pos} on {bg} background",
    "{a} {pos}",
    "{a} on {bg} background",
    "{bg} background with {a} {pos}",
    "a picture of {a} {pos}",
    "{a}",
)
TWO_OBJECT_TEMPLATES: tuple[str, ...] = (
    "{a} {rel} {b}",
    "{a} {rel} {b} on {bg} background",
    "two objects: {a} {rel} {b}",
    "{a} and {b}, the {sa} {rel} the {sb}",
    "{bg} background with {a} {rel} {b}",
)


@dataclass(frozen=True)
class PlacedObject:
    """One object as drawn: what it is, and its bounding box in canvas fractions."""

    colour: str
    shape: str
    size: str  # "small" | "large"
    x: float  # centre of the bounding box, fraction of the width (0 = left)
    y: float  # centre of the bounding box, fraction of the height (0 = top)
    half: float  # half the box's larger side, fraction of the canvas side


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image."""

    background: str
    objects: tuple[PlacedObject, ...]  # one or two
    position: str | None  # grid cell of the single object; None for two
    relation: str | None  # objects[0] <relation> objects[1]; None for one


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str
    size: str | None = None  # None: the caption does not say


@dataclass(frozen=True)
class PromptSpec:
    """What a caption asks for; None marks an attribute it leaves open (the evaluator skips it)."""

    objects: tuple[ObjectSpec, ...]  # in the caption's order
    background: str | None = None
    position: str | None = None  # one object only
    relation: str | None = None  # two objects only: objects[0] <relation> objects[1]


@dataclass(frozen=True)
class Example:
    scene: Scene
    caption: str
    spec: PromptSpec


# --- geometry: every shape in unit coordinates, bounding box centred with its larger side 2 ---------
def _normalised(vertices: np.ndarray) -> np.ndarray:
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    return (vertices - (lo + hi) / 2) / ((hi - lo).max() / 2)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return _normalised(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1))


def _cross(arm: float = 0.34) -> np.ndarray:
    a = arm
    outline = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a)]  # top and right arms, clockwise
    outline += [(-u, -v) for u, v in outline]  # bottom and left arms: the same turned half a turn
    return _normalised(np.array(outline, dtype=np.float64))


def _heart(points: int = 96) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, points, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # y grows downwards
    return _normalised(np.stack([x, y], axis=1))


POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]),
    "triangle": np.array([(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]),
    "star": _star(),
    "cross": _cross(),
    "heart": _heart(),
}


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which unit-coordinate points (u right, v down) lie inside the shape (even-odd rule for polygons)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    vertices = POLYGONS[shape]
    inside = np.zeros(u.shape, dtype=bool)
    for (ua, va), (ub, vb) in zip(vertices, np.roll(vertices, -1, axis=0)):
        if va == vb:
            continue
        crosses = (va > v) != (vb > v)
        u_cross = ua + (v - va) * (ub - ua) / (vb - va)
        inside ^= crosses & (u < u_cross)
    return inside


def shape_coverage(
    shape: str, centre: tuple[float, float], half: float, height: int, width: int, supersample: int = SUPERSAMPLE
) -> np.ndarray:
    """Fraction of each pixel the shape covers; `centre` (x, y) and `half` in pixels. (height, width) float32."""
    if shape not in SHAPES:
        raise SdlabError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    cx, cy = centre
    x0, x1 = max(0, math.floor(cx - half) - 1), min(width, math.ceil(cx + half) + 1)
    y0, y1 = max(0, math.floor(cy - half) - 1), min(height, math.ceil(cy + half) + 1)
    alpha = np.zeros((height, width), dtype=np.float32)
    if x1 <= x0 or y1 <= y0:
        return alpha
    offsets = (np.arange(supersample) + 0.5) / supersample
    xs = (np.arange(x0, x1)[:, None] + offsets).ravel()  # sub-sample x coordinates, pixel units
    ys = (np.arange(y0, y1)[:, None] + offsets).ravel()
    u, v = np.meshgrid((xs - cx) / half, (ys - cy) / half)  # (rows * s, cols * s)
    hits = _inside(shape, u, v).reshape(y1 - y0, supersample, x1 - x0, supersample)
    alpha[y0:y1, x0:x1] = hits.mean(axis=(1, 3))
    return alpha


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as an RGB array (size, size, 3), float32 in [0, 1], anti-aliased by supersampling."""
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = np.array(PALETTE[scene.background], dtype=np.float32) / 255
    for obj in scene.objects:
        alpha = shape_coverage(obj.shape, (obj.x * size, obj.y * size), obj.half * size, size, size)[..., None]
        colour = np.array(PALETTE[obj.colour], dtype=np.float32) / 255
        image = image * (1 - alpha) + colour * alpha
    return image


def render_pil(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an 8-bit RGB PIL image."""
    return Image.fromarray((render(scene, size) * 255).round().astype(np.uint8))


# --- scenes ---------------------------------------------------------------------------------------
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)


def _pairs(split: str) -> list[tuple[str, str]]:
    """The colour-shape pairs a split's scenes draw from: all but the held-out ones, or only those."""
    return [p for p in ALL_PAIRS if p not in HELDOUT_PAIRS] if split == "train" else sorted(HELDOUT_PAIRS)


def _object_kinds(rng: random.Random, split: str, count: int) -> list[tuple[str, str]]:
    """`count` (colour, shape) pairs with distinct colours and distinct shapes; held-out rules applied."""
    first = rng.choice(_pairs(split))
    if count == 1:
        return [first]
    partners = [p for p in ALL_PAIRS if p[0] != first[0] and p[1] != first[1]]
    if split == "train":
        partners = [p for p in partners if p not in HELDOUT_PAIRS]
    kinds = [first, rng.choice(partners)]
    rng.shuffle(kinds)
    return kinds


def _half_extent(rng: random.Random, size: str) -> float:
    return SIZES[size] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))


def _place_single(rng: random.Random, position: str, half: float) -> tuple[float, float]:
    """Centre near the grid cell's own centre, kept inside the canvas."""
    lo, hi = half + EDGE_MARGIN, 1 - half - EDGE_MARGIN
    bx, by = POSITION_CENTRES[position]
    x = min(hi, max(lo, bx + rng.uniform(-POSITION_JITTER, POSITION_JITTER)))
    y = min(hi, max(lo, by + rng.uniform(-POSITION_JITTER, POSITION_JITTER)))
    return x, y


Point = tuple[float, float]


def _place_pair(rng: random.Random, relation: str, half_a: float, half_b: float) -> tuple[Point, Point]:
    """Centres of A and B with `A <relation> B`: apart along the axis, roughly level across it."""
    first, second = (half_a, half_b) if relation in ("left of", "above") else (half_b, half_a)
    lo, hi = first + EDGE_MARGIN, 1 - second - EDGE_MARGIN
    slack = hi - lo - (first + second + PAIR_GAP)
    shift_first = rng.uniform(0, slack)
    shift_second = rng.uniform(0, slack - shift_first)
    along = (lo + shift_first, hi - shift_second)  # the leading object, then the trailing one
    distance = along[1] - along[0]
    a_lo, a_hi = first + EDGE_MARGIN, 1 - first - EDGE_MARGIN
    b_lo, b_hi = second + EDGE_MARGIN, 1 - second - EDGE_MARGIN
    across_first = rng.uniform(a_lo, a_hi)
    reach = ACROSS_RATIO * distance
    across_second = rng.uniform(max(b_lo, across_first - reach), min(b_hi, across_first + reach))
    leading, trailing = (along[0], across_first), (along[1], across_second)
    if relation in ("above", "below"):
        leading, trailing = leading[::-1], trailing[::-1]  # the axis is y
    return (leading, trailing) if relation in ("left of", "above") else (trailing, leading)


def sample_scene(rng: random.Random, split: str) -> Scene:
    """One scene: one or two objects (even odds), their kinds, sizes and places, and a background."""
    kinds = _object_kinds(rng, split, 1 if rng.random() < 0.5 else 2)
    sizes = [rng.choice(tuple(SIZES)) for _ in kinds]
    halves = [_half_extent(rng, s) for s in sizes]
    background = rng.choice([c for c in COLOURS if c not in {k[0] for k in kinds}])
    if len(kinds) == 1:
        position, relation = rng.choice(POSITIONS), None
        centres = [_place_single(rng, position, halves[0])]
    else:
        position, relation = None, rng.choice(RELATIONS)
        centres = list(_place_pair(rng, relation, halves[0], halves[1]))
    objects = tuple(
        PlacedObject(colour=c, shape=s, size=z, x=x, y=y, half=h)
        for (c, s), z, h, (x, y) in zip(kinds, sizes, halves, centres)
    )
    return Scene(background=background, objects=objects, position=position, relation=relation)


# --- captions -------------------------------------------------------------------------------------
def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _object_phrase(obj: PlacedObject, sized: bool) -> str:
    return _with_article(f"{obj.size} {obj.colour} {obj.shape}" if sized else f"{obj.colour} {obj.shape}")


def caption_scene(rng: random.Random, scene: Scene, complete: bool = False) -> tuple[str, PromptSpec]:
    """A caption in one of several phrasings, and the spec of what it states.

    `complete`: only phrasings that state size and position/relation (evaluation prompts).
    """
    sized = complete or rng.random() < 0.5
    objects = list(scene.objects)
    relation = scene.relation
    if len(objects) == 2 and rng.random() < 0.5:  # name B first: "B right of A" for "A left of B"
        objects, relation = objects[::-1], INVERSE_RELATION[relation]
    templates = ONE_OBJECT_TEMPLATES if len(objects) == 1 else TWO_OBJECT_TEMPLATES
    if complete:
        templates = tuple(t for t in templates if "{pos}" in t or "{rel}" in t)
    template = rng.choice(templates)
    fields = {
        "a": _object_phrase(objects[0], sized),
        "sa": objects[0].shape,
        "bg": _with_article(scene.background),
        "pos": POSITION_PHRASES[scene.position] if scene.position else "",
        "rel": RELATION_PHRASES[relation] if relation else "",
    }
    if len(objects) == 2:
        fields.update(b=_object_phrase(objects[1], sized), sb=objects[1].shape)
    spec = PromptSpec(
        objects=tuple(ObjectSpec(o.colour, o.shape, o.size if sized else None) for o in objects),
        background=scene.background if "{bg}" in template else None,
        position=scene.position if "{pos}" in template else None,
        relation=relation if "{rel}" in template else None,
    )
    return template.format(**fields), spec


def _rng(*key: object) -> random.Random:
    """A generator seeded by SHA-512 of the key's text: identical on every machine and Python >= 3.2."""
    return random.Random(":".join(["sdlab.shapes", *map(str, key)]))


def make_example(split: str, seed: int, index: int) -> Example:
    rng = _rng(split, seed, index)
    scene = sample_scene(rng, split)
    caption, spec = caption_scene(rng, scene)
    return Example(scene=scene, caption=caption, spec=spec)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise SdlabError(f"unknown shapes split {split!r}; expected one of {', '.join(SPLITS)}")


class ShapesDataset(Dataset):
    """Item i: (image (3, size, size) float32 in [-1, 1], caption); the same for the same (split, seed, i)."""

    def __init__(self, split: Split, length: int, seed: int = 0, size: int = 64) -> None:
        _check_split(split)
        if length < 0 or size < 8:
            raise SdlabError(f"ShapesDataset needs length >= 0 and size >= 8, got length={length}, size={size}")
        self.split, self.length, self.seed, self.size = split, length, seed, size

    def __len__(self) -> int:
        return self.length

    def example(self, index: int) -> Example:
        """Scene (ground truth), caption and prompt spec of item `index`, without rendering."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a ShapesDataset of length {self.length}")
        return make_example(self.split, self.seed, index)

    def scene(self, index: int) -> Scene:
        return self.example(index).scene

    def spec(self, index: int) -> PromptSpec:
        return self.example(index).spec

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        example = self.example(index)
        pixels = torch.from_numpy(render(example.scene, self.size)).permute(2, 0, 1)  # (3, H, W) in [0, 1]
        return pixels * 2 - 1, example.caption


def heldout_prompts(n: int, seed: int = 0) -> list[tuple[str, PromptSpec]]:
    """`n` distinct evaluation prompts, one or two objects, each with a held-out pair, size and place stated."""
    prompts: dict[str, PromptSpec] = {}
    for index in range(100 * n + 100):
        if len(prompts) == n:
            return list(prompts.items())
        rng = _rng("prompts", seed, index)
        caption, spec = caption_scene(rng, sample_scene(rng, "heldout"), complete=True)
        prompts.setdefault(caption, spec)
    raise SdlabError(f"could not draw {n} distinct held-out prompts (got {len(prompts)}); ask for fewer")
