"""ControlNet hints and image loading: canny against OpenCV, tensors against diffusers' VaeImageProcessor."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageDraw, ImageFilter

from sdlab.errors import SdlabError
from sdlab.pipelines.images import image_to_tensor, load_image
from sdlab.pipelines.preprocess import canny, control_hint, to_gray


def shapes(seed: int, w: int = 128, h: int = 128) -> Image.Image:
    """Random filled ellipses, rectangles and lines on a random background."""
    rng = np.random.default_rng(seed)

    def colour() -> tuple[int, ...]:
        return tuple(int(v) for v in rng.integers(0, 256, 3))

    im = Image.new("RGB", (w, h), colour())
    d = ImageDraw.Draw(im)
    for _ in range(6):
        xs, ys = sorted(rng.integers(0, w, 2)), sorted(rng.integers(0, h, 2))
        box = (int(xs[0]), int(ys[0]), int(xs[1]), int(ys[1]))
        [d.ellipse, d.rectangle][int(rng.integers(0, 2))](box, fill=colour())
        d.line(box, fill=colour(), width=int(rng.integers(1, 4)))
    return im


def noisy(seed: int) -> Image.Image:
    a = np.asarray(shapes(seed)).astype(np.float64)
    a += np.random.default_rng(seed).normal(0, 20, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def smooth(seed: int) -> Image.Image:
    """Photo-like: upsampled, blurred noise with a little grain."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).resize((200, 120), Image.Resampling.BICUBIC)
    a = np.asarray(im.filter(ImageFilter.GaussianBlur(2))) + rng.normal(0, 3, (120, 200, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


IMAGES = {"shapes0": shapes(0), "shapes1": shapes(1), "shapes2": shapes(2, 96, 160), "noisy": noisy(3),
          "smooth": smooth(4)}


def test_gray_is_opencv_rgb2gray_exactly():
    a = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert np.array_equal(to_gray(Image.fromarray(a)), cv2.cvtColor(a, cv2.COLOR_RGB2GRAY))


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("low, high", [(100, 200), (20, 60), (50, 50), (100.7, 200.2), (200, 100)])
def test_canny_is_opencv_canny_exactly(name, low, high):
    image = IMAGES[name]
    ref = cv2.Canny(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY), low, high)
    ours = canny(image, low, high)
    assert ours.mode == "RGB" and ours.size == image.size
    a = np.asarray(ours)
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
    assert set(np.unique(a)) <= {0, 255} and (a > 0).any()
    assert np.array_equal(a[..., 0], ref)  # every pixel (agreement measured at 100% on all cases)


def test_canny_refuses_negative_thresholds():
    with pytest.raises(SdlabError, match="canny thresholds must be >= 0"):
        canny(IMAGES["shapes0"], -1, 10)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_control_hint_is_diffusers_controlnet_preprocessing(mode):
    image = IMAGES["shapes2"].convert(mode)  # 96x160, resized to 64x128
    ref = VaeImageProcessor(do_convert_rgb=True, do_normalize=False).preprocess(image, height=128, width=64)
    ours = control_hint(image, 64, 128)
    assert ours.shape == (1, 3, 128, 64) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)


def test_control_hint_with_canny():
    image = IMAGES["shapes0"]
    ref = VaeImageProcessor(do_convert_rgb=True, do_normalize=False).preprocess(canny(image), height=64, width=64)
    assert torch.equal(control_hint(image, 64, 64, preprocess="canny"), ref)
    with pytest.raises(SdlabError, match="unknown ControlNet preprocessor 'depth'; use one of none, canny"):
        control_hint(image, 64, 64, preprocess="depth")
    with pytest.raises(SdlabError, match="multiples of 8"):
        control_hint(image, 60, 64)


def test_image_to_tensor_is_diffusers_preprocess():
    image = IMAGES["shapes2"]
    x = image_to_tensor(image)
    assert x.shape == (1, 3, 160, 96) and x.dtype == torch.float32
    assert torch.equal(x, VaeImageProcessor().preprocess(image))
    with pytest.raises(SdlabError, match=r"^image is 100x64; width and height must be multiples of 8"):
        image_to_tensor(Image.new("RGB", (100, 64)))


def test_load_image(tmp_path):
    rgba = Image.new("RGBA", (16, 8), (10, 20, 30, 255))
    rgba.putpixel((3, 3), (0, 0, 0, 0))  # transparent → white, as A1111 flattens
    rgba.save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.mode == "RGB" and loaded.size == (16, 8)
    assert loaded.getpixel((3, 3)) == (255, 255, 255) and loaded.getpixel((0, 0)) == (10, 20, 30)
    Image.new("L", (8, 8), 77).save(tmp_path / "g.jpg", quality=100)
    assert load_image(tmp_path / "g.jpg").getpixel((4, 4)) == (77, 77, 77)

    with pytest.raises(SdlabError, match=r"nope.png: no such file$"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(SdlabError, match=r"bad.png: not a readable image") as e:
        load_image(tmp_path / "bad.png")
    assert "\n" not in str(e.value)
