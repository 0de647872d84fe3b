"""The models a server may load, named as AUTOMATIC1111 names them. A client picks a model by name or
hash from this list, never by path: the server reads only what its operator gave it."""

from __future__ import annotations

import gc
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sdlab.api import ModelInfo, Pipeline, default_model, model_info
from sdlab.config import ModelConfig
from sdlab.errors import SdlabError

MODEL_SUFFIXES = (".safetensors", ".ckpt")
_TITLE = re.compile(r"(.+?) \[[0-9a-fA-F]{8,64}\]")  # A1111's checkpoint title: "name.safetensors [0123456789]"


@dataclass(frozen=True)
class ModelEntry:
    name: str  # A1111's model_name: the file's stem or the folder's name
    filename: str  # the name in the models folder, as A1111's title writes it
    source: str  # what sdlab.load takes: a path, or a repo id for a single --model


def _is_model(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return (path / "model_index.json").is_file() or (path / "unet").is_dir()
    return path.suffix.lower() in MODEL_SUFFIXES


def _entry(path: Path) -> ModelEntry:
    return ModelEntry(path.name if path.is_dir() else path.stem, path.name, str(path))


class Catalog:
    """Either one model (--model, or sdlab's default) or every model file and diffusers folder in --models-dir."""

    def __init__(self, models_dir: str | Path | None = None, model: str | None = None):
        self.models_dir = None if models_dir is None else Path(models_dir)
        self._infos: dict[str, ModelInfo] = {}  # by source
        self._lock = threading.Lock()
        if self.models_dir is None:
            source = str(default_model()) if model is None else model
            path = Path(source)
            self._single = _entry(path) if path.exists() else ModelEntry(source, source, source)
            self.initial = self._single
            return
        if not self.models_dir.is_dir():
            raise SdlabError(f"--models-dir {self.models_dir}: not a folder")
        if not self.entries():
            raise SdlabError(f"--models-dir {self.models_dir}: no models (.safetensors, .ckpt or diffusers folders)")
        self.initial = self.entries()[0] if model is None else self.find(model)
        if self.initial is None:
            raise SdlabError(f"--model {model!r}: not in {self.models_dir}; name one of its models")

    def entries(self) -> list[ModelEntry]:
        """The models now in the folder (scanned on each call, so new files appear without a restart)."""
        if self.models_dir is None:
            return [self._single]
        return [_entry(p) for p in sorted(self.models_dir.iterdir(), key=lambda p: p.name.lower()) if _is_model(p)]

    def info(self, entry: ModelEntry) -> ModelInfo | None:
        """Name and hashes; None for a repo id not loaded yet (its files are not local)."""
        with self._lock:
            if entry.source not in self._infos and Path(entry.source).exists():
                try:
                    self._infos[entry.source] = model_info(Path(entry.source))
                except (OSError, SdlabError):
                    return None  # a half-copied file: listed without hashes until it is readable
            return self._infos.get(entry.source)

    def remember(self, entry: ModelEntry, info: ModelInfo) -> None:
        with self._lock:
            self._infos[entry.source] = info

    def title(self, entry: ModelEntry) -> str:
        """A1111's checkpoint title: `name.safetensors [0123456789]`."""
        info = self.info(entry)
        return entry.filename if info is None else f"{entry.filename} [{info.short_hash}]"

    def find(self, name: str) -> ModelEntry | None:
        """The model a client names: its title (`name.safetensors [hash]`), file name, model name, short
        hash or SHA-256. Names are matched first: hashing a big file the first time takes seconds."""
        wanted = name.strip()
        titled = _TITLE.fullmatch(wanted)
        base = titled.group(1) if titled else wanted
        entries = self.entries()
        for entry in entries:
            if base in (entry.filename, entry.name):
                return entry
        for entry in entries:
            info = self.info(entry)
            if info is not None and wanted.lower() in (info.short_hash, info.sha256):
                return entry
        return None


class ModelHost:
    """The one loaded model. Only the worker thread calls `pipeline`, so a load never overlaps a job."""

    def __init__(self, catalog: Catalog, loader: Callable[[str], Pipeline]):
        self.catalog = catalog
        self.loader = loader
        self.selected = catalog.initial  # A1111's sd_model_checkpoint: what jobs naming no model use
        self.loaded: tuple[ModelEntry, Pipeline] | None = None
        self.configs: dict[str, ModelConfig] = {}  # by source, once a model has been loaded

    def pipeline(self, entry: ModelEntry | None = None) -> tuple[ModelEntry, Pipeline]:
        entry = entry or self.selected
        if self.loaded is not None and self.loaded[0] == entry:
            return self.loaded
        self.unload()  # before loading the next: two big models may not fit side by side
        pipe = self.loader(entry.source)
        self.loaded = (entry, pipe)
        self.configs[entry.source] = pipe.config
        self.catalog.remember(entry, pipe.info)
        return self.loaded

    def config(self, entry: ModelEntry | None = None) -> ModelConfig | None:
        return self.configs.get((entry or self.selected).source)

    def unload(self) -> None:
        if self.loaded is None:
            return
        self.loaded = None
        gc.collect()
        _empty_device_cache()


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
