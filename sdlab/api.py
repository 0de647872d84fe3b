"""The Python API: `sdlab.load(...)` once, then `pipe.generate(prompt, ...)` as often as you like.

    pipe = sdlab.load("path/to/model.safetensors")
    images = pipe.generate("a red circle on a blue background", steps=20, seed=1)
    images[0].save("out.png", pnginfo=...)   # or sdlab.api.save(images, "out/")

Every image carries AUTOMATIC1111's `parameters` text and sdlab's JSON record in `image.info`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from sdlab import __version__
from sdlab.checkpoints import formats
from sdlab.checkpoints.load import component_weights_file, load as load_components
from sdlab.diffusion.samplers import display_name
from sdlab.errors import SdlabError
from sdlab.pipelines.images import read_png_text, save_png
from sdlab.pipelines.metadata import PARAMETERS_KEY, RECORD_KEY, format_parameters
from sdlab.pipelines.settings import Settings
from sdlab.pipelines.txt2img import Text2Image

HASH_CACHE = Path(os.environ.get("SDLAB_CACHE", Path.home() / ".cache" / "sdlab")) / "hashes.json"
SCHEDULE_NAMES = {"default": None, "karras": "Karras", "exponential": "Exponential"}


DEFAULT_MODEL = "shapes-64.safetensors"  # trained by `sdlab train` (README), shipped as package data


def default_model() -> Path:
    """The small model sdlab ships as package data."""
    from importlib import resources

    path = Path(str(resources.files("sdlab.data").joinpath(DEFAULT_MODEL)))
    if not path.is_file():
        raise SdlabError("this sdlab has no default model installed; pass a model path or repo id (--model PATH)")
    return path


def file_sha256(path: Path) -> str:
    """SHA-256 of a weights file, remembered per (path, size, mtime) since big files take seconds."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        cache = json.loads(HASH_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        cache[key] = digest.hexdigest()
        try:
            HASH_CACHE.parent.mkdir(parents=True, exist_ok=True)
            HASH_CACHE.write_text(json.dumps(cache))
        except OSError:
            pass  # a read-only home only costs the next run the hashing time
    return cache[key]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    sha256: str
    path: str

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]  # A1111's "Model hash"


def model_info(source: Path) -> ModelInfo:
    weights = component_weights_file(source / "unet", None) if source.is_dir() else source
    return ModelInfo(source.name if source.is_dir() else source.stem, file_sha256(weights), str(source))


class Pipeline:
    """A loaded model: `generate` returns PIL images with their metadata in `image.info`."""

    def __init__(self, runner: Text2Image, info: ModelInfo, refiner: tuple[Text2Image, ModelInfo] | None = None):
        self.runner = runner
        self.info = info
        self.config = runner.config
        self.refiner = refiner

    def generate(
        self, prompt: str, *, on_step: Callable[[int, int], None] | None = None, **options
    ) -> list[Image.Image]:
        """Options are the CLI's long names: negative, steps, guidance, sampler, schedule, width, height,
        seed, batch, clip_skip, guidance_rescale, eta, refiner_switch (with a refiner loaded)."""
        try:
            settings = Settings(prompt=prompt, **options)
        except TypeError as e:
            raise SdlabError(f"generate(): {e}") from None
        return self.run(settings.resolved(self.config), on_step)

    def run(self, settings: Settings, on_step: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        images = []
        refiner = None if self.refiner is None else self.refiner[0]
        for seed, image in self.runner.generate_images(settings, on_step, refiner):
            one = Settings.from_dict({**settings.to_dict(), "seed": seed, "batch": 1})
            image.info.update(self.metadata(one))
            images.append(image)
        return images

    def metadata(self, s: Settings) -> dict[str, str]:
        pairs = {
            "Steps": s.steps,
            "Sampler": display_name(s.sampler),
            "Schedule type": SCHEDULE_NAMES[s.schedule],
            "CFG scale": f"{s.guidance:g}",
            "Seed": s.seed,
            "Size": f"{s.width}x{s.height}",
            "Model hash": self.info.short_hash,
            "Model": self.info.name,
            "Clip skip": s.clip_skip if s.clip_skip > 1 else None,
            "CFG rescale": f"{s.guidance_rescale:g}" if s.guidance_rescale else None,
            "Eta": s.eta,
            "Refiner": None if self.refiner is None else f"{self.refiner[1].name} [{self.refiner[1].short_hash}]",
            "Refiner switch at": None if self.refiner is None else s.refiner_switch,
            "Version": f"sdlab {__version__}",
        }
        record = {
            "settings": s.to_dict(),
            "model": _identity(self.info),
            "refiner": None if self.refiner is None else _identity(self.refiner[1]),
            "dtype": formats.dtype_name(self.runner.dtype),
            "device": str(self.runner.device),
            "sdlab": __version__,
        }
        return {PARAMETERS_KEY: format_parameters(s.prompt, s.negative, pairs), RECORD_KEY: json.dumps(record)}


def _identity(info: ModelInfo) -> dict:
    return {"path": info.path, "sha256": info.sha256, "name": info.name}


def load(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    config: str | None = None,
    prediction_type: str | None = None,
    refiner: str | os.PathLike | None = None,
) -> Pipeline:
    """Load a model once: None for sdlab's default model, a diffusers folder, a single file or a repo id.
    dtype defaults to fp32 on the CPU and fp16 on CUDA. `refiner` (an SDXL refiner) takes over the
    latents at `refiner_switch` of each generation."""
    source = default_model() if model is None else model
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdlabError("device 'cuda' asked for, but PyTorch sees no CUDA GPU here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SdlabError("device 'mps' asked for, but PyTorch sees no Apple GPU here")
    dtype = formats.parse_dtype(dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    base = _runner(source, device, dtype, config=config, prediction_type=prediction_type)
    second = None
    if refiner is not None:
        second = _runner(refiner, device, dtype)
        if base[0].config.family != "sdxl" or second[0].config.family != "sdxl-refiner":
            raise SdlabError(
                f"a refiner hands off from an SDXL base to an SDXL refiner; got {base[0].config.family} "
                f"and {second[0].config.family}"
            )
    return Pipeline(*base, second)


def _runner(source, device: torch.device, dtype: torch.dtype, **options) -> tuple[Text2Image, ModelInfo]:
    comps = load_components(source, dtype=dtype, device=device, **options)
    if dtype == torch.float16 and comps.config.vae.force_upcast:
        comps.vae.float()  # the SD VAE overflows in fp16; diffusers upcasts it the same way
    return Text2Image(comps, device, dtype), model_info(Path(comps.source))


def save(images: list[Image.Image], out: str | os.PathLike, stem: str = "sdlab") -> list[Path]:
    """Write images with their metadata: `out` is a .png path (one image) or a folder (numbered files)."""
    out = Path(out)
    if out.suffix.lower() == ".png":
        if len(images) != 1:
            targets = [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
        else:
            targets = [out]
    else:
        out.mkdir(parents=True, exist_ok=True)
        start = _next_index(out)
        targets = [out / f"{start + i:05d}-{stem}.png" for i in range(len(images))]
    return [save_png(im, t, {k: v for k, v in im.info.items() if isinstance(v, str)}) for im, t in zip(images, targets)]


def _next_index(folder: Path) -> int:
    numbers = [int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    return max(numbers, default=-1) + 1


def read_record(path: str | os.PathLike) -> dict:
    """sdlab's JSON record from an image it wrote."""
    text = read_png_text(path)
    if RECORD_KEY not in text:
        raise SdlabError(f"{path}: has no sdlab record (was it made by sdlab?)")
    try:
        return json.loads(text[RECORD_KEY])
    except ValueError:
        raise SdlabError(f"{path}: its sdlab record is not valid JSON") from None
