"""ControlNet hints: edge maps computed from scratch, and the hint tensor the ControlNet reads.

`canny` reproduces OpenCV's cv2.Canny(gray, low, high) (aperture 3, L1 gradient) in numpy:
grey = OpenCV's fixed-point RGB -> Y; 3x3 Sobel with replicated borders and no smoothing;
magnitude |dx| + |dy|; non-maximum suppression along the gradient quantised to 0/45/90/135 degrees;
hysteresis from pixels above `high` through 8-connected pixels above `low`.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sdlab.errors import SdlabError
from sdlab.pipelines.images import LATENT_FACTOR

# OpenCV 5 RGB2GRAY: 0.299, 0.587, 0.114 in 15-bit fixed point, summing to 1 (4.x used 14 bits: 4899, 9617, 1868)
GRAY_WEIGHTS = (9798, 19235, 3735)
GRAY_SHIFT = 15
TAN_SHIFT = 15  # OpenCV Canny's fixed point for the direction test
TAN_22_5 = int(0.4142135623730950488 * (1 << TAN_SHIFT) + 0.5)  # tan(22.5°)
PREPROCESSORS = ("none", "canny")
# 8-neighbourhood as (dy, dx)
NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)


def to_gray(image: Image.Image) -> np.ndarray:
    """RGB -> (H, W) uint8 luma, rounded exactly as OpenCV 5's cv2.cvtColor(..., COLOR_RGB2GRAY)."""
    rgb = np.asarray(image.convert("RGB")).astype(np.int32)  # (H, W, 3)
    r, g, b = GRAY_WEIGHTS
    y = rgb[..., 0] * r + rgb[..., 1] * g + rgb[..., 2] * b
    return ((y + (1 << (GRAY_SHIFT - 1))) >> GRAY_SHIFT).astype(np.uint8)


def _sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives of a (H, W) image, border pixels replicated: two (H, W) int64."""
    p = np.pad(gray.astype(np.int64), 1, mode="edge")  # (H+2, W+2)
    h, w = gray.shape

    def at(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w]

    dx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    dy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    return dx, dy


def _non_maximum(mag: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Where `mag` is a ridge across the gradient direction: (H, W) bool, OpenCV's tie rules."""
    h, w = mag.shape
    p = np.pad(mag, 1)  # zero outside the image

    def at(oy: np.ndarray | int, ox: np.ndarray | int) -> np.ndarray:
        rows = np.arange(h)[:, None] + 1 + oy
        cols = np.arange(w)[None, :] + 1 + ox
        return p[rows, cols]

    xs = np.abs(dx)
    ys = np.abs(dy) << TAN_SHIFT
    tan22 = xs * TAN_22_5
    tan67 = tan22 + (xs << (TAN_SHIFT + 1))
    across = ys < tan22  # gradient near horizontal: compare left and right
    along = ys > tan67  # near vertical: compare above and below
    s = np.where((dx ^ dy) < 0, -1, 1)  # diagonal: which way the gradient leans
    horizontal = (mag > at(0, -1)) & (mag >= at(0, 1))
    vertical = (mag > at(-1, 0)) & (mag >= at(1, 0))
    diagonal = (mag > at(-1, -s)) & (mag > at(1, s))
    return np.where(across, horizontal, np.where(along, vertical, diagonal))


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Strong pixels plus every weak pixel 8-connected to one: (H, W) bool, breadth first."""
    h, w = strong.shape
    cand = np.pad(weak | strong, 1).ravel()  # (H+2)*(W+2), False border stops the walk
    edge = np.pad(strong, 1).ravel()
    offsets = np.array([dy * (w + 2) + dx for dy, dx in NEIGHBOURS])
    frontier = np.flatnonzero(edge)
    while frontier.size:
        nxt = np.unique((frontier[:, None] + offsets).ravel())
        nxt = nxt[cand[nxt] & ~edge[nxt]]
        edge[nxt] = True
        frontier = nxt
    return edge.reshape(h + 2, w + 2)[1:-1, 1:-1]


def canny(image: Image.Image, low: float = 100, high: float = 200) -> Image.Image:
    """Canny edges as OpenCV computes them: RGB image, edges 255 on 0 in all three channels.

    `low`/`high` are hysteresis thresholds on |dx| + |dy| of the 3x3 Sobel (floored, swapped if
    low > high): a pixel is an edge if it survives non-maximum suppression, is above `low`, and is
    8-connected through such pixels to one above `high`. No smoothing is applied first, as in OpenCV.
    """
    if low < 0 or high < 0:
        raise SdlabError(f"canny thresholds must be >= 0, got low={low}, high={high}")
    low, high = sorted((int(np.floor(low)), int(np.floor(high))))
    dx, dy = _sobel(to_gray(image))  # (H, W) each
    mag = np.abs(dx) + np.abs(dy)
    ridge = _non_maximum(mag, dx, dy) & (mag > low)
    edges = _hysteresis(ridge & (mag > high), ridge)
    return Image.fromarray(edges.astype(np.uint8) * 255, mode="L").convert("RGB")


def control_hint(
    image: Image.Image, width: int, height: int, preprocess: str = "none", multiple: int = LATENT_FACTOR
) -> torch.Tensor:
    """The ControlNet conditioning image: (1, 3, height, width) float32 in [0, 1].

    `preprocess` runs first, at the image's own size ("canny": `canny` with 100/200). Then, exactly as
    diffusers' ControlNet pipelines (VaeImageProcessor, do_convert_rgb, no normalisation): a Lanczos
    resize to width x height in the image's own mode, conversion to RGB, x / 255.
    """
    if preprocess not in PREPROCESSORS:
        raise SdlabError(f"unknown ControlNet preprocessor {preprocess!r}; use one of {', '.join(PREPROCESSORS)}")
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        raise SdlabError(f"hint size {width}x{height}: width and height must be positive multiples of {multiple}")
    if preprocess == "canny":
        image = canny(image)
    hint = image.resize((width, height), resample=Image.Resampling.LANCZOS).convert("RGB")
    x = np.asarray(hint).astype(np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]  # (1, 3, H, W)
