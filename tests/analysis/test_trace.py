"""Shape traces and FLOP counts: the shapes are those of the tensors themselves (hooked again here), the
FLOPs those torch.utils.flop_counter counts, block by block and for the whole U-Net call."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from sdlab.analysis.trace import format_flops, format_trace, trace_generation, trace_unet
from sdlab.checkpoints.load import Components
from sdlab.config import preset
from sdlab.errors import SdlabError
from sdlab.models.clip import CLIPTextModel
from sdlab.models.empty import empty_modules
from sdlab.models.unet import UNet
from sdlab.models.vae import AutoencoderKL
from sdlab.pipelines.runner import Runner
from sdlab.pipelines.settings import Settings
from sdlab.tokenizer import Tokenizer

SIZE = (48, 32)  # (width, height): not square, so a swapped H and W shows
BLOCK = re.compile(r"(input_blocks|output_blocks)\.\d+|middle_block|out|time_embed|label_emb")
# FlopCounterMode has no formula for PyTorch's CPU attention kernel (it counts it as 0); give it the
# one it uses for the CUDA kernels, so that the reference counts attention on the CPU too
CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
}


def _runner(name: str) -> Runner:
    cfg = preset(name)
    torch.manual_seed(0)
    encoders = tuple(CLIPTextModel(t.encoder).eval() for t in cfg.text)
    tokenizers = tuple(Tokenizer(t.tokenizer) for t in cfg.text)
    return Runner(Components(cfg, UNet(cfg.unet).eval(), AutoencoderKL(cfg.vae).eval(), encoders, tokenizers, name))


@pytest.fixture(scope="module", params=["tiny-sd1", "tiny-sdxl"])
def runner(request) -> Runner:
    return _runner(request.param)


class Seen:
    """Hooks of our own: the first U-Net call's inputs and output, each block's inputs and output, the image."""

    def __init__(self, runner: Runner):
        self.unet_in: tuple | None = None
        self.blocks: dict[str, tuple[tuple, dict, torch.Tensor]] = {}
        self.images: list[torch.Tensor] = []
        unet = runner.components.unet
        self.handles = [
            unet.register_forward_pre_hook(self._unet, with_kwargs=True),
            runner.components.vae.decoder.register_forward_hook(lambda m, a, out: self.images.append(out)),
        ]
        for name, block in unet.named_modules():
            if BLOCK.fullmatch(name):
                self.handles.append(block.register_forward_hook(self._block(name), with_kwargs=True))

    def _unet(self, module, args, kwargs):
        if self.unet_in is None:
            self.unet_in = (args, kwargs)

    def _block(self, name):
        def hook(module, args, kwargs, out):
            self.blocks.setdefault(name, (args, kwargs, out))

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _traced(runner: Runner, **options):
    seen = Seen(runner)
    try:
        report = trace_generation(runner, "a red circle", size=SIZE, **options)
    finally:
        seen.close()
    return report, seen


@pytest.fixture(scope="module")
def tiny_sd1() -> Runner:
    return _runner("tiny-sd1")


@pytest.fixture(scope="module")
def traced(runner):
    """One traced generation per model, and what our own hooks saw of it."""
    return _traced(runner)


def _row(report, name):
    (row,) = [r for r in report.rows if r.name == name]
    return row


# --- shapes ---------------------------------------------------------------------------------------
def test_trace_shapes_are_the_tensors_shapes(runner, traced):
    report, seen = traced
    cfg = runner.config
    f, (w, h) = cfg.vae.downscale, SIZE
    latent = (1, cfg.vae.latent_channels, h // f, w // f)
    (x, t, context), kwargs = seen.unet_in
    if kwargs.get("y") is not None:  # SDXL
        assert _row(report, "input y").shape == tuple(kwargs["y"].shape)
    # classifier-free guidance: the U-Net sees [negative, positive] as a batch of 2
    assert _row(report, "input x").shape == tuple(x.shape) == (2, *latent[1:])
    assert _row(report, "input timesteps").shape == tuple(t.shape) == (2,)
    chunk = cfg.text[0].tokenizer.max_length
    assert _row(report, "input context").shape == tuple(context.shape) == (2, chunk, cfg.unet.cross_attention_dim)
    assert _row(report, "context [negative, positive]").shape == tuple(context.shape)
    assert _row(report, "x_T, initial noise").shape == latent
    assert _row(report, "after sampling").shape == latent
    assert _row(report, "decoder input z").shape == latent
    assert _row(report, "decoded image").shape == tuple(seen.images[0].shape) == (1, 3, h, w)
    assert _row(report, "out").shape == tuple(x.shape)
    # every block, as our own hooks saw it
    blocks = {r.name: r for r in report.blocks}
    assert set(blocks) == set(seen.blocks)
    for name, (args, _, out) in seen.blocks.items():
        assert blocks[name].shape == tuple(out.shape) and blocks[name].input_shape == tuple(args[0].shape), name
        params = sum(p.numel() for p in runner.components.unet.get_submodule(name).parameters())
        assert blocks[name].params == params, name
    assert report.unet_params == sum(p.numel() for p in runner.components.unet.parameters())
    # the rows come in the order the run made them
    runs = [s for i, s in enumerate(r.stage for r in report.rows) if i == 0 or report.rows[i - 1].stage != s]
    assert runs == ["text", "latents", "unet", "latents", "vae"]
    assert report.unet_calls == 1


def test_text_rows_per_encoder(runner, traced):
    report, _ = traced
    names = list(runner.components.modules())[2:]  # the text encoders' component names
    for name, spec in zip(names, runner.config.text):
        for k in (1, 2):  # the prompt, then the negative prompt
            ids = _row(report, f"{name} ids #{k}")
            assert ids.shape == (1, spec.tokenizer.max_length) and ids.dtype == "int64"
            embedded = _row(report, f"{name} token embeddings #{k}")
            assert embedded.shape == (1, spec.tokenizer.max_length, spec.encoder.hidden_size)
    adm = runner.config.unet.addition_embed_dim
    if adm:  # SDXL: pooled text and micro-conditioning
        assert _row(report, "added condition y [negative, positive]").shape == _row(report, "input y").shape == (2, adm)
        pooled = _row(report, "text_encoder_2 pooled, projected #1")
        assert pooled.shape == (1, runner.config.text[1].encoder.projection_dim)
        assert _row(report, "label_emb").group == "io"
    else:
        assert not [r for r in report.rows if r.name in ("input y", "label_emb") or "pooled" in r.name]


def test_without_guidance_the_batch_is_one(runner):
    report, seen = _traced(runner, guidance=1.0)
    assert _row(report, "input x").shape[0] == seen.unet_in[0][0].shape[0] == 1
    assert report.unet_batch == 1


def test_the_trace_is_the_runners_own_generation(runner):
    report, seen = _traced(runner, seed=3)
    again = Seen(runner)
    try:
        s = Settings("a red circle", steps=1, seed=3, width=SIZE[0], height=SIZE[1]).resolved(runner.config)
        runner.generate_images(s)
    finally:
        again.close()
    assert torch.equal(seen.images[0], again.images[0])


def test_hooks_are_removed(runner, monkeypatch):
    def hooked() -> int:
        layers = [m for part in runner.components.modules().values() for m in part.modules()]
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in layers)

    def broken_decode(latents):
        raise RuntimeError("stop")

    before = hooked()
    _traced(runner)
    assert hooked() == before
    monkeypatch.setattr(runner, "decode", broken_decode)
    with pytest.raises(RuntimeError, match="stop"):
        trace_generation(runner, "a red circle", size=SIZE)
    assert hooked() == before


# --- FLOPs ----------------------------------------------------------------------------------------
def _reference_flops(module, args, kwargs) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter, torch.no_grad():
        module(*args, **kwargs)
    return counter.get_total_flops()


def test_block_flops_equal_flop_counter(runner, traced):
    report, seen = traced
    unet = runner.components.unet
    for row in report.blocks:
        args, kwargs, _ = seen.blocks[row.name]
        assert row.flops == _reference_flops(unet.get_submodule(row.name), args, kwargs), row.name
    args, kwargs = seen.unet_in
    assert report.unet_flops == sum(r.flops for r in report.blocks) == _reference_flops(unet, args, kwargs)


def test_sd15_at_512_on_the_meta_device_equals_flop_counter():
    cfg = preset("sd15")
    report = trace_unet(cfg, (512, 512))
    with empty_modules():
        unet = UNet(cfg.unet)
        x, context = torch.empty(2, 4, 64, 64), torch.empty(2, 77, 768)  # meta: FlopCounterMode counts attention
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, torch.full((2,), 999.0, device="meta"), context)
    assert report.unet_flops == counter.get_total_flops() == 1_606_546_882_560  # benchmarks: 1606 GFLOP a CFG step
    assert report.unet_params == 859_520_964
    assert [a.resolution for a in report.attention] == [(64, 64), (32, 32), (16, 16), (8, 8)]
    top = report.attention[0]  # 2 input + 3 output transformer blocks at 320 channels
    assert (top.layers, top.context) == (5, 77)
    assert top.self_flops == 5 * 4 * 2 * 4096**2 * 320 and top.cross_flops == 5 * 4 * 2 * 4096 * 77 * 320


def test_attention_by_resolution_follows_the_shapes():
    cfg = preset("tiny-sd1")  # attention at levels 0 and 1, and in the middle block (level 2)
    small, large = trace_unet(cfg, (32, 32)), trace_unet(cfg, (64, 64))
    u, f, b, chunk = cfg.unet, cfg.vae.downscale, 2, cfg.text[0].tokenizer.max_length
    levels = len(u.block_out_channels)
    for level, cost in enumerate(large.attention):
        side = 64 // f // 2**level
        n = side * side
        transformers = (2 * u.layers_per_block + 1) * u.attention[level] + (level == levels - 1)
        layers = transformers * u.transformer_depth[level]
        c = u.block_out_channels[level]
        assert (cost.resolution, cost.queries, cost.layers) == ((side, side), n, layers)
        assert cost.self_flops == layers * 4 * b * n * n * c
        assert cost.cross_flops == layers * 4 * b * n * chunk * c
    for s, l in zip(small.attention, large.attention):
        assert l.self_flops == 16 * s.self_flops  # (h·w)²: twice the side, 16 times the cost
        assert l.cross_flops == 4 * s.cross_flops  # h·w·L


# --- the tables, JSON, the default model, bad input --------------------------------------------------
def test_tables_and_json(traced):
    report, _ = traced
    for text in (format_trace(report), format_flops(report)):
        tables = [block.splitlines() for block in text.split("\n\n") if block.startswith("|")]
        assert tables
        for lines in tables:
            assert len({len(line) for line in lines}) == 1  # aligned
            assert re.fullmatch(r"\|(-+:?\|)+", lines[1])  # Markdown's header rule
    assert "input_blocks.1" in format_trace(report) and "decoded image" in format_trace(report)
    data = json.loads(json.dumps(report.to_json()))
    assert data["unet_flops"] == report.unet_flops == sum(g["flops"] for g in data["groups"].values())
    assert data["size"] == list(SIZE)


def test_default_model(default_model_path):
    from sdlab import api

    report = trace_generation(api.load(default_model_path, backend="torch").runner, "a red circle", size=(64, 64))
    assert _row(report, "input x").shape == (2, 4, 16, 16)
    assert _row(report, "decoded image").shape == (1, 3, 64, 64)
    assert [a.resolution for a in report.attention] == [(16, 16), (8, 8), (4, 4)]


@pytest.mark.parametrize(
    "options, message",
    [({"size": (33, 32)}, "multiple of 2"), ({"steps": 0}, "steps must be at least 1"),
     ({"guidance": float("nan")}, "finite")],
)
def test_bad_generation_input(tiny_sd1, options, message):
    with pytest.raises(SdlabError, match=message) as err:
        trace_generation(tiny_sd1, "a cat", **options)
    assert "\n" not in str(err.value)


def test_bad_unet_input():
    with pytest.raises(SdlabError, match="multiples of 2"):
        trace_unet(preset("tiny-sd1"), (33, 32))
    with pytest.raises(SdlabError, match="multiples of 8"):
        trace_unet(preset("sd15"), (512, 500))
    with pytest.raises(SdlabError, match="batch must be at least 1"):
        trace_unet(preset("tiny-sd1"), batch=0)


def test_a_compiled_or_converted_unet_is_refused():
    runner = _runner("tiny-sd1")
    runner.components.unet = torch.nn.Identity()  # as an OpenVINO-wrapped U-Net would be
    with pytest.raises(SdlabError, match="backend='torch'"):
        trace_generation(runner, "a cat")


def test_later_unet_calls_are_counted_not_traced(tiny_sd1):
    one = trace_generation(tiny_sd1, "a cat", size=SIZE)
    three = trace_generation(tiny_sd1, "a cat", size=SIZE, steps=3)
    assert (one.unet_calls, three.unet_calls) == (1, 3)
    assert [r.name for r in three.rows] == [r.name for r in one.rows]
    assert three.unet_flops == one.unet_flops and three.attention == one.attention
