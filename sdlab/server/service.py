"""What both HTTP APIs share: the catalog, the loaded model, the queue, the limits, and the checks that
turn a request into a job or a one-line error naming the request's field."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from PIL import Image

from sdlab.api import Pipeline
from sdlab.diffusion.samplers import resolve_sampler
from sdlab.errors import SdlabError
from sdlab.pipelines.settings import Settings
from sdlab.server.catalog import Catalog, ModelEntry, ModelHost
from sdlab.server.codec import FieldError
from sdlab.server.jobs import Job, JobQueue, fill_size

# the start of an SdlabError from Settings.resolved -> the setting it is about
_MESSAGE_FIELDS = (
    ("width", "width"), ("height", "height"), ("steps", "steps"), ("guidance rescale", "guidance_rescale"),
    ("guidance", "guidance"), ("batch", "batch"), ("clip skip", "clip_skip"), ("unknown schedule", "schedule"),
    ("unknown sampler", "sampler"), ("seed", "seed"), ("strength", "strength"), ("mask blur", "mask_blur"),
    ("unknown fill", "fill"), ("refiner switch", "refiner_switch"), ("the image is", "image"),
)  # fmt: skip


def field_of(message: str) -> str:
    """The setting an SdlabError message is about ('eta', 'width', ...), or 'settings' when it names none."""
    if "takes no eta" in message:
        return "eta"
    for start, name in _MESSAGE_FIELDS:
        if message.startswith(start):
            return name
    return "settings"


def known_sampler(name: str | None) -> str | None:
    """A request model's sampler validator: the name unchanged if sdlab knows it, else ValueError (a 422)."""
    if name is not None:
        try:
            resolve_sampler(name)
        except SdlabError as e:
            raise ValueError(str(e)) from None
    return name


def as_field_error(error: SdlabError, names: Mapping[str, str]) -> FieldError:
    """An SdlabError about a setting, renamed to the API's field (A1111 says cfg_scale for guidance)."""
    if isinstance(error, FieldError):
        return error
    setting = field_of(str(error))
    return FieldError(names.get(setting, setting), str(error))


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 2048 * 2048  # width × height of one generated image
    max_steps: int = 150
    max_batch: int = 16  # images per request (A1111: batch_size × n_iter)
    max_prompt: int = 20_000  # characters of a prompt or negative prompt

    @property
    def max_input_pixels(self) -> int:
        """Uploaded images may be larger than what is generated (they are resized), within reason."""
        return 4 * self.max_pixels


class Service:
    def __init__(self, catalog: Catalog, loader: Callable[[str], Pipeline], limits: Limits = Limits(), *,
                 queue: int = 8, keep_seconds: float = 600.0, keep_jobs: int = 100, preview_interval: float = 1.0,
                 lora_dirs: tuple[str, ...] = ()):
        self.catalog = catalog
        self.lora_dirs = lora_dirs
        self.limits = limits
        self.host = ModelHost(catalog, loader)
        self.queue = JobQueue(self.host, queue, keep_seconds=keep_seconds, keep_jobs=keep_jobs,
                              preview_interval=preview_interval)
        self.options: dict[str, object] = {"CLIP_stop_at_last_layers": 1, "token_merging_ratio": 0.0}  # A1111 options sdlab honours
        self._started = False
        self._start_lock = threading.Lock()

    def start(self) -> None:
        """Load the first model (here, before any request: a bad model fails the start) and start the worker."""
        with self._start_lock:
            if self._started:
                return
            self.host.pipeline()
            self.queue.start()
            self._started = True

    def stop(self) -> None:
        self.queue.stop()
        self.host.unload()

    def model(self, name: str, field: str) -> ModelEntry:
        entry = self.catalog.find(name)
        if entry is None:
            titles = ", ".join(self.catalog.title(e) for e in self.catalog.entries())
            raise FieldError(field, f"no model {name!r} here; choose one of: {titles}")
        return entry

    def check(self, settings: Settings, image: Image.Image | None, entry: ModelEntry | None,
              names: Mapping[str, str]) -> None:
        """Check settings before queueing them, so a mistake is a 422 now rather than a failed job: against
        the model they will run on when it has been loaded before, and against the server's limits.
        The worker checks again against the model it runs (a switch may come first)."""
        for setting in ("prompt", "negative"):
            if len(getattr(settings, setting)) > self.limits.max_prompt:
                raise FieldError(names.get(setting, setting), f"longer than {self.limits.max_prompt} characters")
        cfg = self.host.config(entry)
        if cfg is not None:
            try:
                settings = fill_size(settings, image, cfg).resolved(cfg)
            except SdlabError as e:
                raise as_field_error(e, names) from None
        self.check_limits(settings, names)

    def check_limits(self, s: Settings, names: Mapping[str, str]) -> None:
        limits = self.limits
        if s.steps is not None and s.steps > limits.max_steps:
            raise FieldError(names.get("steps", "steps"), f"{s.steps} is more than this server's limit of {limits.max_steps}")
        if s.batch > limits.max_batch:
            raise FieldError(names.get("batch", "batch"), f"{s.batch} images is more than this server's limit of "
                             f"{limits.max_batch} per request")
        if s.width is not None and s.height is not None and s.width * s.height > limits.max_pixels:
            raise FieldError(names.get("width", "width"), f"{s.width}x{s.height} is more than this server's limit "
                             f"of {limits.max_pixels} pixels (width × height)")

    def submit(self, job: Job) -> Job:
        job.check = lambda s: self.check_limits(s, {})
        return self.queue.submit(job)
