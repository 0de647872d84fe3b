"""Where the U-Net looks: cross-attention per prompt word (DAAM, Tang et al. 2023) and self-attention of one pixel.

During a generation, forward hooks on the attention layers of every BasicTransformerBlock recompute the
probabilities the layer applies, P = softmax(q kᵀ / √d) with q = to_q(x), k = to_k(context), which
`scaled_dot_product_attention` never materialises. Only the batch's last sample is kept: the conditional
half of classifier-free guidance ([negative, positive]), or the only sample when there is no guidance.
The hooks return nothing, so the image is the one made without them.

Aggregation, as DAAM's, for context token ℓ at step t (every U-Net call of the step: two for a second-order sampler):

    M_t[ℓ] = Σ_layers Σ_heads up(P[:, ℓ] as an (h, w) grid)        (H, W), image pixels
    M[word] = Σ_t Σ_{ℓ in the word's tokens} M_t[ℓ]

`up` is bilinear upsampling to the image size. It is linear, so a resolution's layers are summed first and
upsampled once, only when a map is asked for: the trace keeps (steps, L, h, w) per attention resolution.
Each query's probabilities sum to 1 over the L context tokens, so Σ_ℓ M_t[ℓ] = `attended[t]` (the heads of
the step's cross-attention passes, added up) at every pixel. `normalise` maps a map to [0, 1] for display.

Self-attention of pixel (x, y): in each self-attention layer, the query at the cell of its (h, w) grid that
holds the pixel; its probabilities over the h·w keys, summed and upsampled the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from sdlab.analysis.heatmaps import mark, overlay, save_gif, strip
from sdlab.errors import SdlabError
from sdlab.models.layers import Attention, BasicTransformerBlock, split_heads
from sdlab.pipelines.images import save_png
from sdlab.prompts import Break, parse_prompt_attention, tokenize_prompt
from sdlab.tokenizer import END_OF_WORD, Tokenizer, normalize, pre_tokenize

if TYPE_CHECKING:
    from sdlab.api import Pipeline

Size = tuple[int, int]  # (h, w) of one attention resolution, or (H, W) of the image


def attention_probs(attn: Attention, x: Tensor, context: Tensor | None = None, queries: slice = slice(None)) -> Tensor:
    """The probabilities `attn` applies to x (B, N, dim) attending to context (B, L, D) (x itself when None),
    for the queries x[:, queries]: (B, heads, n, L), float32."""
    context = x if context is None else context
    q = split_heads(attn.to_q(x[:, queries]).float(), attn.heads)  # (B, heads, n, d)
    k = split_heads(attn.to_k(context).float(), attn.heads)  # (B, heads, L, d)
    return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(dim=-1)  # (B, heads, n, L)


# --- recording --------------------------------------------------------------------------------------
class _Recorder:
    """What the hooks share: the open step's sums per resolution, and the steps closed so far."""

    def __init__(self, pixel: tuple[float, float] | None):
        self.pixel = pixel  # (x, y) as fractions of the image's width and height
        self.sizes: dict[nn.Module, Size] = {}  # each block's grid at its latest call
        self.cross: dict[Size, Tensor] = {}  # open step: (L, h, w)
        self.selfs: dict[Size, Tensor] = {}  # open step: (h, w)
        self.heads = 0  # open step: heads of its cross-attention passes
        self.steps: list[tuple[dict[Size, Tensor], dict[Size, Tensor], int]] = []

    def end_step(self) -> None:
        if self.heads:
            self.steps.append((self.cross, self.selfs, self.heads))
        self.cross, self.selfs, self.heads = {}, {}, 0

    def size_hook(self, block: nn.Module, args: tuple) -> None:
        self.sizes[block] = args[2]  # BasicTransformerBlock(x, context, size)

    def cross_hook(self, block: nn.Module) -> Callable:
        def hook(attn: Attention, args: tuple, out: Tensor) -> None:
            x, context = args  # (B, h*w, dim), (B, L, D)
            h, w = self.sizes[block]
            probs = attention_probs(attn, x[-1:], context[-1:])[0]  # (heads, h*w, L)
            _add(self.cross, (h, w), probs.sum(dim=0).T.reshape(-1, h, w))  # (L, h, w)
            self.heads += attn.heads

        return hook

    def self_hook(self, block: nn.Module) -> Callable:
        def hook(attn: Attention, args: tuple, out: Tensor) -> None:
            x = args[0][-1:]  # (1, h*w, dim)
            h, w = self.sizes[block]
            if x.shape[1] != h * w:
                raise SdlabError("token merging shortens the self-attention; turn it off to trace a pixel")
            fx, fy = self.pixel
            query = min(int(fy * h), h - 1) * w + min(int(fx * w), w - 1)
            probs = attention_probs(attn, x, queries=slice(query, query + 1))[0, :, 0]  # (heads, h*w)
            _add(self.selfs, (h, w), probs.sum(dim=0).reshape(h, w))

        return hook


def _add(sums: dict[Size, Tensor], size: Size, value: Tensor) -> None:
    sums[size] = value if size not in sums else sums[size] + value


@contextmanager
def recording(unet: nn.Module, pixel: tuple[float, float] | None = None) -> Iterator[_Recorder]:
    """Within the block, every cross-attention of `unet` (and the self-attention of the query at `pixel`,
    (x, y) fractions of the image) is summed into the recorder; `end_step()` closes a step."""
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    rec = _Recorder(pixel)
    handles = []
    try:
        for block in blocks:
            handles.append(block.register_forward_pre_hook(rec.size_hook))
            handles.append(block.attn2.register_forward_hook(rec.cross_hook(block)))
            if pixel is not None:
                handles.append(block.attn1.register_forward_hook(rec.self_hook(block)))
        yield rec
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class AttentionTrace:
    """What one generation attended to, per step: Σ over heads, layers and the step's U-Net calls."""

    image: Image.Image
    prompt: str
    tokenizer: Tokenizer  # the model's first: its chunks lay out the context
    cross: dict[Size, Tensor]  # (h, w) -> (steps, L, h, w): per context token
    attended: tuple[int, ...]  # per step: Σ heads of its cross-attention passes = Σ over tokens at every pixel
    pixel: tuple[int, int] | None = None  # (x, y) in image pixels
    self_attention: dict[Size, Tensor] = field(default_factory=dict)  # (h, w) -> (steps, h, w): the pixel's query

    @property
    def steps(self) -> int:
        return len(self.attended)

    @property
    def size(self) -> Size:
        return self.image.height, self.image.width


def trace_attention(
    pipe: Pipeline, prompt: str, words: Sequence[str] = (), pixel: tuple[int, int] | None = None, **options
) -> AttentionTrace:
    """Generate one image of `prompt` (options as `Pipeline.generate`'s) and record its attention; `words`
    (and `pixel`, (x, y) in image pixels, for self-attention) are checked before any work."""
    tokenizer = pipe.runner.components.tokenizers[0]
    for word in words:
        word_positions(prompt, word, tokenizer)
    if options.get("batch", 1) != 1:
        raise SdlabError(f"an attention trace follows one image; got batch {options['batch']}")
    settings = pipe.settings(prompt, **options)
    where = None if pixel is None else _fraction(pixel, settings.width, settings.height)
    with recording(pipe.runner.components.unet, where) as rec:
        image = pipe.run(settings, lambda done, total: rec.end_step())[0]
    rec.end_step()  # calls after the last step's callback, if a sampler makes any
    if not rec.steps:
        raise SdlabError("no cross-attention was recorded; attention maps need the torch backend (backend='torch')")
    cross, selfs, heads = zip(*rec.steps)
    return AttentionTrace(image, prompt, tokenizer, _stacked(cross), heads, pixel, _stacked(selfs))


def _stacked(steps: Sequence[dict[Size, Tensor]]) -> dict[Size, Tensor]:
    """Per step {size: (...)} -> {size: (steps, ...)}."""
    return {size: torch.stack([step[size] for step in steps]) for size in steps[0]}


def _fraction(pixel: tuple[int, int], width: int, height: int) -> tuple[float, float]:
    x, y = pixel
    if not (0 <= x < width and 0 <= y < height):
        raise SdlabError(
            f"pixel ({x}, {y}) is outside the {width}x{height} image; need 0 <= x < {width} and 0 <= y < {height}"
        )
    return (x + 0.5) / width, (y + 0.5) / height


# --- words -> context positions ---------------------------------------------------------------------
def prompt_words(prompt: str) -> tuple[str, ...]:
    """The prompt's words as the tokenizer splits them (lower case, no emphasis syntax), each once."""
    texts = [piece.text for piece in parse_prompt_attention(prompt) if not isinstance(piece, Break)]
    words = [w for text in texts for w in pre_tokenize(normalize(text)) if any(c.isalnum() for c in w)]
    return tuple(dict.fromkeys(words))


def word_positions(prompt: str, word: str, tokenizer: Tokenizer) -> tuple[int, ...]:
    """Where `word`'s BPE tokens sit in the prompt's context: chunk k, place j (0 = BOS) -> k * max_length + j.
    Every occurrence that starts a word counts; a word of several tokens (or several words) gives all of them."""
    wanted = tuple(tokenizer.encode(word))
    length = tokenizer.cfg.max_length
    found: list[int] = []
    for k, chunk in enumerate(tokenize_prompt(prompt, tokenizer)):
        for j in range(1, len(chunk.ids) - len(wanted) + 1):
            if wanted and chunk.ids[j : j + len(wanted)] == wanted and _ends_word(tokenizer, chunk.ids[j - 1]):
                found.extend(k * length + j + i for i in range(len(wanted)))
    if not found:
        raise SdlabError(f"{word!r} is not a word of the prompt; its words: {', '.join(prompt_words(prompt))}")
    return tuple(found)


def _ends_word(tokenizer: Tokenizer, token: int) -> bool:
    return token in tokenizer.special_ids.values() or tokenizer.vocab.tokens[token].endswith(END_OF_WORD)


# --- maps at image size ------------------------------------------------------------------------------
def upsampled(maps: dict[Size, Tensor], size: Size) -> Tensor:
    """Σ over resolutions of (..., h, w) maps, each upsampled bilinearly to `size` (H, W): (..., H, W)."""
    total = None
    for m in maps.values():
        grids = m.reshape(1, -1, *m.shape[-2:])  # (1, K, h, w)
        up = F.interpolate(grids, size=size, mode="bilinear", align_corners=False).reshape(*m.shape[:-2], *size)
        total = up if total is None else total + up
    return total


def token_map(trace: AttentionTrace, positions: Sequence[int], step: int | None = None) -> Tensor:
    """Σ of M_t[ℓ] over the context `positions` ℓ and every step (or one): (H, W)."""
    steps = slice(None) if step is None else slice(step, step + 1)
    picked = {s: m[steps][:, list(positions)].sum(dim=(0, 1)) for s, m in trace.cross.items()}  # (h, w) each
    return upsampled(picked, trace.size)


def word_map(trace: AttentionTrace, word: str, step: int | None = None) -> Tensor:
    """M[word] (H, W): the cross-attention to the word's tokens, over every step (or one)."""
    return token_map(trace, word_positions(trace.prompt, word, trace.tokenizer), step)


def pixel_map(trace: AttentionTrace, step: int | None = None) -> Tensor:
    """The self-attention of the traced pixel's query over the image, every step (or one): (H, W)."""
    if trace.pixel is None:
        raise SdlabError("this trace has no pixel; trace one with pixel=(x, y)")
    steps = slice(None) if step is None else slice(step, step + 1)
    return upsampled({s: m[steps].sum(dim=0) for s, m in trace.self_attention.items()}, trace.size)


def normalise(m: Tensor) -> Tensor:
    """(m - min) / (max - min) in [0, 1]; a constant map is all zeros."""
    low, high = m.min(), m.max()
    return torch.zeros_like(m) if high <= low else (m - low) / (high - low)


# --- pictures ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionFiles:
    image: Path  # the generated image, with its generation parameters
    words: Path | None  # image | one overlay per word
    pixel: Path | None  # image | the pixel's self-attention overlay, the pixel marked
    steps: Path | None  # GIF: the same overlays, step by step


def _tiles(trace: AttentionTrace, words: Sequence[str], step: int | None) -> list[Image.Image]:
    """One overlay per word, then the pixel's (marked) when traced; each map normalised on its own."""
    tiles = [overlay(trace.image, normalise(word_map(trace, w, step))) for w in words]
    if trace.pixel is not None:
        tiles.append(mark(overlay(trace.image, normalise(pixel_map(trace, step))), trace.pixel))
    return tiles


def write_attention(
    trace: AttentionTrace, words: Sequence[str], out: str | Path, animate: bool = False, scale: int = 4
) -> AttentionFiles:
    """Into the folder `out`: image.png, and words.png (given words), pixel.png (a traced pixel) and
    steps.gif (`animate`: one frame per step); the strips' tiles are enlarged `scale` times."""
    out = Path(out)
    info = {k: v for k, v in trace.image.info.items() if isinstance(v, str)}
    text = {"prompt": trace.prompt, "words": ",".join(words)}
    pixel_label = [] if trace.pixel is None else [f"pixel {trace.pixel[0]},{trace.pixel[1]}"]
    tiles = _tiles(trace, words, None)
    image = save_png(trace.image, out / "image.png", info)
    word_file = pixel_file = steps_file = None
    if words:
        word_strip = strip([trace.image, *tiles[: len(words)]], ["image", *words], scale)
        word_file = save_png(word_strip, out / "words.png", text)
    if trace.pixel is not None:
        pixel_strip = strip([mark(trace.image, trace.pixel), tiles[-1]], ["image", *pixel_label], scale)
        pixel_file = save_png(pixel_strip, out / "pixel.png", text)
    if animate:
        frames = []
        for t in range(trace.steps):
            labels = [f"step {t + 1}/{trace.steps}", *words, *pixel_label]
            frames.append(strip([trace.image, *_tiles(trace, words, t)], labels, scale))
        steps_file = save_gif(frames, out / "steps.gif")
    return AttentionFiles(image, word_file, pixel_file, steps_file)
