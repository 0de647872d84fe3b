"""Parameter tables: counts per component and per U-Net block, memory per dtype, latent shape.

Counts are measured on the built modules (on the meta device for presets, so even SDXL is
instant), never estimated.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sdlab.config import ModelConfig
from sdlab.models.clip import CLIPTextModel
from sdlab.models.empty import empty_modules
from sdlab.models.unet import UNet, unet_block_groups
from sdlab.models.vae import AutoencoderKL

BYTES = {"fp32": 4, "fp16": 2}


@dataclass(frozen=True)
class Row:
    name: str
    params: int

    def memory(self, dtype: str) -> int:
        return self.params * BYTES[dtype]


@dataclass(frozen=True)
class ParameterReport:
    model: str
    components: tuple[Row, ...]
    unet_blocks: tuple[Row, ...]
    latent_shape: tuple[int, int, int, int]
    image_size: tuple[int, int]

    @property
    def total(self) -> int:
        return sum(r.params for r in self.components if "." not in r.name)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "total_params": self.total,
            "memory_bytes": {d: self.total * b for d, b in BYTES.items()},
            "components": {r.name: r.params for r in self.components},
            "unet_blocks": {r.name: r.params for r in self.unet_blocks},
            "image_size": list(self.image_size),
            "latent_shape": list(self.latent_shape),
        }


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_on_meta(cfg: ModelConfig) -> dict[str, nn.Module]:
    with empty_modules():
        modules: dict[str, nn.Module] = {"unet": UNet(cfg.unet), "vae": AutoencoderKL(cfg.vae)}
        for i, spec in enumerate(cfg.text):
            modules[f"text_encoder{'' if i == 0 else f'_{i + 1}'}"] = CLIPTextModel(spec.encoder)
    return modules


def unet_block_rows(unet: UNet, cfg: ModelConfig) -> tuple[Row, ...]:
    sizes = {k: v.numel() for k, v in unet.state_dict().items()}
    rows = []
    for name, prefixes in unet_block_groups(cfg.unet).items():
        rows.append(Row(name, sum(n for k, n in sizes.items() if any(k.startswith(p) for p in prefixes))))
    return tuple(rows)


def parameter_report(
    cfg: ModelConfig, modules: dict[str, nn.Module], name: str, size: tuple[int, int] | None = None
) -> ParameterReport:
    """`modules` as from `build_on_meta` or `Components.modules()`; `size` is (width, height) in pixels."""
    rows = []
    for key, module in modules.items():
        rows.append(Row(key, count(module)))
        if isinstance(module, AutoencoderKL):
            rows += [Row(f"{key}.encoder", count(module.encoder)), Row(f"{key}.decoder", count(module.decoder))]
    width, height = size or (cfg.default_size, cfg.default_size)
    f = cfg.vae.downscale
    latent = (1, cfg.vae.latent_channels, height // f, width // f)
    return ParameterReport(name, tuple(rows), unet_block_rows(modules["unet"], cfg), latent, (width, height))


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_report(r: ParameterReport) -> str:
    lines = [f"{r.model}", f"{'component':<24}{'parameters':>16}{'fp32':>16}{'fp16':>16}"]
    for row in (*r.components, Row("total", r.total)):
        lines.append(f"{row.name:<24}{row.params:>16,}{_mib(row.memory('fp32')):>16}{_mib(row.memory('fp16')):>16}")
    lines += ["", f"{'U-Net block':<24}{'parameters':>16}{'share':>16}"]
    unet_total = sum(b.params for b in r.unet_blocks)
    for row in r.unet_blocks:
        lines.append(f"{row.name:<24}{row.params:>16,}{row.params / max(unet_total, 1):>16.1%}")
    w, h = r.image_size
    lines += ["", f"image {w}x{h} -> latent {tuple(r.latent_shape)}"]
    return "\n".join(lines)
