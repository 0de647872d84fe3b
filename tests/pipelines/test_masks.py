"""Inpainting / outpainting masks: AUTOMATIC1111's semantics, checked pixel by pixel (OpenCV and diffusers as references)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageDraw

from sdlab.errors import SdlabError
from sdlab.pipelines.masks import (
    blur_mask,
    composite_unmasked,
    crop_region,
    extend_canvas,
    fill_masked,
    load_mask,
    mask_to_latent,
    overlay_mask,
    paste_back,
)

RED, BLUE = (200, 30, 30), (20, 40, 220)


def two_colour_image(w: int = 128, h: int = 96) -> Image.Image:
    """Left half red, right half blue."""
    im = Image.new("RGB", (w, h), RED)
    ImageDraw.Draw(im).rectangle((w // 2, 0, w - 1, h - 1), fill=BLUE)
    return im


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int], value: int = 255) -> Image.Image:
    m = Image.new("L", size)
    ImageDraw.Draw(m).rectangle(box, fill=value)
    return m


def random_image(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


# --- load_mask ---------------------------------------------------------------------------------------

def test_load_mask_takes_the_alpha_of_a_stroke_layer_and_converts_the_rest():
    stroke = Image.new("RGBA", (16, 8), (0, 0, 0, 0))
    ImageDraw.Draw(stroke).rectangle((2, 2, 5, 5), fill=(255, 0, 0, 200))
    stroke.putpixel((10, 4), (255, 255, 255, 100))  # faint: below A1111's > 128 threshold
    m = arr(load_mask(stroke, (16, 8)))
    assert m.sum() == 16 * 255 and (m[2:6, 2:6] == 255).all() and m[4, 10] == 0

    grey = Image.new("RGB", (16, 8), (128, 128, 128))
    assert (arr(load_mask(grey, (16, 8))) == 128).all()  # soft values kept
    opaque = Image.new("RGBA", (16, 8), (255, 255, 255, 255))
    assert (arr(load_mask(opaque, (16, 8))) == 255).all()  # an opaque RGBA is read by its colour
    assert (arr(load_mask(opaque, (16, 8), invert=True)) == 0).all()


def test_load_mask_size_mismatch_is_one_line():
    with pytest.raises(SdlabError, match=r"^mask is 16x8 but the image is 32x8; ") as e:
        load_mask(Image.new("L", (16, 8)), (32, 8))
    assert "\n" not in str(e.value)


# --- blur_mask -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sx, sy", [(4, 4), (1, 3), (0, 7), (16, 0), (2.5, 2.5), (64, 64)])
def test_blur_mask_is_a1111s_opencv_blur_exactly(sx, sy):
    m = box_mask((96, 80), (10, 5, 60, 70))
    ImageDraw.Draw(m).ellipse((62, 0, 95, 30), fill=180)
    ref = np.asarray(m)
    if sx > 0:  # A1111: kernel 2·int(2.5σ + 0.5) + 1, across then down, each rounded to uint8
        ref = cv2.GaussianBlur(ref, (2 * int(2.5 * sx + 0.5) + 1, 1), sx)
    if sy > 0:
        ref = cv2.GaussianBlur(ref, (1, 2 * int(2.5 * sy + 0.5) + 1), sy)
    assert np.array_equal(np.asarray(blur_mask(m, sx, sy)), ref)


def test_blur_zero_is_identity_and_negative_is_refused():
    m = box_mask((24, 16), (3, 3, 9, 9))
    assert np.array_equal(arr(blur_mask(m, 0)), arr(m))
    with pytest.raises(SdlabError, match="mask blur must be >= 0"):
        blur_mask(m, -1)


# --- mask_to_latent ----------------------------------------------------------------------------------

def test_binarized_latent_mask_is_diffusers_inpaint_processing():
    w, h = 96, 64
    m = blur_mask(box_mask((w, h), (13, 9, 50, 41)), 6)  # soft edges, so the 0.5 threshold matters
    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    ref = F.interpolate(processor.preprocess(m, height=h, width=w), size=(h // 8, w // 8))
    ours = mask_to_latent(m, (h // 8, w // 8), binarize=True)
    assert ours.shape == (1, 1, 8, 12) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)
    assert set(ours.unique().tolist()) == {0.0, 1.0}


def test_soft_latent_mask_is_a1111s_resize_and_rounds_to_its_mask():
    m = blur_mask(box_mask((96, 64), (13, 9, 50, 41)), 6)
    soft = mask_to_latent(m, (8, 12), binarize=False)
    a1111 = np.asarray(m.convert("RGB").resize((12, 8)), dtype=np.float32)[..., 0] / 255  # its latmask, before np.around
    assert torch.equal(soft[0, 0], torch.from_numpy(a1111))
    assert ((soft > 0) & (soft < 1)).any()  # soft values survive
    assert torch.equal(torch.round(soft)[0, 0], torch.from_numpy(np.around(a1111)))
    with pytest.raises(SdlabError, match="latent size must be positive"):
        mask_to_latent(m, (0, 12), binarize=False)


# --- fill_masked ---------------------------------------------------------------------------------------

def test_fill_keeps_unmasked_pixels_and_fills_holes_with_the_surrounding_colour():
    image = two_colour_image()
    red_hole = (16, 32, 39, 63)  # inside the red half, > 20 px from the blue
    blue_hole = (90, 10, 110, 40)
    mask = box_mask(image.size, red_hole)
    ImageDraw.Draw(mask).rectangle(blue_hole, fill=255)
    out, src, masked = arr(fill_masked(image, mask)), arr(image), np.asarray(mask) > 0
    assert np.array_equal(out[~masked], src[~masked])
    x0, y0, x1, y1 = red_hole
    assert np.abs(out[y0:y1 + 1, x0:x1 + 1] - RED).max() <= 16
    x0, y0, x1, y1 = blue_hole
    assert np.abs(out[y0:y1 + 1, x0:x1 + 1] - BLUE).max() <= 16


def test_fill_with_a_soft_mask_keeps_every_zero_pixel():
    image = random_image(1, 64, 48)
    mask = blur_mask(box_mask(image.size, (20, 10, 40, 30)), 4)
    keep = np.asarray(mask) == 0
    assert np.array_equal(arr(fill_masked(image, mask))[keep], arr(image)[keep])


# --- crop_region ---------------------------------------------------------------------------------------

def test_crop_region_a1111_example_and_aspect():
    # A1111's own example: a 128x32 mask, processed at 512x512, becomes a 128x128 region
    mask = box_mask((512, 512), (100, 200, 227, 231))
    assert crop_region(mask, 0, 512, 512) == (100, 152, 228, 280)


@pytest.mark.parametrize("seed", range(6))
def test_crop_region_contains_the_padded_box_keeps_the_aspect_and_matches_a1111(seed):
    rng = np.random.default_rng(seed)
    w, h = 160, 128
    x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
    x1, y1 = x0 + rng.integers(1, 20), y0 + rng.integers(1, 20)
    mask = box_mask((w, h), (x0, y0, x1, y1), value=int(rng.integers(1, 256)))
    pad, tw, th = int(rng.integers(0, 24)), int(rng.choice([64, 96, 128])), int(rng.choice([64, 96, 128]))
    box = crop_region(mask, pad, tw, th)
    bx0, by0, bx1, by1 = box
    assert 0 <= bx0 < bx1 <= w and 0 <= by0 < by1 <= h
    assert bx0 <= max(x0 - pad, 0) and by0 <= max(y0 - pad, 0)
    assert bx1 >= min(x1 + 1 + pad, w) and by1 >= min(y1 + 1 + pad, h)
    # the short side was grown to the target aspect: off by at most a pixel
    assert abs((bx1 - bx0) * th - (by1 - by0) * tw) <= max(tw, th)
    # diffusers' get_crop_region is A1111's get_crop_region + expand_crop_region
    assert box == VaeImageProcessor.get_crop_region(mask, tw, th, pad=pad)


def test_crop_region_slides_inside_and_clamps_when_the_image_is_too_small():
    tall = box_mask((200, 100), (195, 40, 199, 59))  # 5x20 at the right edge: grows to 20 wide, slides left
    assert crop_region(tall, 0, 64, 64) == (180, 40, 200, 60)
    wide = box_mask((200, 100), (0, 45, 199, 54))
    assert crop_region(wide, 0, 64, 64) == (0, 0, 200, 100)  # needs 200 high, the image has 100


def test_crop_region_empty_mask():
    with pytest.raises(SdlabError, match=r"^the mask is empty: nothing to inpaint$"):
        crop_region(Image.new("L", (32, 32)), 8, 64, 64)


# --- paste_back / composite_unmasked / overlay_mask -------------------------------------------------

def test_paste_back_changes_nothing_outside_the_box():
    original = random_image(2, 120, 80)
    mask = blur_mask(box_mask(original.size, (40, 20, 70, 50)), 4)
    box = crop_region(mask, 8, 64, 64)
    generated = random_image(3, 64, 64)
    out = arr(paste_back(original, generated, box, mask))
    x0, y0, x1, y1 = box
    outside = np.ones(out.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert outside.any() and np.array_equal(out[outside], arr(original)[outside])
    m = np.asarray(mask)
    resized = np.zeros_like(out)
    resized[y0:y1, x0:x1] = arr(generated.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS))
    assert np.array_equal(out[m == 255], resized[m == 255])  # fully masked: the generation
    assert np.array_equal(out[m == 0], arr(original)[m == 0])  # unmasked inside the box too
    with pytest.raises(SdlabError, match="is not inside"):
        paste_back(original, generated, (100, 0, 130, 30), mask)


def test_composite_unmasked_is_a1111s_overlay():
    original, result = random_image(4, 64, 48), random_image(5, 64, 48)
    mask = blur_mask(box_mask(original.size, (16, 8, 40, 30)), 3)
    out, m = arr(composite_unmasked(original, result, mask)), np.asarray(mask)
    assert np.array_equal(out[m == 0], arr(original)[m == 0])
    assert np.array_equal(out[m == 255], arr(result)[m == 255])
    ref = arr(VaeImageProcessor().apply_overlay(mask, original, result))  # the RGBa alpha_composite A1111 uses
    assert np.abs(out - ref).max() <= 1
    with pytest.raises(SdlabError, match="mask is 10x10 but the original is 64x48"):
        composite_unmasked(original, result, Image.new("L", (10, 10)))


def test_overlay_mask_doubles_and_saturates():
    m = Image.fromarray(np.array([[0, 1, 100, 127, 128, 200, 255]], dtype=np.uint8))
    assert np.asarray(overlay_mask(m)).tolist() == [[0, 2, 200, 254, 255, 255, 255]]


# --- extend_canvas -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fill", ["edge", "fill", "noise"])
def test_extend_canvas_keeps_the_old_pixels_and_masks_the_new_area(fill):
    image = two_colour_image(64, 48)
    canvas, mask = extend_canvas(image, 30, 0, 5, 17, fill=fill, seed=1, overlap_px=8)
    # 30 + 64 + 5 = 99 → 104 (extra 5 on the right); 48 + 17 = 65 → 72 (extra 7 at the bottom)
    assert canvas.size == mask.size == (104, 72) and canvas.mode == "RGB" and mask.mode == "L"
    assert np.array_equal(arr(canvas)[0:48, 30:94], arr(image))
    expected = np.full((72, 104), 255)
    expected[0:48 - 8, 30 + 8:94 - 8] = 0  # left, right and bottom grew: 8 px of overlap there, none at the top
    assert np.array_equal(arr(mask), expected)


def test_extend_canvas_fills_and_rounding():
    image = two_colour_image(64, 48)
    canvas, mask = extend_canvas(image, 16, 0, 0, 0, fill="edge", overlap_px=0)
    assert canvas.size == (80, 48)
    assert np.abs(arr(canvas)[:, :16] - RED).max() <= 2  # edge colour carried outwards
    assert (arr(mask)[:, :16] == 255).all() and (arr(mask)[:, 16:] == 0).all()
    c1, _ = extend_canvas(image, 0, 8, 0, 8, fill="noise", seed=7)
    c2, _ = extend_canvas(image, 0, 8, 0, 8, fill="noise", seed=7)
    assert np.array_equal(arr(c1), arr(c2)) and arr(c1)[:8].std() > 50
    assert extend_canvas(image, 3, 0, 0, 0)[0].size == (72, 48)  # only the left grows: it takes the extra 5
    assert extend_canvas(Image.new("RGB", (60, 44)), 0, 0, 0, 0)[0].size == (64, 48)


def test_extend_canvas_refuses_bad_input():
    image = Image.new("RGB", (16, 16))
    with pytest.raises(SdlabError, match="must be >= 0 px"):
        extend_canvas(image, -8, 0, 0, 0)
    with pytest.raises(SdlabError, match="unknown outpainting fill 'blur'; use one of edge, fill, noise"):
        extend_canvas(image, 8, 0, 0, 0, fill="blur")


def test_extend_canvas_overlap_wider_than_the_image_masks_all_of_it():
    _, mask = extend_canvas(Image.new("RGB", (16, 16)), 8, 0, 8, 0, overlap_px=12)
    assert (arr(mask) == 255).all()
