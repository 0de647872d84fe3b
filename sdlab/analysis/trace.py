"""Shape traces and FLOP counts: every tensor of one real generation, stage by stage, and what each
U-Net block computes.

    prompt --tokenizer--> ids (n, L) --text encoders--> context (2, L·n, ΣD) [, SDXL y (2, adm)]
    seed --> x_T (1, C, H/f, W/f) --sampler: U-Net on (2, C, H/f, W/f) per call--> latents (1, C, H/f, W/f)
    latents --VAE decoder--> image (1, 3, H, W)
    (classifier-free guidance batches [negative, positive]: the U-Net sees 2 where the sampler has 1)

Shapes are read off the tensors with forward hooks; the U-Net's rows are its first call of the run.
FLOPs are counted from each layer's type and the shapes it saw, as torch.utils.flop_counter counts
them: a multiply-add is 2 FLOPs; convolutions, linear layers and attention's two products (q·kᵀ and
softmax·v) count, while biases, norms, activations and the softmax are free. FlopCounterMode counts
attention this way on CUDA and on the meta device, but it has no formula for PyTorch's CPU kernel
(`_scaled_dot_product_flash_attention_for_cpu`) and reports 0 for it; the count here is the same on
every device. `trace_unet` traces a preset's U-Net on the meta device: any size, no weights.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sdlab.analysis.params import count
from sdlab.config import ModelConfig
from sdlab.errors import SdlabError
from sdlab.models.clip import CLIPTextModel
from sdlab.models.empty import empty_modules
from sdlab.models.layers import Attention, SpatialTransformer
from sdlab.models.unet import UNet, unet_block_groups
from sdlab.models.vae import AutoencoderKL
from sdlab.pipelines.runner import Inputs, Runner
from sdlab.pipelines.settings import Settings

CFG_BATCH = 2  # a guided step runs the negative and the positive prompt as one batch


# --- FLOPs of one layer call, from its shapes (a multiply-add = 2) --------------------------------
def conv2d_flops(conv: nn.Conv2d, out: Tensor) -> int:
    """Each output element is a dot product over (C_in / groups) · kh · kw inputs; the bias is free."""
    kh, kw = conv.kernel_size
    return 2 * out.numel() * (conv.in_channels // conv.groups) * kh * kw


def linear_flops(linear: nn.Linear, x: Tensor) -> int:
    """x (..., in) @ W (in, out): 2 · in · out per input row; the bias is free."""
    return 2 * x.numel() * linear.out_features


def attention_flops(batch: int, queries: int, keys: int, inner: int) -> int:
    """softmax(q kᵀ) v over all heads: q kᵀ is (N, d)·(d, L) and softmax·v is (N, L)·(L, d) per head,
    so 2·N·L·d each; with d summed over heads, `inner` = heads · head_dim."""
    return 2 * (2 * batch * queries * keys * inner)


# --- the report --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One tensor of the run."""

    stage: str  # "text", "latents", "unet", "vae"
    name: str
    shape: tuple[int, ...]
    dtype: str
    input_shape: tuple[int, ...] | None = None  # U-Net blocks: what went in (an output block: h ++ its skip)
    layers: str = ""  # U-Net blocks: their layers, e.g. "ResBlock, SpatialTransformer"
    group: str = ""  # U-Net blocks: their stage in `unet_block_groups` ("down 1", "mid", "up 1", "io")
    params: int | None = None  # U-Net blocks
    flops: int | None = None  # U-Net blocks: in this call

    @property
    def is_block(self) -> bool:
        return self.flops is not None


@dataclass(frozen=True)
class AttentionCost:
    """Attention's two products at one latent resolution, in one U-Net call."""

    resolution: tuple[int, int]  # (h, w) of the latent grid the transformer blocks see
    layers: int  # self-attention calls there (one per transformer block)
    queries: int  # h·w image tokens
    context: int  # text tokens the cross-attention attends to
    self_flops: int  # 4·B·(h·w)²·d per layer: grows with the square of the pixel count
    cross_flops: int  # 4·B·(h·w)·L·d per layer: linear in the pixel count


@dataclass(frozen=True)
class TraceReport:
    model: str
    size: tuple[int, int]  # (width, height) in pixels
    rows: tuple[Row, ...]  # in the order the tensors were made
    attention: tuple[AttentionCost, ...]  # highest resolution first
    unet_flops: int  # one U-Net call, every counted layer (the blocks' FLOPs add up to it)
    unet_calls: int  # U-Net calls in the run; the rows show the first
    device: str

    @property
    def blocks(self) -> tuple[Row, ...]:
        return tuple(r for r in self.rows if r.is_block)

    @property
    def unet_batch(self) -> int:
        return next(r.shape[0] for r in self.rows if r.name == "input x")

    @property
    def unet_params(self) -> int:
        return sum(r.params or 0 for r in self.blocks)

    def groups(self) -> dict[str, tuple[int, int]]:
        """(params, FLOPs) per `unet_block_groups` stage: down 1.., mid, up 1.., then io."""
        totals: dict[str, tuple[int, int]] = {}
        for r in sorted(self.blocks, key=lambda r: r.group == "io"):
            params, flops = totals.get(r.group, (0, 0))
            totals[r.group] = (params + (r.params or 0), flops + (r.flops or 0))
        return totals

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "size": list(self.size),
            "device": self.device,
            "unet_calls": self.unet_calls,
            "unet_batch": self.unet_batch,
            "unet_params": self.unet_params,
            "unet_flops": self.unet_flops,
            "rows": [{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(r).items()} for r in self.rows],
            "groups": {g: {"params": p, "flops": f} for g, (p, f) in self.groups().items()},
            "attention": [{**asdict(a), "resolution": list(a.resolution)} for a in self.attention],
        }


# --- hooks that write the rows -----------------------------------------------------------------------
class _AttentionCall(NamedTuple):
    grid: tuple[int, int]  # (h, w) of the SpatialTransformer it ran in
    cross: bool
    keys: int
    flops: int


class _Tracer:
    """Forward hooks writing a row per tensor as the run makes it; the U-Net's for its first call only."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.unet_calls = 0
        self.flops: dict[nn.Module, int] = {}  # per counted layer, in the first U-Net call
        self.attention: list[_AttentionCall] = []
        self._reads: dict[str, int] = {}  # prompts each text encoder has read: the prompt, then the negative
        self._grid = (0, 0)
        self._handles: list[RemovableHandle] = []

    def add(self, stage: str, name: str, t: Tensor, **extra) -> None:
        self.rows.append(Row(stage, name, tuple(t.shape), str(t.dtype).removeprefix("torch."), **extra))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _pre(self, module: nn.Module, hook: Callable, **options) -> None:
        self._handles.append(module.register_forward_pre_hook(hook, **options))

    def _post(self, module: nn.Module, hook: Callable, **options) -> None:
        self._handles.append(module.register_forward_hook(hook, **options))

    def watch_text(self, name: str, encoder: CLIPTextModel) -> None:
        """Token ids in, token embeddings out (every layer keeps that (n, L, D)), and a projected pooled feature."""

        def ids(module: nn.Module, args: tuple) -> None:
            self._reads[name] = self._reads.get(name, 0) + 1
            self.add("text", f"{name} ids #{self._reads[name]}", args[0])  # (n chunks, L)

        def embedded(module: nn.Module, args: tuple, out: Tensor) -> None:
            self.add("text", f"{name} token embeddings #{self._reads[name]}", out)  # (n, L, D)

        def pooled(module: nn.Module, args: tuple, out: Tensor) -> None:
            self.add("text", f"{name} pooled, projected #{self._reads[name]}", out)  # (n, P)

        embeddings = encoder.text_model.embeddings
        self._pre(embeddings, ids)
        self._post(embeddings, embedded)
        if getattr(encoder, "text_projection", None) is not None:
            self._post(encoder.text_projection, pooled)

    def watch_vae(self, vae: AutoencoderKL) -> None:
        self._pre(vae.decoder, lambda m, args: self.add("vae", "decoder input z", args[0]))
        self._post(vae.decoder, lambda m, args, out: self.add("vae", "decoded image", out))

    def watch_unet(self, unet: UNet) -> None:
        signature = inspect.signature(unet.forward)

        def inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.unet_calls += 1
            if self.unet_calls == 1:
                for key, value in signature.bind(*args, **kwargs).arguments.items():
                    if isinstance(value, Tensor):
                        self.add("unet", f"input {key}", value)

        self._pre(unet, inputs, with_kwargs=True)
        groups = unet_block_groups(unet.cfg)
        for name, block in unet_blocks(unet):
            group = next(g for g, prefixes in groups.items() if f"{name}." in prefixes)
            self._post(block, self._block_hook(name, group))
        for m in unet.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                self._post(m, self._layer)
            elif isinstance(m, Attention):
                self._post(m, self._attention, with_kwargs=True)
            elif isinstance(m, SpatialTransformer):
                self._pre(m, self._transformer)

    def _count(self, module: nn.Module, flops: int) -> None:
        self.flops[module] = self.flops.get(module, 0) + flops

    def _layer(self, module: nn.Module, args: tuple, out: Tensor) -> None:
        if self.unet_calls == 1:
            conv = isinstance(module, nn.Conv2d)
            self._count(module, conv2d_flops(module, out) if conv else linear_flops(module, args[0]))

    def _transformer(self, module: nn.Module, args: tuple) -> None:
        self._grid = tuple(args[0].shape[-2:])  # (h, w) of the blocks' attention that follows

    def _attention(self, module: Attention, args: tuple, kwargs: dict, out: Tensor) -> None:
        if self.unet_calls != 1:
            return
        x = args[0]  # (B, N, dim); fewer than h·w tokens with token merging
        context = args[1] if len(args) > 1 else kwargs.get("context")  # (B, L, context_dim) or None
        keys = x.shape[1] if context is None else context.shape[1]
        flops = attention_flops(x.shape[0], x.shape[1], keys, module.to_q.out_features)
        self._count(module, flops)
        self.attention.append(_AttentionCall(self._grid, context is not None, keys, flops))

    def _block_hook(self, name: str, group: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if self.unet_calls == 1:  # the block's layers have all run: their FLOPs are in
                flops = sum(self.flops.get(m, 0) for m in module.modules())
                self.add("unet", name, out, input_shape=tuple(args[0].shape), layers=_layer_names(module),
                         group=group, params=count(module), flops=flops)

        return hook

    def report(self, model: str, size: tuple[int, int], device: str) -> TraceReport:
        return TraceReport(model, size, tuple(self.rows), _attention_costs(self.attention),
                           sum(self.flops.values()), self.unet_calls, device)


def unet_blocks(unet: UNet) -> list[tuple[str, nn.Module]]:
    """The U-Net's blocks by parameter prefix: time (and label) embedding, input blocks, middle, output blocks, out."""
    blocks: list[tuple[str, nn.Module]] = [("time_embed", unet.time_embed)]
    if hasattr(unet, "label_emb"):
        blocks.append(("label_emb", unet.label_emb))
    blocks += [(f"input_blocks.{i}", b) for i, b in enumerate(unet.input_blocks)]
    blocks.append(("middle_block", unet.middle_block))
    blocks += [(f"output_blocks.{i}", b) for i, b in enumerate(unet.output_blocks)]
    return blocks + [("out", unet.out)]


def _layer_names(block: nn.Module) -> str:
    """Its layers' class names, plain Sequentials opened: "ResBlock, SpatialTransformer, Upsample"."""
    return ", ".join(_layer_names(c) if type(c) is nn.Sequential else type(c).__name__ for c in block.children())


def _attention_costs(calls: list[_AttentionCall]) -> tuple[AttentionCost, ...]:
    costs = []
    for grid in sorted({c.grid for c in calls}, key=lambda g: -g[0] * g[1]):
        here = [c for c in calls if c.grid == grid]
        self_calls = [c for c in here if not c.cross]
        cross_calls = [c for c in here if c.cross]
        costs.append(AttentionCost(
            grid, len(self_calls), grid[0] * grid[1], max((c.keys for c in cross_calls), default=0),
            sum(c.flops for c in self_calls), sum(c.flops for c in cross_calls),
        ))
    return tuple(costs)


# --- tracing a generation, or a U-Net alone ----------------------------------------------------------
def trace_generation(
    runner: Runner, prompt: str, *, size: tuple[int, int] | None = None, negative: str = "",
    guidance: float | None = None, seed: int = 0, steps: int = 1, name: str | None = None,
) -> TraceReport:
    """Make one image from `prompt` as `Runner.generate_images` does (text to image, `steps` steps) and
    trace its tensors. `size` is (width, height) in pixels, default the model's; `guidance` <= 1 runs
    without classifier-free guidance (a U-Net batch of 1)."""
    comps = runner.components
    if not isinstance(comps.unet, UNet) or not isinstance(comps.vae, AutoencoderKL):
        raise SdlabError("trace hooks sdlab's own PyTorch modules; load the model with backend='torch'")
    width, height = size or (None, None)
    options = {} if guidance is None else {"guidance": guidance}
    s = Settings(prompt, negative=negative, steps=steps, width=width, height=height, seed=seed, **options)
    s = s.resolved(runner.config)
    tracer = _Tracer()
    try:
        for key, module in comps.modules().items():
            if isinstance(module, CLIPTextModel):
                tracer.watch_text(key, module)
        tracer.watch_unet(comps.unet)
        tracer.watch_vae(comps.vae)
        _generate(runner, s, tracer)
    finally:
        tracer.close()
    return tracer.report(name or runner.config.name, (s.width, s.height), str(runner.device))


@torch.no_grad()
def _generate(runner: Runner, s: Settings, tracer: _Tracer) -> None:
    """`Runner.generate_images` for one text-to-image seed, with the tensors between its stages recorded."""
    cond = runner.condition(s)
    tracer.add("text", "context [negative, positive]", cond.context)  # (2, L·n, ΣD)
    if cond.y is not None:
        tracer.add("text", "added condition y [negative, positive]", cond.y)  # (2, addition_embed_dim)
    plan = runner.plan(s)
    generator = torch.Generator().manual_seed(s.seed)
    start = runner.start(s, plan, Inputs(), generator)
    tracer.add("latents", "x_T, initial noise", start.x)  # (1, C, H/f, W/f)
    x = runner.denoise(s, start, cond, generator)
    latents = runner.finish(start, x)
    tracer.add("latents", "after sampling", latents)
    runner.decode(latents)


def trace_unet(cfg: ModelConfig, size: tuple[int, int] | None = None, batch: int = CFG_BATCH,
               name: str | None = None) -> TraceReport:
    """One call of `cfg`'s U-Net built on the meta device (no weights, no memory) at `size` (width, height)
    pixels, default the model's, on a batch of `batch` (2: one guided step) with one chunk of text context."""
    width, height = size or (cfg.default_size, cfg.default_size)
    f = cfg.vae.downscale
    if width <= 0 or height <= 0 or width % f or height % f:
        raise SdlabError(
            f"size {width}x{height}: width and height must be positive multiples of {f}, which this VAE needs"
        )
    if batch < 1:
        raise SdlabError(f"batch must be at least 1, got {batch}")
    u = cfg.unet
    with empty_modules():
        unet = UNet(u)
        x = torch.empty(batch, u.in_channels, height // f, width // f)  # (B, C, H/f, W/f)
        context = torch.empty(batch, cfg.text[0].tokenizer.max_length, u.cross_attention_dim)  # (B, L, D)
        y = None if u.addition_embed_dim is None else torch.empty(batch, u.addition_embed_dim)  # (B, adm)
        t = torch.full((batch,), float(cfg.schedule.num_train_timesteps - 1))  # (B,)
    tracer = _Tracer()
    try:
        tracer.watch_unet(unet)
        with torch.no_grad():
            unet(x, t, context, y=y)
    finally:
        tracer.close()
    return tracer.report(name or cfg.name, (width, height), "meta")


# --- text tables (Markdown) -------------------------------------------------------------------------
def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> str:
    """An aligned Markdown table; columns numbered in `right` are right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]

    def line(cells: tuple[str, ...]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _shape(shape: tuple[int, ...] | None) -> str:
    return "" if shape is None else str(tuple(shape))


def _unit(total: int) -> tuple[float, str]:
    """The largest unit that leaves the total at least 100 of it."""
    for scale, unit in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if total >= 100 * scale:
            return scale, unit
    return 1.0, "FLOP"


def format_trace(r: TraceReport) -> str:
    w, h = r.size
    calls = f"{r.unet_calls} U-Net call{'s' if r.unet_calls != 1 else ''}, the first traced"
    rows = [
        (row.stage, row.name, row.layers, _shape(row.input_shape), _shape(row.shape), row.dtype,
         "" if row.params is None else f"{row.params:,}")
        for row in r.rows
    ]
    table = _table(("stage", "tensor", "layers", "input", "shape", "dtype", "params"), rows, right=(6,))
    text = f"{r.model} at {w}x{h} on {r.device}: {calls}\n\n{table}"
    if any(row.stage == "text" for row in r.rows):
        text += "\n\n#1 is the prompt, #2 the negative prompt: each text encoder reads both"
    return text


def format_flops(r: TraceReport) -> str:
    scale, unit = _unit(r.unet_flops)
    total = max(r.unet_flops, 1)

    def amount(flops: int) -> str:
        return f"{flops / scale:,.2f}"

    blocks = [(b.name, b.group, _shape(b.shape), f"{b.params:,}", amount(b.flops), f"{b.flops / total:.1%}")
              for b in r.blocks]
    blocks.append(("total", "", "", f"{r.unet_params:,}", amount(r.unet_flops), "100.0%"))
    groups = [(g, f"{p:,}", amount(f), f"{f / total:.1%}") for g, (p, f) in r.groups().items()]
    attention = [
        (f"{a.resolution[0]}x{a.resolution[1]}", f"{a.queries:,}", str(a.layers), amount(a.self_flops),
         f"{a.self_flops / total:.1%}", str(a.context), amount(a.cross_flops), f"{a.cross_flops / total:.1%}")
        for a in r.attention
    ]
    self_sum, cross_sum = sum(a.self_flops for a in r.attention), sum(a.cross_flops for a in r.attention)
    attention.append(("total", "", "", amount(self_sum), f"{self_sum / total:.1%}", "", amount(cross_sum),
                      f"{cross_sum / total:.1%}"))
    w, h = r.size
    return "\n\n".join([
        f"{r.model} U-Net, one call on a batch of {r.unet_batch} at {w}x{h}: {amount(r.unet_flops)} {unit}"
        f" (a multiply-add = 2), {r.unet_params:,} parameters",
        _table(("block", "stage", "output", "params", unit, "share"), blocks, right=(3, 4, 5)),
        _table(("stage", "params", unit, "share"), groups, right=(1, 2, 3)),
        "attention products (q·kᵀ and softmax·v) by latent resolution",
        _table(("latent", "tokens", "layers", f"self {unit}", "self share", "text tokens", f"cross {unit}",
                "cross share"), attention, right=(1, 2, 3, 4, 5, 6, 7)),
    ])
