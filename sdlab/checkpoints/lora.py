"""LoRA files as people download them -> per-layer updates (models/lora.py) of a loaded model.

Layouts read (one file may mix them; each key is classified on its own):

    kohya-ss / AUTOMATIC1111   lora_unet_<layer>.lora_down.weight, .lora_up.weight, .alpha
                               lora_te_ / lora_te1_ (first text encoder), lora_te2_ (SDXL's second)
                               <layer> is a module path with "_" for ".", in diffusers' U-Net names
                               (SD1/SD2 files) or the original ldm names (SDXL files): both are known.
    LyCORIS                    the same prefixes with .lora_mid (LoCon's Tucker core), .hada_w1_a … (LoHa),
                               .lokr_w1 … (LoKr), .diff (full)
    diffusers / PEFT           unet.<layer>.lora_A.weight, .lora_B.weight (+ optional <layer>.alpha);
                               text_encoder. / text_encoder_2.; rank and alpha from the safetensors metadata
                               `lora_adapter_metadata` when present (else scale 1, as diffusers does)
    old diffusers              <layer>.processor.to_q_lora.down.weight, …lora_linear_layer.up.weight

The scale of a LoRA-like update is alpha / rank (alpha absent: 1). Keys that match no layer are kept in
`Network.unmatched` and reported; a file in which nothing matches, a DoRA file, or an update whose size
does not fit its layer is refused with one line.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from sdlab.checkpoints import formats
from sdlab.checkpoints.keymaps.unet import unet_key_pairs
from sdlab.config import UNetConfig
from sdlab.errors import CheckpointError, shorten
from sdlab.models.lora import Full, Hadamard, Kronecker, LowRank, Update

UNET, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "text_encoder", "text_encoder_2"
KOHYA_PREFIXES = {"lora_unet_": UNET, "lora_te1_": TEXT_ENCODER, "lora_te2_": TEXT_ENCODER_2, "lora_te_": TEXT_ENCODER}
PEFT_COMPONENTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig per component, as JSON
_UNET_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.")

# the old diffusers attention-processor names -> PEFT's
_OLD_DIFFUSERS = [
    (".processor.", "."),
    ("to_out_lora.", "to_out.0.lora."),
    ("_lora.", ".lora."),
    (".lora_linear_layer.", ".lora."),
    (".lora.down.", ".lora_A."),
    (".lora.up.", ".lora_B."),
]
_PEFT_LEAVES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", "alpha": "alpha",
                "lora_magnitude_vector": "dora_scale"}
_LEAF = re.compile(r"\.(lora_[AB]\.weight|alpha|lora_magnitude_vector)$")


@dataclass
class Network:
    """A LoRA file read against one model: updates per component ("unet", "text_encoder", …) and layer."""

    name: str
    source: str
    updates: dict[str, dict[str, Update]]
    unmatched: list[str] = field(default_factory=list)

    def count(self) -> int:
        return sum(len(u) for u in self.updates.values())


# --- which names a file may use for each of our layers --------------------------------------------
def layer_aliases(modules: Mapping[str, nn.Module], unet_cfg: UNetConfig) -> dict[str, dict[str, str]]:
    """component -> {name a file may use: our module path}, for every Linear and Conv2d layer.

    Each layer answers to its own path with "." or "_" between parts; U-Net layers also to their
    diffusers paths (through the U-Net key map)."""
    aliases: dict[str, dict[str, str]] = {}
    for component, module in modules.items():
        names = {n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        table = {}
        for name in names:
            # transformers >= 5.6 saves CLIP text layers without their `text_model.` prefix
            for alias in (name, name.removeprefix("text_model.")):
                table[alias] = table[alias.replace(".", "_")] = name
        if component == UNET:
            for ours, theirs in unet_key_pairs(unet_cfg):
                layer = ours.removesuffix(".weight")
                if ours.endswith(".weight") and layer in names:
                    theirs = theirs.removesuffix(".weight")
                    table[theirs] = table[theirs.replace(".", "_")] = layer
        aliases[component] = table
    return aliases


# --- classifying keys ------------------------------------------------------------------------------
def _kohya(key: str) -> tuple[str, str, str] | None:
    """lora_unet_a_b.lora_down.weight -> ("unet", "a_b", "lora_down.weight")."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix) and "." in key:
            base, leaf = key[len(prefix):].split(".", 1)
            return component, base, leaf
    return None


def _peft(key: str) -> tuple[str, str, str] | None:
    """unet.a.b.lora_A.weight -> ("unet", "a.b", "lora_down.weight"); old diffusers names translated first."""
    for old, new in _OLD_DIFFUSERS:
        key = key.replace(old, new)
    m = _LEAF.search(key)
    if m is None:
        return None
    path = key[: m.start()]
    head = path.split(".", 1)[0]
    if head in PEFT_COMPONENTS and "." in path:
        component, path = path.split(".", 1)
    elif path.startswith(_UNET_BLOCKS):  # the oldest files name the U-Net's layers without a prefix
        component = UNET
    else:
        return None
    return component, path, _PEFT_LEAVES[m.group(1)]


Leaves = dict[str, tuple[str, Tensor]]  # leaf ("lora_down.weight", "alpha", …) -> (the file's key, tensor)


def _group(state: Mapping[str, Tensor]) -> tuple[dict[tuple[str, str], Leaves], list[str]]:
    """Keys grouped by (component, the file's name for the layer); and the keys no layout explains."""
    groups: dict[tuple[str, str], Leaves] = defaultdict(dict)
    unknown = []
    for key, tensor in state.items():
        parsed = _kohya(key) or _peft(key)
        if parsed is None:
            unknown.append(key)
            continue
        component, layer, leaf = parsed
        groups[(component, layer)][leaf] = (key, tensor)
    return dict(groups), unknown


# --- one layer's tensors -> an update ---------------------------------------------------------------
def _scale(alpha: Tensor | None, rank: int | None, fallback: float | None) -> float:
    if alpha is not None and rank:
        return float(alpha) / rank
    return 1.0 if fallback is None else fallback


def make_update(leaves: Mapping[str, Tensor], what: str, scale: float | None = None) -> tuple[Update, set[str]]:
    """The update a layer's leaves describe, and the leaves it used. `scale` (from metadata) applies when
    the leaves carry no alpha."""
    alpha = leaves.get("alpha")
    if alpha is not None and alpha.numel() != 1:
        raise CheckpointError(f"{what}: its alpha holds {alpha.numel()} values, not one")
    if "dora_scale" in leaves:
        raise CheckpointError(f"{what}: a DoRA update (dora_scale / lora_magnitude_vector); sdlab does not apply DoRA")
    if "lora_down.weight" in leaves and "lora_up.weight" in leaves:
        down, up, mid = leaves["lora_down.weight"], leaves["lora_up.weight"], leaves.get("lora_mid.weight")
        if up.dim() < 2 or down.dim() < 2 or up.shape[1] != down.shape[0]:
            raise CheckpointError(f"{what}: lora_up {tuple(up.shape)} does not follow lora_down {tuple(down.shape)}")
        used = {"lora_down.weight", "lora_up.weight", "alpha", "lora_mid.weight"}
        return LowRank(_scale(alpha, down.shape[0], scale), down, up, mid), used
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= leaves.keys():
        g = leaves.get
        update = Hadamard(_scale(alpha, g("hada_w1_b").shape[0], scale), g("hada_w1_a"), g("hada_w1_b"),
                          g("hada_w2_a"), g("hada_w2_b"), g("hada_t1"), g("hada_t2"))
        return update, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"}
    has_w1 = "lokr_w1" in leaves or {"lokr_w1_a", "lokr_w1_b"} <= leaves.keys()
    has_w2 = "lokr_w2" in leaves or {"lokr_w2_a", "lokr_w2_b"} <= leaves.keys()
    if has_w1 and has_w2:
        g = leaves.get
        factored = g("lokr_w1_b") if g("lokr_w1_b") is not None else g("lokr_w2_b")
        rank = None if factored is None else factored.shape[0]  # alpha scales only a factored LoKr
        update = Kronecker(_scale(alpha, rank, scale if rank else None), g("lokr_w1"), g("lokr_w1_a"),
                           g("lokr_w1_b"), g("lokr_w2"), g("lokr_w2_a"), g("lokr_w2_b"), g("lokr_t2"))
        return update, {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}
    if "diff" in leaves:
        return Full(1.0, leaves["diff"]), {"diff"}
    raise CheckpointError(f"{what}: no update sdlab knows in its keys ({shorten(sorted(leaves))})")


# --- diffusers' adapter metadata ----------------------------------------------------------------------
def _metadata_scales(extras: Mapping[str, str], source: str) -> dict[str, dict]:
    """component -> its LoraConfig fields (r, lora_alpha, rank_pattern, alpha_pattern, use_rslora)."""
    raw = extras.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{source}: unreadable '{METADATA_KEY}' metadata (not JSON)") from None
    if not isinstance(flat, dict):
        raise CheckpointError(f"{source}: its '{METADATA_KEY}' metadata is not a JSON object")
    per: dict[str, dict] = defaultdict(dict)
    for key, value in flat.items():
        component, _, name = key.partition(".")
        per[component][name] = value
    return dict(per)


def _pattern_value(pattern: Mapping[str, float], path: str) -> float | None:
    """PEFT's rank/alpha patterns: a key (a regular expression, or a name when it is not one) matches a
    module path that ends with it."""
    for key, value in pattern.items():
        try:
            hit = re.fullmatch(rf"(.*\.)?{key}", path) is not None
        except re.error:
            hit = path == key or path.endswith("." + key)
        if hit:
            return value
    return None


def _metadata_scale(config: Mapping | None, path: str) -> float | None:
    if not config or "lora_alpha" not in config or "r" not in config:
        return None
    if config.get("use_dora"):
        raise CheckpointError("a DoRA adapter (use_dora in its metadata); sdlab does not apply DoRA")
    rank = _pattern_value(config.get("rank_pattern") or {}, path) or config["r"]
    alpha = _pattern_value(config.get("alpha_pattern") or {}, path) or config["lora_alpha"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (rank, alpha)) or rank <= 0:
        raise CheckpointError(f"a LoRA rank {rank!r} and alpha {alpha!r} in its metadata: not positive numbers")
    return alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank


# --- reading a file ----------------------------------------------------------------------------------
def read_network(
    path: str | Path,
    modules: Mapping[str, nn.Module],
    unet_cfg: UNetConfig,
    *,
    device: torch.device | str = "cpu",
) -> Network:
    """Read a LoRA/LyCORIS file against a loaded model's modules ({"unet": …, "text_encoder": …});
    every update checked against its layer's weight shape; tensors kept in float32 on `device`."""
    path = Path(path)
    source = str(path)
    state, extras = formats.read_weights(path, dtype=torch.float32, device=device)
    if not state:
        raise CheckpointError(f"{source}: holds no tensors")
    aliases = layer_aliases(modules, unet_cfg)
    configs = _metadata_scales(extras, source) if isinstance(extras, Mapping) else {}
    groups, unmatched = _group(state)
    updates: dict[str, dict[str, Update]] = defaultdict(dict)
    for (component, name), leaves in groups.items():
        keys = [key for key, _ in leaves.values()]
        layer = aliases.get(component, {}).get(name)
        if layer is None:
            unmatched += keys
            continue
        what = f"{source}: {keys[0]}"
        tensors = {leaf: t for leaf, (_, t) in leaves.items()}
        update, used = make_update(tensors, what, _metadata_scale(configs.get(component), name))
        weight = modules[component].get_submodule(layer).weight
        try:
            update.delta(weight.shape)
        except (ValueError, RuntimeError):
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items() if v.dim())
            raise CheckpointError(
                f"{what}: its update ({shapes}) does not fit {component} layer {layer} {tuple(weight.shape)}; "
                "is this LoRA for another model family?"
            ) from None
        if layer in updates[component]:
            raise CheckpointError(f"{what}: a second update for {component} layer {layer} (under another name)")
        updates[component][layer] = update
        unmatched += [key for leaf, (key, _) in leaves.items() if leaf not in used]
    if not updates:
        raise CheckpointError(
            f"{source}: none of its {len(state)} keys names a layer of this model ({shorten(sorted(state), 3)}); "
            "is it a LoRA for another model family, or not a LoRA?"
        )
    return Network(path.stem, source, dict(updates), sorted(unmatched))


# --- writing ------------------------------------------------------------------------------------------
LAYOUTS = ("kohya", "diffusers")


def _unet_names(unet_cfg: UNetConfig) -> dict[str, str]:
    """Our U-Net layer path -> diffusers' layer path."""
    return {o.removesuffix(".weight"): t.removesuffix(".weight") for o, t in unet_key_pairs(unet_cfg) if o.endswith(".weight")}


def _low_rank(updates: Mapping[str, Mapping[str, Update]]) -> None:
    for component, layers in updates.items():
        for layer, update in layers.items():
            if not isinstance(update, LowRank) or update.mid is not None:
                raise CheckpointError(f"{component} {layer}: only plain LoRA updates (up · down) can be written")


def kohya_state(updates: Mapping[str, Mapping[str, Update]], unet_cfg: UNetConfig, sdxl: bool) -> dict[str, Tensor]:
    """kohya-ss keys, as sd-scripts writes them: U-Net layers under diffusers' names for SD1/SD2 and the ldm
    names for SDXL; lora_te_ (one text encoder) or lora_te1_/lora_te2_; alpha = scale · rank."""
    _low_rank(updates)
    diffusers_names = _unet_names(unet_cfg)
    text_prefix = {TEXT_ENCODER: "lora_te1_" if sdxl else "lora_te_", TEXT_ENCODER_2: "lora_te2_"}
    state: dict[str, Tensor] = {}
    for component, layers in updates.items():
        for layer, u in layers.items():
            if component == UNET:
                base = "lora_unet_" + (layer if sdxl else diffusers_names[layer]).replace(".", "_")
            else:
                base = text_prefix[component] + layer.replace(".", "_")
            state[f"{base}.lora_down.weight"] = u.down.detach()
            state[f"{base}.lora_up.weight"] = u.up.detach()
            state[f"{base}.alpha"] = torch.tensor(u.scale * u.rank, dtype=torch.float32)
    return state


def diffusers_state(updates: Mapping[str, Mapping[str, Update]], unet_cfg: UNetConfig) -> tuple[dict[str, Tensor], dict]:
    """diffusers / PEFT keys (`unet.<diffusers layer>.lora_A.weight` …) and the LoraConfig metadata per
    component that `load_lora_weights` reads (rank, alpha and the target layers)."""
    _low_rank(updates)
    diffusers_names = _unet_names(unet_cfg)
    state: dict[str, Tensor] = {}
    metadata: dict[str, object] = {}
    for component, layers in updates.items():
        targets, ranks, alphas = [], {}, {}
        for layer, u in layers.items():
            name = diffusers_names[layer] if component == UNET else layer
            state[f"{component}.{name}.lora_A.weight"] = u.down.detach()
            state[f"{component}.{name}.lora_B.weight"] = u.up.detach()
            # PEFT matches targets as name suffixes: without `text_model.` they also name the layers of
            # transformers >= 5.6, whose CLIP text models have no such level
            target = name.removeprefix("text_model.")
            targets.append(target)
            ranks[target], alphas[target] = u.rank, u.scale * u.rank
        if not targets:
            continue
        rank = max(set(ranks.values()), key=list(ranks.values()).count)  # the commonest; the others as patterns
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        metadata.update({
            f"{component}.r": rank,
            f"{component}.lora_alpha": alpha,
            f"{component}.target_modules": sorted(targets),
            f"{component}.rank_pattern": {n: r for n, r in ranks.items() if r != rank},
            f"{component}.alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
        })
    return state, metadata


def write_lora(path: str | Path, updates: Mapping[str, Mapping[str, Update]], unet_cfg: UNetConfig, *, sdxl: bool,
               layout: str = "kohya", metadata: Mapping[str, str] | None = None) -> Path:
    """Write trained LoRA updates as .safetensors in kohya's layout or diffusers'; `metadata` (strings) is
    kept in the header beside what the layout needs."""
    path = Path(path)
    header = dict(metadata or {})
    if layout == "kohya":
        state = kohya_state(updates, unet_cfg, sdxl)
    elif layout == "diffusers":
        state, config = diffusers_state(updates, unet_cfg)
        header[METADATA_KEY] = json.dumps(config, sort_keys=True)
        header["format"] = "pt"
    else:
        raise CheckpointError(f"unknown LoRA layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    formats.write_safetensors(path, {k: v.float().cpu() for k, v in state.items()}, header)
    return path
