"""The pixel side of img2img, inpainting, outpainting and ControlNet hints, around `Runner` (AUTOMATIC1111's order):

    mask --load_mask--> 'L' --blur_mask--> blurred
    whole picture: image, blurred -> generation size        only masked: crop_region(blurred, padding) -> crop
    "fill": masked pixels take the surrounding colours      -> generation size
    Runner: latents, noise, sampling, decode
    whole picture: original kept outside the mask (overlay)  only masked: paste_back into the original

Control images are resized like the image (and cropped with it in only-masked mode), then preprocessed.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from sdlab.models.controlnet import ControlNet
from sdlab.pipelines.controlnet import ControlUnit
from sdlab.pipelines.images import image_to_tensor
from sdlab.pipelines.masks import (
    blur_mask,
    composite_unmasked,
    crop_region,
    fill_masked,
    load_mask,
    overlay_mask,
    paste_back,
)
from sdlab.pipelines.preprocess import control_hint
from sdlab.pipelines.runner import Inputs, PreviewCallback, Runner, StepCallback
from sdlab.pipelines.settings import ControlSettings, Settings

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in the original's pixels


@dataclass(frozen=True)
class ControlInput:
    """A loaded ControlNet, the image that steers it, and how."""

    net: ControlNet
    image: Image.Image
    settings: ControlSettings


def control_units(
    controls: tuple[ControlInput, ...], size: tuple[int, int], multiple: int, box: Box | None = None,
    original_size: tuple[int, int] | None = None,
) -> tuple[ControlUnit, ...]:
    """Hints at the generation `size` (W, H); with `box`, each control image is first brought to the
    original's size and cropped like it."""
    units = []
    for c in controls:
        image = c.image
        if box is not None and original_size is not None:
            image = _resized(image, original_size).crop(box)
        hint = control_hint(image, size[0], size[1], c.settings.preprocess, multiple)  # (1, 3, H, W) in [0, 1]
        s = c.settings
        units.append(ControlUnit(c.net, hint, s.strength, s.start, s.end, s.guess_mode))
    return tuple(units)


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def make_images(
    runner: Runner, s: Settings, on_step: StepCallback | None = None, refiner: Runner | None = None, *,
    image: Image.Image | None = None, mask: Image.Image | None = None, controls: tuple[ControlInput, ...] = (),
    on_preview: PreviewCallback | None = None,
) -> list[tuple[int, Image.Image]]:
    """(seed, image) for each image of the batch; `s` resolved, its width/height the generation size."""
    size, f = (s.width, s.height), runner.config.vae.downscale
    if image is None:
        return runner.generate_images(s, on_step, refiner, Inputs(control=control_units(controls, size, f)), on_preview)
    original = image.convert("RGB")
    blurred = box = None
    if mask is not None:
        blurred = blur_mask(load_mask(mask, original.size), s.mask_blur)
        if s.only_masked:
            box = crop_region(blurred, s.padding, s.width, s.height)
    work = _resized(original if box is None else original.crop(box), size)
    work_mask = None if blurred is None else _resized(blurred if box is None else blurred.crop(box), size)
    source = fill_masked(work, work_mask) if work_mask is not None and s.fill == "fill" else work
    units = control_units(controls, size, f, box, original.size)
    inputs = Inputs(image_to_tensor(source, f), work_mask, units)
    out = []
    for seed, result in runner.generate_images(s, on_step, refiner, inputs, on_preview):
        if box is not None:
            result = paste_back(original, result, box, blurred)
        elif work_mask is not None and s.composite:
            result = composite_unmasked(work, result, overlay_mask(work_mask))
        out.append((seed, result))
    return out
