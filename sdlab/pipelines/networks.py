"""LoRA networks and textual-inversion embeddings on a loaded model, switched as each run asks.

A run asks for a set of LoRAs, each with a text-encoder and a U-Net weight (from `--lora PATH:W` and
from `<lora:name:w>` tags in its prompt). `Networks.use` makes the model carry exactly that set, doing
nothing when it already does: by patching (forward hooks; the weights untouched) or, with `fuse`, by
adding the updates into the weights after keeping the originals, which `clear` puts back bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from sdlab.checkpoints.embeddings import Embedding
from sdlab.checkpoints.lora import UNET, Network
from sdlab.errors import SdlabError
from sdlab.models import lora
from sdlab.models.clip import CLIPTextModel

NETWORK_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


@dataclass(frozen=True)
class Use:
    """One LoRA in a run."""

    network: Network
    te_weight: float = 1.0
    unet_weight: float = 1.0


class Networks:
    """The LoRAs applied to one model's modules ({"unet": …, "text_encoder": …})."""

    def __init__(self, modules: Mapping[str, nn.Module], fuse: bool = False):
        self.modules = dict(modules)
        self.fuse = fuse
        self.current: tuple[tuple[str, float, float], ...] = ()
        self._handles: list = []
        self._fused: dict[str, lora.Fused] = {}

    def use(self, wanted: Sequence[Use]) -> None:
        key = tuple((u.network.source, u.te_weight, u.unet_weight) for u in wanted)
        if key == self.current:
            return
        self.clear()
        for u in wanted:
            for component, updates in u.network.updates.items():
                weight = u.unet_weight if component == UNET else u.te_weight
                if weight == 0 or component not in self.modules:
                    continue
                root = self.modules[component]
                if self.fuse:
                    self._fused[component] = lora.fuse(root, updates, weight, self._fused.get(component))
                else:
                    self._handles += lora.patch(root, updates, weight)
        self.current = key

    def clear(self) -> None:
        """The model as loaded: hooks removed, fused weights restored exactly."""
        lora.remove(self._handles)
        self._handles = []
        for component, fused in self._fused.items():
            lora.restore(self.modules[component], fused)
        self._fused = {}
        self.current = ()


# --- finding networks by name -------------------------------------------------------------------
def find_files(folders: Sequence[str | os.PathLike], suffixes: Sequence[str]) -> dict[str, Path]:
    """Files under `folders` (recursively) by name (stem); the first folder wins a name."""
    found: dict[str, Path] = {}
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            raise SdlabError(f"{root}: no such folder")
        for p in sorted(root.rglob("*")):
            if p.suffix in suffixes and p.is_file():
                found.setdefault(p.stem, p)
    return found


def resolve_name(name: str, known: Mapping[str, Path], what: str = "LoRA") -> Path:
    if name in known:
        return known[name]
    hint = f"known: {', '.join(sorted(known)[:8])}" if known else "none found; pass --lora-dir"
    raise SdlabError(f"{what} {name!r} not found ({hint})")


def short_hash(path: Path) -> str:
    """AUTOMATIC1111's network hash: SHA-256 of a .safetensors file's data after its header (kohya's
    "addnet" hash), of the whole file otherwise; the first 12 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            header = int.from_bytes(f.read(8), "little")
            f.seek(8 + header)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


# --- textual inversion --------------------------------------------------------------------------
def install_embeddings(encoders: Sequence[CLIPTextModel], embeddings: Sequence[Embedding]) -> None:
    """Give each text encoder the extra token rows of `embeddings` (replacing any before)."""
    for i, encoder in enumerate(encoders):
        encoder.text_model.embeddings.set_extra_tokens({e.name: e.vectors[i] for e in embeddings})


def used_embeddings(prompt: str, names: Sequence[str]) -> list[str]:
    """The embedding names a prompt mentions as words of their own."""
    return [n for n in names if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", prompt)]
