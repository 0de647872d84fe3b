"""The Python API: `sdlab.load(...)` once, then make images as often as you like.

    pipe = sdlab.load("path/to/model.safetensors")
    images = pipe.generate("a red circle on a blue background", steps=20, seed=1)
    images = pipe.img2img("in.png", "a red circle", strength=0.6)
    images = pipe.inpaint("in.png", "mask.png", "a red circle", only_masked=True)
    images = pipe.outpaint("in.png", "a red circle", extend=(64, 0, 64, 0))
    images = pipe.generate("a house", control=[sdlab.Control("canny-controlnet/", "edges.png", preprocess="canny")])
    sdlab.api.save(images, "out/")

Every image carries AUTOMATIC1111's `parameters` text and sdlab's JSON record in `image.info`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from sdlab import __version__
from sdlab.checkpoints import formats
from sdlab.checkpoints.embeddings import Embedding
from sdlab.checkpoints.load import component_weights_file, load as load_components
from sdlab.checkpoints.lora import Network
from sdlab.diffusion.samplers import display_name
from sdlab.errors import SdlabError, SdlabWarning, shorten
from sdlab.models.controlnet import ControlNet
from sdlab.models.layers import attention_slicing
from sdlab.models.offload import sequential_offload
from sdlab.models.unet import UNet
from sdlab.pipelines.edit import ControlInput, make_images
from sdlab.pipelines.images import load_image, read_png_text, save_png
from sdlab.pipelines.masks import extend_canvas
from sdlab.pipelines.memory import activation_bytes, fits, free_bytes, too_big_message
from sdlab.pipelines.metadata import PARAMETERS_KEY, RECORD_KEY, format_parameters
from sdlab.pipelines.runner import PreviewCallback, Runner
from sdlab.pipelines.networks import NETWORK_SUFFIXES, Networks, Use, find_files, install_embeddings, resolve_name
from sdlab.pipelines.networks import short_hash, used_embeddings
from sdlab.pipelines.settings import ControlSettings, Settings, as_lora
from sdlab.prompts import extract_networks

HASH_CACHE = Path(os.environ.get("SDLAB_CACHE", Path.home() / ".cache" / "sdlab")) / "hashes.json"
SCHEDULE_NAMES = {"default": None, "karras": "Karras", "exponential": "Exponential"}
FILL_NAMES = {"fill": "fill", "original": "original", "noise": "latent noise", "nothing": "latent nothing"}
ImageLike = Image.Image | str | os.PathLike


@dataclass(frozen=True)
class Control:
    """One ControlNet for a run: the network (a path or repo id), the image that steers it, and how."""

    model: str | os.PathLike
    image: ImageLike
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str = "none"  # "canny" draws edges from the image; "none" uses it as the hint
    guess_mode: bool = False

    def settings(self) -> ControlSettings:
        return ControlSettings(str(self.model), self.strength, self.start, self.end, self.preprocess, self.guess_mode)


def _image(image: ImageLike, what: str = "image") -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    raise SdlabError(f"{what} must be a PIL image or a file path, got {type(image).__name__}")


LOW_MEMORY_UNTILED_PIXELS = 512 * 512  # with low_memory, larger images decode in tiles (Settings.vae_tiling)
LOW_MEMORY_SLICE = 1024  # with low_memory, queries per attention slice (models.layers.attention_slicing)
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
    """Name and hash of a single file, or of a diffusers folder's U-Net (or its own weights: a ControlNet folder)."""
    if not source.is_dir():
        return ModelInfo(source.stem, file_sha256(source), str(source))
    folder = source / "unet" if (source / "unet").is_dir() else source
    return ModelInfo(source.name, file_sha256(component_weights_file(folder, None)), str(source))


class Pipeline:
    """A loaded model: each method returns PIL images with their metadata in `image.info`.

    Options are the CLI's long names: negative, steps, guidance, sampler, schedule, width, height, seed,
    batch, clip_skip, guidance_rescale, eta, tiling, vae_tiling, refiner_switch (with a refiner loaded); for edits
    also mask_blur, fill, only_masked, padding, composite. Width and height of an edit default to the
    image's size (rounded down to a multiple of 8)."""

    def __init__(self, runner: Runner, info: ModelInfo, refiner: tuple[Runner, ModelInfo] | None = None,
                 low_memory: bool = False, offload: bool = False, lora_dirs: Sequence[str | os.PathLike] = (),
                 fuse_lora: bool = False):
        self.runner = runner
        self.low_memory = low_memory
        self.offload = offload  # weights in host memory, visiting the device a layer at a time
        self.info = info
        self.config = runner.config
        self.refiner = refiner
        self._controlnets: dict[str, tuple[ControlNet, ModelInfo]] = {}
        self.lora_dirs = tuple(lora_dirs)
        modules = {k: v for k, v in runner.components.modules().items() if k != "vae"}
        if not isinstance(modules["unet"], UNet):  # OpenVINO's wrapper: LoRAs patch its module, run eagerly
            if fuse_lora:
                raise SdlabError("--fuse-lora changes the weights OpenVINO compiled; patch LoRAs in (the default) or "
                                 "use --backend torch")
            modules["unet"] = modules["unet"].module
        self.networks = Networks(modules, fuse=fuse_lora)
        self._loras: dict[str, tuple[Network, str]] = {}  # path -> (network, A1111 short hash)
        self.embeddings: dict[str, tuple[Embedding, str]] = {}  # name -> (embedding, short hash)

    # --- LoRA and textual inversion --------------------------------------------------------------
    def lora_names(self) -> dict[str, Path]:
        """The LoRA files of the lora dirs, by the name a `<lora:name:w>` tag uses."""
        return find_files(self.lora_dirs, NETWORK_SUFFIXES) if self.lora_dirs else {}

    def load_lora(self, path: str | os.PathLike) -> Network:
        """Read a LoRA file against this model (once; later calls reuse it); unmatched keys in `.unmatched`."""
        from sdlab.checkpoints.lora import read_network

        key = str(path)
        if key not in self._loras:
            network = read_network(path, self.networks.modules, self.config.unet, device=self.runner.device)
            if network.unmatched:
                warnings.warn(f"{path}: {len(network.unmatched)} keys match no layer of this model and are not applied "
                              f"({shorten(network.unmatched, 3)})", SdlabWarning, stacklevel=2)
            self._loras[key] = (network, short_hash(Path(path)))
        return self._loras[key][0]

    def lora_uses(self, settings: Settings) -> list[tuple[Use, str, str]]:
        """The LoRAs a run applies, (use, name, A1111 short hash): its `lora` files, then its prompt's tags."""
        _, tags = extract_networks(settings.prompt)
        known = self.lora_names() if tags else {}
        wanted = [(one.path, one.weight, one.weight) for one in settings.lora]
        wanted += [(str(resolve_name(t.name, known)), t.te_weight, t.unet_weight) for t in tags]
        uses = []
        for path, te, unet in wanted:
            network = self.load_lora(path)
            uses.append((Use(network, te, unet), network.name, self._loras[path][1]))
        return uses

    def load_embeddings(self, paths: Sequence[str | os.PathLike] = (), dirs: Sequence[str | os.PathLike] = ()) -> list[str]:
        """Textual-inversion embeddings, usable by name in prompts from now on; returns the names added."""
        from sdlab.checkpoints.embeddings import EMBEDDING_SUFFIXES, read_embedding

        files = {**(find_files(dirs, EMBEDDING_SUFFIXES) if dirs else {}), **{Path(p).stem: Path(p) for p in paths}}
        dims = [spec.encoder.hidden_size for spec in self.config.text]
        for name, path in files.items():
            self.embeddings[name] = (read_embedding(path, dims), short_hash(path))
        install_embeddings(self.runner.components.text_encoders, [e for e, _ in self.embeddings.values()])
        return list(files)

    def generate(
        self, prompt: str, *, control: Sequence[Control] = (), on_step: Callable[[int, int], None] | None = None,
        **options,
    ) -> list[Image.Image]:
        return self.run(self.settings(prompt, control, **options), on_step, control_images=_control_images(control))

    def settings(self, prompt: str, control: Sequence[Control] = (), **options) -> Settings:
        """What `generate(prompt, **options)` runs: the options checked, the model's defaults filled in."""
        return _settings(prompt, options, control).resolved(self.config)

    def decodes_in_tiles(self, settings: Settings) -> bool:
        """Whether `run` decodes these (resolved) settings' images in tiles: asked for, or large with low_memory."""
        return settings.vae_tiling or (self.low_memory and settings.width * settings.height > LOW_MEMORY_UNTILED_PIXELS)

    def img2img(
        self, image: ImageLike, prompt: str, *, strength: float = 0.75, control: Sequence[Control] = (),
        on_step: Callable[[int, int], None] | None = None, **options,
    ) -> list[Image.Image]:
        """Redraw `image` following `prompt`: strength 0 keeps it, 1 ignores it."""
        return self._edit(_image(image), None, prompt, strength, control, on_step, options)

    def inpaint(
        self, image: ImageLike, mask: ImageLike, prompt: str, *, strength: float = 1.0,
        control: Sequence[Control] = (), on_step: Callable[[int, int], None] | None = None, **options,
    ) -> list[Image.Image]:
        """Repaint where `mask` is white (same size as the image); the rest is kept."""
        return self._edit(_image(image), _image(mask, "mask"), prompt, strength, control, on_step, options)

    def outpaint(
        self, image: ImageLike, prompt: str, *, extend: tuple[int, int, int, int], fill: str = "edge",
        overlap: int = 8, strength: float = 1.0, control: Sequence[Control] = (),
        on_step: Callable[[int, int], None] | None = None, **options,
    ) -> list[Image.Image]:
        """Grow the canvas by (left, top, right, bottom) pixels (sides rounded up to multiples of 8) and paint
        the new area, starting from the edge colours ("edge"), the surrounding colours ("fill") or noise."""
        if len(extend) != 4:
            raise SdlabError(f"extend needs 4 numbers (left, top, right, bottom), got {len(extend)}")
        seed = options.get("seed")
        canvas, mask = extend_canvas(_image(image), *extend, fill=fill, seed=0 if seed is None else seed, overlap_px=overlap)
        return self._edit(canvas, mask, prompt, strength, control, on_step, options)

    def _edit(self, image, mask, prompt, strength, control, on_step, options) -> list[Image.Image]:
        settings = _settings(prompt, {**options, "strength": strength}, control)
        settings = settings.sized_for(image.size, self.config.vae.downscale).resolved(self.config)
        return self.run(settings, on_step, image=image, mask=mask, control_images=_control_images(control))

    def run(
        self, settings: Settings, on_step: Callable[[int, int], None] | None = None, *,
        image: Image.Image | None = None, mask: Image.Image | None = None,
        control_images: Sequence[Image.Image] = (), on_preview: PreviewCallback | None = None,
    ) -> list[Image.Image]:
        """Make the images of resolved `settings`; `image`/`mask` for edits, one control image per ControlNet.
        `on_step(done, total)` and `on_preview(x̂0 latents)` hear every step (`self.runner.decode` turns
        latents into a picture); an exception raised in either stops the run and propagates."""
        if settings.strength is not None and image is None:
            raise SdlabError("these settings edit an image (they have a strength); pass the image")
        if mask is not None and image is None:
            raise SdlabError("a mask needs an image to inpaint")
        if len(control_images) != len(settings.control):
            raise SdlabError(f"{len(settings.control)} ControlNets but {len(control_images)} control images")
        controls = tuple(
            ControlInput(self._controlnet(c.model), im, c) for c, im in zip(settings.control, control_images)
        )
        refiner = None if self.refiner is None else self.refiner[0]
        if self.decodes_in_tiles(settings):
            settings = replace(settings, vae_tiling=True)
        self.check_memory(settings)
        self.networks.use([use for use, _, _ in self.lora_uses(settings)])
        unets = [r.components.unet for r in (self.runner, refiner) if r is not None]
        with ExitStack() as stack:
            for unet in unets:
                stack.enter_context(attention_slicing(unet, LOW_MEMORY_SLICE, enabled=self.low_memory))
            made = make_images(self.runner, settings, on_step, refiner, image=image, mask=mask, controls=controls,
                               on_preview=on_preview)
        images = []
        for seed, result in made:
            one = Settings.from_dict({**settings.to_dict(), "seed": seed, "batch": 1})
            result.info.update(self.metadata(one, masked=mask is not None))
            images.append(result)
        return images

    def check_memory(self, settings: Settings) -> None:
        """Refuse, before any work, settings whose image would not fit the device's free memory (an estimate:
        sdlab.pipelines.memory)."""
        weight = next(self.runner.components.vae.parameters(), None)
        vae_dtype = self.runner.dtype if weight is None else weight.dtype
        needed = activation_bytes(self.config, settings, self.runner.dtype, vae_dtype, settings.vae_tiling)
        free = free_bytes(self.runner.device)
        if not fits(needed, free):
            raise SdlabError(too_big_message(settings, needed, free, settings.vae_tiling))  # type: ignore[arg-type]

    def _controlnet(self, source: str) -> ControlNet:
        """A ControlNet loaded once per pipeline, checked against the model it steers."""
        from sdlab.checkpoints.controlnet import load_controlnet

        if source not in self._controlnets:
            family = self.config.family if self.config.family in ("sd1", "sd2", "sdxl") else None
            net = load_controlnet(source, dtype=self.runner.dtype, device="cpu" if self.offload else self.runner.device,
                                  family_hint=family)
            if self.offload:
                sequential_offload(net, self.runner.device)
            check_controlnet(net, self.config, source)
            self._controlnets[source] = (net, controlnet_info(source))
        return self._controlnets[source][0]

    def metadata(self, s: Settings, masked: bool = False) -> dict[str, str]:
        loras, embeddings = self.lora_uses(s), self._used_embeddings(s)
        pairs = {
            "Steps": s.steps,
            "Sampler": display_name(s.sampler),
            "Schedule type": SCHEDULE_NAMES[s.schedule],
            "CFG scale": f"{s.guidance:g}",
            "Seed": s.seed,
            "Size": f"{s.width}x{s.height}",
            "Model hash": self.info.short_hash,
            "Model": self.info.name,
            "Denoising strength": None if s.strength is None else f"{s.strength:g}",
            "Clip skip": s.clip_skip if s.clip_skip > 1 else None,
            "Token merging ratio": f"{s.token_merging:g}" if s.token_merging else None,
            "Tiling": True if s.tiling else None,
            "Tiled VAE": True if s.vae_tiling else None,
            "CFG end": f"{s.cfg_end:g}" if s.cfg_end < 1 else None,
            "Mask blur": s.mask_blur if masked else None,
            "Masked content": FILL_NAMES[s.fill] if masked else None,
            "Inpaint area": "Only masked" if masked and s.only_masked else None,
            "Masked area padding": s.padding if masked and s.only_masked else None,
            "CFG rescale": f"{s.guidance_rescale:g}" if s.guidance_rescale else None,
            "Eta": s.eta,
            **{f"ControlNet {i}": self._control_text(c) for i, c in enumerate(s.control)},
            "Lora hashes": ", ".join(f"{name}: {h}" for _, name, h in loras) or None,
            "TI hashes": ", ".join(f"{n}: {self.embeddings[n][1]}" for n in embeddings) or None,
            "Refiner": None if self.refiner is None else f"{self.refiner[1].name} [{self.refiner[1].short_hash}]",
            "Refiner switch at": None if self.refiner is None else s.refiner_switch,
            "Version": f"sdlab {__version__}",
        }
        record = {
            "settings": s.to_dict(),
            "model": _identity(self.info),
            "refiner": None if self.refiner is None else _identity(self.refiner[1]),
            "controlnets": [_identity(self._controlnets[c.model][1]) for c in s.control if c.model in self._controlnets],
            "loras": [{"path": u.network.source, "name": name, "hash": h, "te": u.te_weight, "unet": u.unet_weight}
                      for u, name, h in loras],
            "embeddings": [{"name": n, "path": self.embeddings[n][0].source, "hash": self.embeddings[n][1]}
                           for n in embeddings],
            "dtype": formats.dtype_name(self.runner.dtype),
            "device": str(self.runner.device),
            "sdlab": __version__,
        }
        return {PARAMETERS_KEY: format_parameters(s.prompt, s.negative, pairs), RECORD_KEY: json.dumps(record)}

    def _used_embeddings(self, s: Settings) -> list[str]:
        return used_embeddings(f"{s.prompt}\n{s.negative}", list(self.embeddings))

    def _control_text(self, c: ControlSettings) -> str:
        """As the sd-webui-controlnet extension writes its units (one quoted value)."""
        info = self._controlnets.get(c.model, (None, None))[1]
        name = Path(c.model).stem if info is None else f"{info.name} [{info.short_hash}]"
        mode = "My prompt is more important" if c.guess_mode else "Balanced"
        return (f"Module: {c.preprocess}, Model: {name}, Weight: {c.strength:g}, Guidance Start: {c.start:g}, "
                f"Guidance End: {c.end:g}, Control Mode: {mode}")


def _settings(prompt: str, options: dict, control: Sequence[Control]) -> Settings:
    options = dict(options)
    if "lora" in options:
        options["lora"] = tuple(as_lora(x) for x in options["lora"])
    try:
        return Settings(prompt=prompt, control=tuple(c.settings() for c in control), **options)
    except TypeError as e:
        raise SdlabError(f"{e}".replace("__init__()", "option")) from None


def _control_images(control: Sequence[Control]) -> list[Image.Image]:
    return [_image(c.image, "control image") for c in control]


def check_controlnet(net: ControlNet, config, source: str) -> None:
    """A ControlNet steers only U-Nets of its own shape: same family, context width and channels."""
    ours, theirs = config.unet, net.cfg.unet
    if (theirs.cross_attention_dim, theirs.block_out_channels, theirs.addition_embed_dim) != (
        ours.cross_attention_dim, ours.block_out_channels, ours.addition_embed_dim
    ):
        raise SdlabError(
            f"{source}: a ControlNet for {net.cfg.family} models (context width {theirs.cross_attention_dim}, "
            f"channels {list(theirs.block_out_channels)}) cannot steer this {config.family} model "
            f"(context width {ours.cross_attention_dim}, channels {list(ours.block_out_channels)})"
        )


def controlnet_info(source: str) -> ModelInfo:
    path = Path(source)
    if path.exists():
        return model_info(path)
    return ModelInfo(source, "", source)  # a repo id: the loader fetched it


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
    backend: str = "auto",
    low_memory: bool = False,
    offload: bool | None = None,
    lora_dirs: Sequence[str | os.PathLike] = (),
    fuse_lora: bool = False,
    embeddings: Sequence[str | os.PathLike] = (),
    embeddings_dirs: Sequence[str | os.PathLike] = (),
) -> Pipeline:
    """Load a model once: None for sdlab's default model, a diffusers folder, a single file or a repo id.
    dtype defaults to fp32 on the CPU and fp16 on CUDA. `refiner` (an SDXL refiner) takes over the
    latents at `refiner_switch` of each generation. `backend="openvino"` runs the U-Net and the VAE
    decoder through OpenVINO on the CPU (sdlab.backends.openvino; converted once, cached on disk);
    "auto" (the default) chooses it where it is faster (`choose_backend`), else "torch". `low_memory`
    decodes images larger than 512x512 in tiles and attends in slices of queries. `offload` keeps the
    weights in host memory and moves them to `device` a layer at a time (models.offload); by default
    it is on with `low_memory` on CUDA. `lora_dirs` are searched for the LoRAs that `<lora:name:w>` tags
    name; LoRAs are patched in (forward hooks) unless `fuse_lora` adds them into the weights. `embeddings`
    (files) and `embeddings_dirs` hold textual-inversion embeddings, used by their names in prompts."""
    source = default_model() if model is None else model
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdlabError("device 'cuda' asked for, but PyTorch sees no CUDA GPU here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SdlabError("device 'mps' asked for, but PyTorch sees no Apple GPU here")
    dtype = formats.parse_dtype(dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    check_backend(backend, device, dtype)
    offload = low_memory and device.type == "cuda" if offload is None else offload
    base = _runner(source, device, dtype, backend, offload, config=config, prediction_type=prediction_type)
    second = None
    if refiner is not None:
        second = _runner(refiner, device, dtype, backend, offload)
        if base[0].config.family != "sdxl" or second[0].config.family != "sdxl-refiner":
            raise SdlabError(
                f"a refiner hands off from an SDXL base to an SDXL refiner; got {base[0].config.family} "
                f"and {second[0].config.family}"
            )
    pipe = Pipeline(*base, second, low_memory=low_memory, offload=offload, lora_dirs=lora_dirs, fuse_lora=fuse_lora)
    if embeddings or embeddings_dirs:
        pipe.load_embeddings(embeddings, embeddings_dirs)
    return pipe


BACKENDS = ("auto", "torch", "openvino")
# U-Nets at least this big run faster through OpenVINO on the CPU (SD 1.5's 860M: 2.1 s a step in bf16
# against 3.5 s eager, benchmarks/RESULTS.md); small ones, like the default model's 11M, do not repay
# the one-off conversion
OPENVINO_MIN_PARAMETERS = 200_000_000
# below this, PyTorch's plain CPU convolutions beat oneDNN's (whose set-up costs ~0.25 ms a call); SD's
# 860M-parameter U-Net keeps oneDNN
ONEDNN_MIN_PARAMETERS = 100_000_000


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def choose_backend(unet: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> str:
    """"auto": OpenVINO for a large U-Net on the CPU in fp32 or bf16, when openvino is installed; else torch."""
    if device.type != "cpu" or dtype == torch.float16:
        return "torch"
    if _parameters(unet) < OPENVINO_MIN_PARAMETERS:
        return "torch"
    from importlib.util import find_spec

    return "openvino" if find_spec("openvino") is not None else "torch"


def check_backend(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    if backend not in BACKENDS:
        raise SdlabError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "openvino":
        if device.type != "cpu":
            raise SdlabError(f"the openvino backend runs on the CPU; got device {device}")
        if dtype == torch.float16:
            raise SdlabError("the openvino backend computes in fp32 or bf16 on the CPU; choose --dtype fp32 or bf16")
        from sdlab.backends.openvino import require_openvino

        require_openvino()


def _runner(source, device: torch.device, dtype: torch.dtype, backend: str = "torch", offload: bool = False,
            **options) -> tuple[Runner, ModelInfo]:
    """The model's components on `device`; with `offload`, in host memory, each layer visiting `device` in turn."""
    comps = load_components(source, dtype=dtype, device="cpu" if offload else device, **options)
    if dtype == torch.float16 and comps.config.vae.force_upcast:
        comps.vae.float()  # the SD VAE overflows in fp16; diffusers upcasts it the same way
    if offload:
        for module in comps.modules().values():
            sequential_offload(module, device)
        backend = "torch"  # the layers visit the device eagerly; OpenVINO would hold its own copy
    if backend == "auto":
        backend = choose_backend(comps.unet, device, dtype)
    if backend == "openvino":
        from sdlab.backends.openvino import OpenVINODecoder, OpenVINOUNet

        def reload(part: str):  # the weights again, for an eager call after OpenVINO took over (ControlNet, tiling)
            return lambda: getattr(load_components(source, dtype=dtype, device=device, **options), part).state_dict()

        comps.unet = OpenVINOUNet(comps.unet, reload=reload("unet"))
        comps.vae = OpenVINODecoder(comps.vae, reload=reload("vae"))
    elif device.type == "cpu":
        # oneDNN's convolutions run faster on NHWC: the SD 1.5 U-Net step at 512² in bf16 took 3.23 s
        # instead of 3.64 s here; the same numbers up to rounding
        comps.unet.to(memory_format=torch.channels_last)
    # the default model's guided step took 42 ms without oneDNN and 50 ms with it (2 cores, fp32, interleaved runs)
    plain_convolutions = (device.type == "cpu" and dtype == torch.float32 and backend == "torch"
                          and _parameters(comps.unet) < ONEDNN_MIN_PARAMETERS)
    return Runner(comps, device, dtype, onednn=not plain_convolutions), model_info(Path(comps.source))


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
