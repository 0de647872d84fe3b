"""Masks for inpainting and outpainting, as AUTOMATIC1111's img2img treats them.

A mask is a PIL 'L' image of the init image's size: 255 = repaint, 0 = keep, values between blend.
The order A1111 applies: `load_mask` → `blur_mask` (mask_blur) → either the whole picture
(`overlay_mask` for the final overlay) or "only masked" (`crop_region` → generate the crop at full
resolution → `paste_back`); `fill_masked` is inpainting_fill = 0 ("fill"), and `mask_to_latent`
gives the mask the U-Net or the latent blend sees. Pure PIL / numpy / torch: no models here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from sdlab.errors import SdlabError
from sdlab.pipelines.images import LATENT_FACTOR

ALPHA_MASK_THRESHOLD = 128  # A1111: an RGBA mask's alpha counts as painted where it is > 128
BLUR_KERNEL_SIGMAS = 2.5  # A1111 blur kernel: 2·int(2.5·σ + 0.5) + 1 taps (OpenCV GaussianBlur, reflect-101 border)
BLUR_FRACTION_BITS = 8  # OpenCV blurs 8-bit images with kernel taps in 1/256ths
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))  # A1111 "fill": (blur radius px, times laid on)
OUTPAINT_FILLS = ("edge", "fill", "noise")
EDGE_BLUR_MIN_PX = 8  # "edge" outpainting fill: blur radius = max(8, largest extension / 4)


def _size(image: Image.Image) -> str:
    return f"{image.width}x{image.height}"


def _check_same_size(what: str, image: Image.Image, other: Image.Image, other_name: str = "the image") -> None:
    if image.size != other.size:
        raise SdlabError(f"{what} is {_size(image)} but {other_name} is {_size(other)}; give both the same size")


def load_mask(mask: Image.Image, size: tuple[int, int], invert: bool = False) -> Image.Image:
    """Any mask image -> 'L' of `size` (W, H), white = repaint.

    As A1111 (create_binary_mask): an RGBA mask whose alpha is not fully opaque (a brush stroke on a
    transparent layer) is its alpha channel thresholded at > 128 to 0/255; every other mask is
    converted to 'L' as it is (soft values kept). `invert` is A1111's inpainting_mask_invert.
    """
    if mask.size != tuple(size):
        raise SdlabError(f"mask is {_size(mask)} but the image is {size[0]}x{size[1]}; give the mask the image's size")
    if mask.mode == "RGBA" and mask.getextrema()[3] != (255, 255):
        out = mask.getchannel("A").point(lambda a: 255 if a > ALPHA_MASK_THRESHOLD else 0)
    else:
        out = mask.convert("L")
    return ImageOps.invert(out) if invert else out


def _gaussian_taps(sigma: float) -> np.ndarray:
    """OpenCV's bit-exact 8-bit Gaussian kernel for A1111's size: (k,) int64 in 1/256ths summing to 256.

    exp(-x² / 2σ²) normalised, then quantised outside-in with the rounding error carried to the
    next tap; the centre takes what is left.
    """
    radius = int(BLUR_KERNEL_SIGMAS * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    exact = np.exp(-(x * x) / (2 * sigma * sigma))
    exact = exact / exact.sum() * (1 << BLUR_FRACTION_BITS)
    taps = np.zeros(2 * radius + 1, dtype=np.int64)
    err = 0.0
    for i in range(radius):
        wanted = exact[i] + err
        taps[i] = taps[-1 - i] = np.rint(wanted)
        err = wanted - taps[i]
    taps[radius] = (1 << BLUR_FRACTION_BITS) - 2 * taps[:radius].sum()
    return taps


def _blur_axis(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """One Gaussian pass of a (H, W) uint8 array along `axis`, reflect-101 border, rounded back to uint8."""
    taps = _gaussian_taps(sigma)
    r = len(taps) // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (r, r)
    padded = np.pad(a.astype(np.int64), pad, mode="reflect")  # numpy 'reflect' = OpenCV BORDER_REFLECT_101
    n = a.shape[axis]
    acc = sum(int(t) * padded.take(np.arange(i, i + n), axis=axis) for i, t in enumerate(taps) if t)
    half = 1 << (BLUR_FRACTION_BITS - 1)
    return np.clip((acc + half) >> BLUR_FRACTION_BITS, 0, 255).astype(np.uint8)


def blur_mask(mask: Image.Image, radius_x: float, radius_y: float | None = None) -> Image.Image:
    """A1111's mask_blur: a Gaussian of σ = radius_x px across, then σ = radius_y px down (default the same).

    Each pass rounds to uint8 as A1111's two cv2.GaussianBlur calls do, with OpenCV's fixed-point
    kernel, so the result is OpenCV's to the level; 0 leaves that axis unchanged.
    """
    radius_y = radius_x if radius_y is None else radius_y
    if radius_x < 0 or radius_y < 0:
        raise SdlabError(f"mask blur must be >= 0 px, got {radius_x}, {radius_y}")
    a = np.asarray(mask.convert("L"))
    if radius_x > 0:
        a = _blur_axis(a, radius_x, axis=1)
    if radius_y > 0:
        a = _blur_axis(a, radius_y, axis=0)
    return Image.fromarray(a, mode="L")


def mask_to_latent(mask: Image.Image, latent_hw: tuple[int, int], binarize: bool) -> torch.Tensor:
    """The mask at latent resolution: (1, 1, h, w) float32 in [0, 1], 1 = repaint.

    binarize=True (9-channel inpainting models): threshold at 0.5 at full resolution, then nearest
    resize (F.interpolate's default) -- exactly diffusers' StableDiffusionInpaintPipeline (mask
    processor with do_binarize, then prepare_mask_latents), and also A1111's conditioning mask
    (torch.round, then the same interpolate; the two agree since k/255 is never exactly 0.5).
    binarize=False (blended inpainting): soft values, resized with PIL bicubic (antialiased) as A1111
    resizes its latent mask; `torch.round` of this is A1111's latent mask, soft is "soft inpainting".
    """
    h, w = latent_hw
    if h <= 0 or w <= 0:
        raise SdlabError(f"latent size must be positive, got {h}x{w}")
    mask = mask.convert("L")
    if binarize:
        m = torch.from_numpy(np.asarray(mask).astype(np.float32) / 255.0)[None, None]  # (1, 1, H, W)
        m = torch.where(m < 0.5, 0.0, 1.0)
        return F.interpolate(m, size=(h, w))  # (1, 1, h, w)
    small = mask.resize((w, h), resample=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(small).astype(np.float32) / 255.0)[None, None]  # (1, 1, h, w)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's inpainting_fill = 0 ("fill"): masked pixels take the colours around them.

    The unmasked part (alpha = 255 - mask, premultiplied) is blurred with radii 256 → 0 px and the
    layers are laid over each other coarse to fine, so each hole ends up with a smooth blend of its
    border's colours. Fully unmasked pixels come back unchanged; a fully masked image turns black.
    """
    _check_same_size("mask", mask, image)
    known = image.convert("RGB")
    known.putalpha(ImageOps.invert(mask.convert("L")))
    known = known.convert("RGBa")  # premultiplied, so blurs average only the kept colours
    out = Image.new("RGBA", image.size)
    for radius, times in FILL_PASSES:
        layer = known.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return out.convert("RGB")


def _grow(lo: int, hi: int, extra: int, limit: int) -> tuple[int, int]:
    """Widen [lo, hi) by `extra` px split evenly, then slide it back inside [0, limit) (A1111's order)."""
    lo -= extra // 2
    hi += extra - extra // 2
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def crop_region(mask: Image.Image, padding_px: int, target_w: int, target_h: int) -> tuple[int, int, int, int]:
    """A1111's "only masked" (inpaint_full_res) box: (x0, y0, x1, y1), x1/y1 exclusive, in the mask's pixels.

    The bounding box of mask > 0 is padded by `padding_px` (inpaint_full_res_padding) and clamped to
    the image, then grown on its short side to the target_w:target_h aspect (to within a pixel) and
    slid back inside the image. If the image is too small on that side the box stops at the image's
    edge and the crop will be stretched to the target size.
    """
    if padding_px < 0 or target_w <= 0 or target_h <= 0:
        raise SdlabError(f"need padding >= 0 and a positive target size, got {padding_px}, {target_w}x{target_h}")
    box = mask.convert("L").getbbox()
    if box is None:
        raise SdlabError("the mask is empty: nothing to inpaint")
    w, h = mask.size
    x0, y0 = max(box[0] - padding_px, 0), max(box[1] - padding_px, 0)
    x1, y1 = min(box[2] + padding_px, w), min(box[3] + padding_px, h)
    aspect = target_w / target_h
    if (x1 - x0) / (y1 - y0) > aspect:
        y0, y1 = _grow(y0, y1, int((x1 - x0) / aspect - (y1 - y0)), h)
    else:
        x0, x1 = _grow(x0, x1, int((y1 - y0) * aspect - (x1 - x0)), w)
    return x0, y0, x1, y1


def composite_unmasked(original: Image.Image, result: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's final overlay: result where mask = 255, original where mask = 0, blended between.

    Pixels outside the mask are the original's exactly.
    """
    _check_same_size("result", result, original, "the original")
    _check_same_size("mask", mask, original, "the original")
    return Image.composite(result.convert("RGB"), original.convert("RGB"), mask.convert("L"))


def overlay_mask(mask: Image.Image) -> Image.Image:
    """The overlay mask A1111 uses when inpainting the whole picture: min(2 · blurred mask, 255).

    The repainted area then reaches fully to the middle of the blur ramp and fades out over its outer
    half. ("Only masked" overlays with the blurred mask itself, see `paste_back`.)
    """
    a = np.asarray(mask.convert("L")).astype(np.uint16)
    return Image.fromarray(np.minimum(2 * a, 255).astype(np.uint8), mode="L")


def paste_back(
    original: Image.Image, generated: Image.Image, box: tuple[int, int, int, int], mask: Image.Image
) -> Image.Image:
    """Put an "only masked" generation back: `generated` resized (Lanczos) to `box`, blended by `mask`.

    `mask` is the blurred full-size mask; every pixel outside `box` is the original's exactly.
    """
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= original.width and 0 <= y0 < y1 <= original.height):
        raise SdlabError(f"box {box} is not inside the {_size(original)} image")
    _check_same_size("mask", mask, original, "the original")
    canvas = original.convert("RGB")
    canvas.paste(generated.convert("RGB").resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS), (x0, y0))
    return composite_unmasked(original, canvas, mask)


def _split_to_multiple(w: int, before: int, after: int) -> tuple[int, int]:
    """Round before + w + after up to a multiple of 8, adding the extra on a side already being extended."""
    extra = -(before + w + after) % LATENT_FACTOR
    if after == 0 and before > 0:
        return before + extra, after
    return before, after + extra


def _edge_fill(image: Image.Image, left: int, top: int, right: int, bottom: int) -> Image.Image:
    """Edge pixels replicated outwards, then blurred so the streaks soften."""
    a = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
    radius = max(EDGE_BLUR_MIN_PX, max(left, top, right, bottom) / 4)
    return Image.fromarray(a).filter(ImageFilter.GaussianBlur(radius))


def extend_canvas(
    image: Image.Image,
    left: int,
    top: int,
    right: int,
    bottom: int,
    fill: str = "edge",
    seed: int = 0,
    overlap_px: int = 8,
) -> tuple[Image.Image, Image.Image]:
    """Outpainting: the image on a larger canvas, and the mask of what is to be painted.

    Each side grows by the given px; the new width and height are rounded up to multiples of 8, the
    extra px going to right/bottom, or to left/top when only that side grows. New area holds
    "edge" (replicated, blurred edge colours), "fill" (A1111's fill, see `fill_masked`) or "noise"
    (uniform RGB noise from `seed`). The old pixels are kept exactly. The 'L' mask is 255 over the
    new area and over `overlap_px` of the old image along each grown side, so the seam is repainted.
    """
    if min(left, top, right, bottom, overlap_px) < 0:
        raise SdlabError(f"outpainting sizes must be >= 0 px, got {left}, {top}, {right}, {bottom}, {overlap_px}")
    if fill not in OUTPAINT_FILLS:
        raise SdlabError(f"unknown outpainting fill {fill!r}; use one of {', '.join(OUTPAINT_FILLS)}")
    image = image.convert("RGB")
    w, h = image.size
    left, right = _split_to_multiple(w, left, right)
    top, bottom = _split_to_multiple(h, top, bottom)
    size = (left + w + right, top + h + bottom)
    old = (left, top, left + w, top + h)

    new_area = Image.new("L", size, 255)
    new_area.paste(0, old)
    if fill == "edge":
        canvas = _edge_fill(image, left, top, right, bottom)
    elif fill == "noise":
        noise = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        canvas = Image.fromarray(noise)
    else:
        canvas = Image.new("RGB", size)
        canvas.paste(image, old)
        canvas = fill_masked(canvas, new_area)
    canvas.paste(image, old)

    kept = (old[0] + (overlap_px if left else 0), old[1] + (overlap_px if top else 0),
            old[2] - (overlap_px if right else 0), old[3] - (overlap_px if bottom else 0))
    mask = Image.new("L", size, 255)
    if kept[0] < kept[2] and kept[1] < kept[3]:  # else the overlap covers the whole old image
        mask.paste(0, kept)
    return canvas, mask
