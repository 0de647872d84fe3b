"""PIL-only plots: nice ticks that cover the data, data -> pixel mapping, and each series drawn where it belongs."""

from __future__ import annotations

import math
import random

import pytest

from sdlab.analysis.plot import (
    BACKGROUND,
    COLOURS,
    NICE_STEPS,
    TICKS,
    Axes,
    Series,
    layout,
    nice_range,
    plot,
    tick_label,
    tick_step,
    ticks,
)
from sdlab.errors import SdlabError

SIZE = (640, 400)


def _is_nice(step: float) -> bool:
    """1, 2, 2.5 or 5 times a power of ten."""
    mantissa = step / 10 ** math.floor(math.log10(step))
    return any(math.isclose(mantissa, k) for k in NICE_STEPS)


def _is_multiple(value: float, step: float) -> bool:
    return math.isclose(value / step, round(value / step), abs_tol=1e-6)


def _pixel(axes: Axes, x: float, y: float) -> tuple[int, int]:
    px, py = axes.to_pixel(x, y)
    return round(px), round(py)


# --- ticks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lo", "hi", "step"),
    [(0, 1, 0.2), (0, 10, 2), (0, 12, 2.5), (0, 20, 5), (0, 100, 20), (0, 0.07, 0.02), (-3, 17, 5), (1, 1.5, 0.1)],
)
def test_tick_step_is_the_smallest_nice_spacing_that_fits(lo, hi, step):
    assert tick_step(lo, hi) == pytest.approx(step)
    assert (hi - lo) / tick_step(lo, hi) <= TICKS + 1e-9


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1, 3, 5, 7.5, 12, 20], (0, 20)),
        ([0, 1], (0, 1)),
        ([0.013, 0.021], (0.012, 0.022)),
        ([-3, 17], (-5, 20)),
        ([0.3, 0.7], (0.3, 0.7)),  # 3 x 0.1 is 0.30000000000000004: the range must not end inside the data
    ],
)
def test_nice_range_widens_to_whole_ticks(values, expected):
    lo, hi = nice_range(values)
    assert (lo, hi) == pytest.approx(expected)
    assert lo <= min(values) and hi >= max(values)


def test_nice_range_covers_random_data_at_every_magnitude():
    rng = random.Random(0)
    for _ in range(500):
        scale = 10.0 ** rng.randint(-6, 6)
        values = [round(rng.uniform(-1, 1) * scale, rng.randint(0, 8)) for _ in range(rng.randint(1, 6))]
        lo, hi = nice_range(values)
        assert lo < hi and lo <= min(values) and hi >= max(values), values
        if min(values) < max(values):
            step = tick_step(min(values), max(values))  # the spacing the data's own range gets
            assert _is_multiple(lo, step) and _is_multiple(hi, step), values
            assert (hi - lo) / step <= TICKS + 2, values  # widened by at most a tick each way
        layout([Series("data", tuple(values), tuple(values))], SIZE)  # every point lies inside its own axes


def test_nice_range_of_one_value_is_a_range_around_it():
    for value in (0.0, 5.0, -2.0, 1e-4):
        lo, hi = nice_range([value, value])
        assert lo < value < hi


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (0, 1, (0, 0.2, 0.4, 0.6, 0.8, 1)),
        (0, 0.3, (0, 0.1, 0.2, 0.3)),
        (0.5, 9.5, (2, 4, 6, 8)),
        (0, 20, (0, 5, 10, 15, 20)),
        (-5, 20, (-5, 0, 5, 10, 15, 20)),
    ],
)
def test_ticks_are_nice_values_inside_the_range(lo, hi, expected):
    values = ticks(lo, hi)
    assert values == expected  # exactly: rounded, so 3 x 0.1 is 0.3
    step = tick_step(lo, hi)
    assert _is_nice(step) and all(_is_multiple(v, step) for v in values)
    assert [tick_label(v) for v in ticks(0, 0.3)] == ["0", "0.1", "0.2", "0.3"]


def test_tick_label_is_short():
    assert tick_label(0.30000000000000004) == "0.3" and tick_label(20.0) == "20" and tick_label(2.5e-5) == "2.5e-05"


# --- axes -----------------------------------------------------------------------------------------
def test_to_pixel_maps_range_ends_to_box_corners_with_y_upward():
    axes = Axes(x_range=(-2.0, 8.0), y_range=(0.0, 1.0), box=(70, 30, 570, 330))
    assert axes.to_pixel(-2, 0) == (70, 330)  # lowest x and y: bottom left
    assert axes.to_pixel(8, 1) == (570, 30)  # highest: top right
    assert axes.to_pixel(-2, 1) == (70, 30) and axes.to_pixel(8, 0) == (570, 330)
    assert axes.to_pixel(3, 0.5) == (320, 180)  # the middle of the data is the middle of the box
    assert axes.to_pixel(0, 0.9)[1] < axes.to_pixel(0, 0.1)[1]  # larger y: higher up, a smaller pixel row
    assert axes.contains(8, 1) and not axes.contains(8.01, 0.5) and not axes.contains(0, -0.01)


def test_layout_ranges_default_to_the_data_widened_and_box_fits_the_image():
    series = [Series("a", (1, 3, 5, 7.5, 12, 20), (0.1, 0.2, 0.4, 0.5, 0.6, 0.55))]
    axes = layout(series, SIZE)
    assert axes.x_range == pytest.approx((0, 20)) and axes.y_range == pytest.approx((0.1, 0.6))
    left, top, right, bottom = axes.box
    assert 0 < left < right < SIZE[0] - 1 and 0 < top < bottom < SIZE[1] - 1
    assert layout(series, SIZE, y_range=(0, 1)).y_range == (0, 1)


# --- drawing --------------------------------------------------------------------------------------
def test_each_series_has_its_colour_at_each_data_point():
    series = [
        Series("rising", (1, 2, 3, 4), (0.1, 0.3, 0.5, 0.9)),
        Series("falling", (1.5, 2.5, 3.5), (0.8, 0.6, 0.2)),
        Series("cloud", (1.2, 3.8), (0.45, 0.05), lines=False),
    ]
    image = plot(series, title="t", x_label="x", y_label="y", size=SIZE)
    assert image.size == SIZE and image.mode == "RGB"
    axes = layout(series, SIZE)
    for i, s in enumerate(series):
        for x, y in zip(s.xs, s.ys):
            assert image.getpixel(_pixel(axes, x, y)) == COLOURS[i], (s.label, x, y)
    assert image.getpixel((0, 0)) == BACKGROUND and image.getpixel((SIZE[0] - 1, SIZE[1] - 1)) == BACKGROUND


def test_lines_join_points_and_scatters_do_not():
    joined = Series("joined", (0, 10), (0, 10))
    scatter = Series("scatter", (0, 10), (10, 0), lines=False)
    image = plot([joined, scatter], size=SIZE, x_range=(-1, 11), y_range=(-1, 11))
    axes = layout([joined, scatter], SIZE, (-1, 11), (-1, 11))
    assert image.getpixel(_pixel(axes, 2.7, 2.7)) == COLOURS[0]
    assert image.getpixel(_pixel(axes, 2.7, 7.3)) != COLOURS[1]
    assert image.getpixel(_pixel(axes, 10, 0)) == COLOURS[1]


def test_given_ranges_are_used_for_the_points():
    s = Series("s", (2, 4), (0.25, 0.75))
    image = plot([s], size=SIZE, x_range=(0, 10), y_range=(0, 1))
    axes = layout([s], SIZE, (0, 10), (0, 1))
    assert axes.x_range == (0, 10) and axes.y_range == (0, 1)
    assert all(image.getpixel(_pixel(axes, x, y)) == COLOURS[0] for x, y in zip(s.xs, s.ys))


@pytest.mark.parametrize(
    "s",
    [
        Series("constant", (1, 2, 3), (5, 5, 5)),
        Series("zero", (1, 2, 3), (0, 0, 0)),
        Series("one point", (2,), (3,)),
        Series("one point at the origin", (0,), (0,)),
        Series("vertical", (4, 4), (1, 2)),
    ],
)
def test_degenerate_series_draw_inside_the_box(s):
    image = plot([s], size=SIZE)
    axes = layout([s], SIZE)
    left, top, right, bottom = axes.box
    for x, y in zip(s.xs, s.ys):
        px, py = _pixel(axes, x, y)
        assert left <= px <= right and top <= py <= bottom
        assert len(set(s.xs)) > 1 or left < px < right  # a single value: the range was widened around it
        assert len(set(s.ys)) > 1 or top < py < bottom
        assert image.getpixel((px, py)) == COLOURS[0]


def test_colours_repeat_after_ten_series():
    series = [Series(f"s{i}", (i,), (i,)) for i in range(12)]
    image = plot(series, size=(800, 500))
    axes = layout(series, (800, 500))
    assert image.getpixel(_pixel(axes, 11, 11)) == COLOURS[1]


# --- bad input ------------------------------------------------------------------------------------
def test_series_with_mismatched_lengths_is_refused():
    with pytest.raises(SdlabError, match=r"series 'a': 2 x values but 3 y values"):
        Series("a", (1, 2), (1, 2, 3))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_series_with_a_non_finite_value_is_refused(bad):
    with pytest.raises(SdlabError, match="finite"):
        Series("a", (1, 2), (1, bad))
    with pytest.raises(SdlabError, match="finite"):
        Series("a", (bad, 2), (1, 2))


def test_layout_refuses_what_it_cannot_draw():
    s = Series("s", (1, 2), (0.5, 1.5))
    with pytest.raises(SdlabError, match="at least one series"):
        layout([], SIZE)
    with pytest.raises(SdlabError, match="at least one series"):
        layout([Series("empty", (), ())], SIZE)
    with pytest.raises(SdlabError, match=r"point \(2, 1.5\) lies outside"):
        layout([s], SIZE, y_range=(0, 1))
    with pytest.raises(SdlabError, match="low < high"):
        layout([s], SIZE, x_range=(2, 2))
    with pytest.raises(SdlabError, match="make it larger"):
        plot([s], size=(120, 80))
