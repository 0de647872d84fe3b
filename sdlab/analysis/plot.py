"""Line and scatter plots drawn with PIL alone (sdlab does not depend on matplotlib).

    data (x, y) --Axes.to_pixel--> (left + (x - x0)/(x1 - x0)·width, bottom - (y - y0)/(y1 - y0)·height)

A plot is a title above, the plotting box with grid lines at "nice" ticks (1, 2, 2.5 or 5 times a power
of ten), tick labels and axis labels around it, and a legend to its right: each series in its own colour,
points as dots, joined by lines unless it is a scatter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from sdlab.errors import SdlabError

COLOURS: tuple[tuple[int, int, int], ...] = (  # matplotlib's tab10, in its order
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
GRID = (225, 225, 225)
NICE_STEPS = (1.0, 2.0, 2.5, 5.0, 10.0)  # tick spacings, times a power of ten
TICKS = 5  # about this many ticks an axis
MARKER_RADIUS = 3  # pixels
LINE_WIDTH = 2
MARGIN_LEFT, MARGIN_TOP, MARGIN_BOTTOM = 70, 30, 46  # pixels around the plotting box
LEGEND_SWATCH, LEGEND_ROW, LEGEND_PAD = 16, 16, 10


@dataclass(frozen=True)
class Series:
    label: str
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    lines: bool = True  # join the points in the given order; False: a scatter

    def __post_init__(self) -> None:
        if len(self.xs) != len(self.ys):
            raise SdlabError(f"series {self.label!r}: {len(self.xs)} x values but {len(self.ys)} y values")
        if not all(math.isfinite(v) for v in (*self.xs, *self.ys)):
            raise SdlabError(f"series {self.label!r}: every value must be a finite number")


@dataclass(frozen=True)
class Axes:
    """Where data lands: the data ranges and the plotting box they fill (pixels, right and bottom inclusive)."""

    x_range: tuple[float, float]
    y_range: tuple[float, float]
    box: tuple[int, int, int, int]  # left, top, right, bottom

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        """Data -> pixel: x grows to the right, y grows upward (pixel rows grow downward)."""
        left, top, right, bottom = self.box
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    def contains(self, x: float, y: float) -> bool:
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        return x0 <= x <= x1 and y0 <= y <= y1


# --- ticks ----------------------------------------------------------------------------------------
def tick_step(lo: float, hi: float, count: int = TICKS) -> float:
    """The smallest nice spacing that covers [lo, hi] in at most `count` intervals."""
    raw = (hi - lo) / count
    power = 10.0 ** math.floor(math.log10(raw))
    return next(k * power for k in NICE_STEPS if k * power >= raw * (1 - 1e-9))


def _padded(lo: float, hi: float) -> tuple[float, float]:
    """A range of width > 0 around a single value."""
    if hi > lo:
        return lo, hi
    pad = abs(lo) * 0.1 or 1.0
    return lo - pad, hi + pad


def nice_range(values: Sequence[float], count: int = TICKS) -> tuple[float, float]:
    """The data's range widened outward to whole ticks (never inward: 3 * 0.1 is 0.30000000000000004)."""
    lo, hi = _padded(min(values), max(values))
    step = tick_step(lo, hi, count)
    return min(lo, math.floor(lo / step + 1e-9) * step), max(hi, math.ceil(hi / step - 1e-9) * step)


def ticks(lo: float, hi: float, count: int = TICKS) -> tuple[float, ...]:
    """Nice values in [lo, hi], rounded so that 0.1 + 0.2 prints as 0.3."""
    step = tick_step(lo, hi, count)
    decimals = max(0, 2 - math.floor(math.log10(step)))
    first = math.ceil(lo / step - 1e-9)
    values = (round((first + i) * step, decimals) for i in range(int((hi - lo) / step + 1e-9) + 1))
    return tuple(v for v in values if lo - 1e-9 * step <= v <= hi + 1e-9 * step)


def tick_label(value: float) -> str:
    return f"{value:.6g}"


# --- drawing --------------------------------------------------------------------------------------
def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def _legend_width(series: Sequence[Series], font) -> int:
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    longest = max(_text_size(probe, s.label, font)[0] for s in series)
    return LEGEND_PAD * 3 + LEGEND_SWATCH + longest


def layout(
    series: Sequence[Series], size: tuple[int, int], x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
) -> Axes:
    """The axes a plot of `series` at `size` (W, H) draws into; ranges default to the data's, widened to ticks."""
    if not series or not any(s.xs for s in series):
        raise SdlabError("a plot needs at least one series with at least one point")
    xs = [x for s in series for x in s.xs]
    ys = [y for s in series for y in s.ys]
    x_range = x_range or nice_range(xs)
    y_range = y_range or nice_range(ys)
    for name, (lo, hi) in (("x", x_range), ("y", y_range)):
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise SdlabError(f"the {name} range needs finite low < high, got ({lo}, {hi})")
    right = size[0] - 1 - _legend_width(series, ImageFont.load_default())
    box = (MARGIN_LEFT, MARGIN_TOP, right, size[1] - 1 - MARGIN_BOTTOM)
    if box[2] - box[0] < 40 or box[3] - box[1] < 40:
        raise SdlabError(f"a {size[0]}x{size[1]} plot leaves no room for the data; make it larger")
    axes = Axes(x_range, y_range, box)
    for s in series:
        outside = [(x, y) for x, y in zip(s.xs, s.ys) if not axes.contains(x, y)]
        if outside:
            raise SdlabError(f"series {s.label!r}: point {outside[0]} lies outside the axes {x_range} x {y_range}")
    return axes


def _draw_frame(draw: ImageDraw.ImageDraw, axes: Axes, font) -> None:
    """Grid lines and tick labels at every tick, then the box on top."""
    left, top, right, bottom = axes.box
    for x in ticks(*axes.x_range):
        px = round(axes.to_pixel(x, axes.y_range[0])[0])
        draw.line([(px, top), (px, bottom)], fill=GRID)
        draw.line([(px, bottom), (px, bottom + 4)], fill=INK)
        w, _ = _text_size(draw, tick_label(x), font)
        draw.text((px - w / 2, bottom + 6), tick_label(x), fill=INK, font=font)
    for y in ticks(*axes.y_range):
        py = round(axes.to_pixel(axes.x_range[0], y)[1])
        draw.line([(left, py), (right, py)], fill=GRID)
        draw.line([(left - 4, py), (left, py)], fill=INK)
        w, h = _text_size(draw, tick_label(y), font)
        draw.text((left - 6 - w, py - h / 2 - 1), tick_label(y), fill=INK, font=font)
    draw.rectangle(axes.box, outline=INK)


def _draw_labels(image: Image.Image, axes: Axes, title: str, x_label: str, y_label: str, font) -> None:
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = axes.box
    w, _ = _text_size(draw, title, font)
    draw.text(((left + right - w) / 2, 8), title, fill=INK, font=font)
    w, _ = _text_size(draw, x_label, font)
    draw.text(((left + right - w) / 2, bottom + 24), x_label, fill=INK, font=font)
    w, h = _text_size(draw, y_label, font)
    strip = Image.new("RGB", (w + 4, h + 6), BACKGROUND)
    ImageDraw.Draw(strip).text((2, 0), y_label, fill=INK, font=font)
    upright = strip.rotate(90, expand=True)  # reads bottom to top
    image.paste(upright, (6, round((top + bottom - upright.height) / 2)))


def _draw_legend(draw: ImageDraw.ImageDraw, axes: Axes, series: Sequence[Series], font) -> None:
    x, y = axes.box[2] + LEGEND_PAD, axes.box[1]
    for i, s in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        mid = y + i * LEGEND_ROW + LEGEND_ROW // 2
        draw.line([(x, mid), (x + LEGEND_SWATCH, mid)], fill=colour, width=LINE_WIDTH)
        _, h = _text_size(draw, s.label, font)
        draw.text((x + LEGEND_SWATCH + LEGEND_PAD // 2, mid - h / 2 - 1), s.label, fill=INK, font=font)


def _draw_series(draw: ImageDraw.ImageDraw, axes: Axes, s: Series, colour: tuple[int, int, int]) -> None:
    points = [axes.to_pixel(x, y) for x, y in zip(s.xs, s.ys)]
    if s.lines and len(points) > 1:
        draw.line(points, fill=colour, width=LINE_WIDTH)
    r = MARKER_RADIUS
    for px, py in points:
        draw.ellipse([px - r, py - r, px + r, py + r], fill=colour)


def plot(
    series: Sequence[Series], *, title: str = "", x_label: str = "", y_label: str = "",
    size: tuple[int, int] = (640, 400), x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
) -> Image.Image:
    """A white RGB image of the series (colours in COLOURS order), with ticks, axis labels, title and legend."""
    axes = layout(series, size, x_range, y_range)
    image = Image.new("RGB", size, BACKGROUND)
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    _draw_frame(draw, axes, font)
    for i, s in enumerate(series):
        _draw_series(draw, axes, s, COLOURS[i % len(COLOURS)])
    _draw_legend(draw, axes, series, font)
    _draw_labels(image, axes, title, x_label, y_label, font)
    return image
