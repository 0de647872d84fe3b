"""Prompts as people write them for AUTOMATIC1111's web UI -> the text conditioning a U-Net sees.

Three steps, each its own function: parse the attention syntax into weighted fragments, cut the
fragments' tokens into 75-token chunks, encode every chunk and apply the weights.

Attention syntax (`parse_prompt_attention`)
-------------------------------------------
- `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1; nesting multiplies,
  so `((text))` is 1.1 * 1.1 = 1.21.
- `(text:1.3)` multiplies by the number instead of 1.1. The number is `[+-]` digits with at most one
  decimal point (`1`, `1.`, `.5`, `-0.2`), spaces allowed around it: `(text : 1.3 )`.
- `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the literal characters; a backslash before anything else is dropped.
- Round and square brackets keep separate stacks. A `)` or `]` with no open bracket of its kind, and
  a `:1.3)` with no open `(`, are literal text. A bracket still open at the end of the prompt applies its
  multiplier to everything after it (`unclosed (paren` gives `paren` x1.1).
- `BREAK` in capitals, as a word of its own (regex word boundaries, the spaces around it are dropped),
  ends the current chunk; it is `BREAK` in the parsed list.
- Adjacent fragments of exactly equal weight are merged into one text (so `(a)(b)` is `ab` x1.1, one
  word to the tokenizer); a prompt with no text at all is one empty fragment of weight 1.
Two choices where AUTOMATIC1111 does something no one would ask for:
- a malformed number such as `(a:1.2.3)` raises in A1111; here `:1.2.3` is text and `)` closes with 1.1.
- A1111 multiplies a BREAK's marker weight inside brackets, which turns `(a BREAK b)` into the literal
  token "break" with weight -1.1; here a BREAK always breaks, inside brackets or not.

Extra networks (`extract_networks`)
-----------------------------------
`<lora:name:w>` (and `<lyco:…>`) tags are taken out of the text before it is parsed: `name`, then the
text-encoder weight and the U-Net weight by position or as `te=`/`unet=` (the U-Net's defaults to the
text encoder's). The pipeline applies the LoRAs; the encoder never sees the tags.

Chunks (`build_chunks`)
-----------------------
Each fragment's text is tokenised on its own; the tokens, with their fragment's weight, fill chunks of
`max_length - 2` = 75 tokens. A token arriving at a full chunk starts a new one, except that when the
chunk's last comma (the token `,</w>`) is at most `COMMA_BACKTRACK` = 20 tokens from its end, the tokens
after that comma move to the new chunk (A1111's `comma_padding_backtrack`). A comma that itself arrives
at a full chunk opens the next chunk and is not remembered as a comma there (as in A1111). A textual-inversion
embedding's name (its tokens, matched after tokenising) becomes the ids of its vectors, which stay
together: when they do not fit the open chunk they start the next one. BREAK closes
the current chunk even when it is empty; a trailing empty chunk is dropped unless it is the only one.
Every chunk is framed like the tokenizer frames a prompt: BOS, its tokens, EOS, then the family's pad id
(EOS for OpenAI CLIP, 0 for OpenCLIP) to 77 ids; BOS, EOS and padding have weight 1.

Weights (`apply_emphasis`, A1111's "Original" emphasis)
-------------------------------------------------------
Each token's hidden state is multiplied by its weight, then the chunk is rescaled so the mean over all of
its elements equals the mean before weighting. A1111 takes that mean over a batch of prompts; here the
batch is one prompt, so the mean is per prompt and chunk. The pooled text feature is never weighted.

Conditioning (`encode_prompt`)
------------------------------
Chunks are encoded separately and their hidden states concatenated along the sequence: (1, 77 * n, D).
Several encoders (SDXL) are concatenated on the last dim; the pooled feature is `text_embeds` of the
FIRST chunk of the last encoder that has a text projection (SDXL's bigG), or None (SD1, SD2).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sdlab.config import TextConditioner
from sdlab.errors import SdlabError
from sdlab.models.clip import CLIPTextModel
from sdlab.tokenizer import END_OF_WORD, Tokenizer

ROUND_MULTIPLIER = 1.1  # `(text)`
SQUARE_MULTIPLIER = 1 / 1.1  # `[text]`
COMMA_BACKTRACK = 20  # A1111 `comma_padding_backtrack`: how far back a chunk boundary may move to a comma
COMMA = "," + END_OF_WORD


# --- 1. attention syntax ------------------------------------------------------------------------


class Fragment(NamedTuple):
    """A run of prompt text and the weight of its tokens."""

    text: str
    weight: float


@dataclass(frozen=True)
class Break:
    """The `BREAK` keyword: the next tokens start a new chunk."""

    def __repr__(self) -> str:
        return "BREAK"


BREAK = Break()
Piece = Fragment | Break

_SYNTAX = re.compile(
    r"""
      (?P<escape>\\[()\[\]\\]?)                          # \( \) \[ \] \\ -> that character; lone \ -> nothing
    | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)      # ":1.3)" closes a round bracket with that weight
    | (?P<open>[(\[])
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


class _Parse:
    """State while scanning a prompt: the fragments so far, as [text, weight] lists so ranges can be
    re-weighted, and the start index of every open round and square bracket."""

    def __init__(self) -> None:
        self.pieces: list[list | Break] = []
        self.round: list[int] = []
        self.square: list[int] = []

    def text(self, text: str) -> None:
        for i, part in enumerate(_BREAK_WORD.split(text)):
            if i:
                self.pieces.append(BREAK)
            self.pieces.append([part, 1.0])

    def close(self, stack: list[int], multiplier: float) -> None:
        for piece in self.pieces[stack.pop() :]:
            if not isinstance(piece, Break):
                piece[1] *= multiplier
                if not math.isfinite(piece[1]):
                    raise SdlabError(f"the emphasis of {piece[0][:30]!r} overflows (too many brackets or too large "
                                     "a weight); use (text:1.5) with a moderate number")

    def token(self, m: re.Match) -> None:
        if m["escape"] is not None:
            self.pieces.append([m["escape"][1:], 1.0])
        elif m["weight"] is not None and self.round:
            self.close(self.round, float(m["weight"]))
        elif m["open"] is not None:
            (self.round if m["open"] == "(" else self.square).append(len(self.pieces))
        elif m["close"] == ")" and self.round:
            self.close(self.round, ROUND_MULTIPLIER)
        elif m["close"] == "]" and self.square:
            self.close(self.square, SQUARE_MULTIPLIER)
        else:  # text, or a closing bracket / ":w)" with nothing open to close
            self.text(m[0])

    def finish(self) -> list[Piece]:
        while self.round:  # innermost first, as if closed at the end
            self.close(self.round, ROUND_MULTIPLIER)
        while self.square:
            self.close(self.square, SQUARE_MULTIPLIER)
        return _merge_equal_weights(self.pieces or [["", 1.0]])


def _merge_equal_weights(pieces: list[list | Break]) -> list[Piece]:
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, Break):
            merged.append(piece)
        elif merged and isinstance(merged[-1], Fragment) and merged[-1].weight == piece[1]:
            merged[-1] = Fragment(merged[-1].text + piece[0], piece[1])
        else:
            merged.append(Fragment(piece[0], piece[1]))
    return merged


def parse_prompt_attention(prompt: str) -> list[Piece]:
    """A1111 prompt -> weighted fragments and BREAKs, e.g. "a (red:1.5) cat" ->
    [("a ", 1.0), ("red", 1.5), (" cat", 1.0)]. The rules are in the module docstring."""
    state = _Parse()
    for m in _SYNTAX.finditer(prompt):
        state.token(m)
    return state.finish()


# --- 1b. extra networks: <lora:name:weight> ------------------------------------------------------
NETWORK_KINDS = ("lora", "lyco")  # A1111's LyCORIS extension's tag; the same files, the same loader
_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class NetworkTag:
    """`<lora:name:te:unet>` in a prompt: a LoRA by name, its text-encoder and U-Net weights."""

    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0


def _tag_number(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SdlabError(f"{tag}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise SdlabError(f"{tag}: the weight must be finite, got {text!r}")
    return value


def _network_tag(args: str, tag: str) -> NetworkTag:
    """A1111's arguments: name, then te and unet weights by position or as te= / unet= (unet defaults to te)."""
    name, *rest = args.split(":")
    positional, named = [], {}
    for part in rest:
        key, eq, value = part.partition("=")
        if eq:
            if key.strip() not in ("te", "unet", "dyn"):
                raise SdlabError(f"{tag}: unknown argument {key.strip()!r} (known: te=, unet=)")
            named[key.strip()] = value
        else:
            positional.append(part)
    if "dyn" in named or len(positional) > 2:
        raise SdlabError(f"{tag}: dynamic LoRA dimension (dyn) is not supported; give <lora:name:te_weight:unet_weight>")
    te = _tag_number(named.get("te", positional[0] if positional else "1"), tag)
    unet = _tag_number(named["unet"], tag) if "unet" in named else (
        _tag_number(positional[1], tag) if len(positional) > 1 else te)
    if not name.strip():
        raise SdlabError(f"{tag}: the LoRA has no name")
    return NetworkTag(name.strip(), te, unet)


def extract_networks(prompt: str) -> tuple[str, list[NetworkTag]]:
    """A1111's extra-network tags taken out of a prompt: ("a <lora:ink:0.8> cat") -> ("a  cat", [ink x0.8]).
    Tags of other kinds stay in the text, as A1111 leaves them; hypernetworks are refused."""
    tags: list[NetworkTag] = []

    def take(m: re.Match) -> str:
        kind = m.group(1).lower()
        if kind in NETWORK_KINDS:
            tags.append(_network_tag(m.group(2), m.group(0)))
            return ""
        if kind == "hypernet":
            raise SdlabError(f"{m.group(0)}: hypernetworks are not supported; LoRA (<lora:name:weight>) is")
        return m.group(0)

    return _NETWORK_TAG.sub(take, prompt), tags


# --- 2. chunks of 75 tokens ---------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One encoder input: BOS, up to 75 tokens, EOS, padding — `max_length` ids and their weights."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]


class _ChunkBuilder:
    """Fills chunks token by token, with A1111's comma backtrack at a full chunk."""

    def __init__(self, size: int, comma: int, backtrack: int) -> None:
        self.size, self.comma, self.backtrack = size, comma, backtrack
        self.done: list[tuple[list[int], list[float]]] = []
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.last_comma = -1  # index of the open chunk's last comma; -1: none

    def add(self, token: int, weight: float) -> None:
        full = len(self.ids) == self.size
        if token == self.comma:
            self.last_comma = len(self.ids)
        elif full and self.last_comma >= 0 and self.size - self.last_comma <= self.backtrack:
            self._move_tail_after_comma()
            full = False
        if full:
            self.close()
        self.ids.append(token)
        self.weights.append(weight)

    def add_group(self, ids: Sequence[int], weight: float) -> None:
        """An embedding's ids: kept together in one chunk (a new one when they do not fit), as A1111 does."""
        if len(ids) > self.size:
            raise SdlabError(f"an embedding of {len(ids)} vectors does not fit a chunk of {self.size} tokens")
        if len(self.ids) + len(ids) > self.size:
            self.close()
        self.ids += ids
        self.weights += [weight] * len(ids)

    def _move_tail_after_comma(self) -> None:
        cut = self.last_comma + 1
        tail = self.ids[cut:], self.weights[cut:]
        del self.ids[cut:], self.weights[cut:]
        self.close()
        self.ids, self.weights = tail

    def close(self) -> None:
        self.done.append((self.ids, self.weights))
        self.ids, self.weights, self.last_comma = [], [], -1

    def finish(self) -> list[tuple[list[int], list[float]]]:
        if self.ids or not self.done:
            self.close()
        return self.done


Extra = Mapping[str, Sequence[int]]  # an embedding's name -> the ids of its vectors (CLIPTextEmbeddings.extra_names)


def _substitute(tokens: list[int], names: list[tuple[list[int], Sequence[int]]]) -> Iterator[tuple[int, ...]]:
    """Tokens -> groups: an embedding's ids where its name's tokens stand (longest name first), else single tokens."""
    i = 0
    while i < len(tokens):
        for name, ids in names:
            if tokens[i : i + len(name)] == name:
                yield tuple(ids)
                i += len(name)
                break
        else:
            yield (tokens[i],)
            i += 1


def build_chunks(
    pieces: Sequence[Piece], tokenizer: Tokenizer, backtrack: int = COMMA_BACKTRACK, extra: Extra | None = None
) -> list[Chunk]:
    """Parsed prompt -> framed chunks of `tokenizer.cfg.max_length` ids (at least one). With `extra`, an
    embedding's name in the text becomes the ids of its vectors."""
    cfg = tokenizer.cfg
    builder = _ChunkBuilder(cfg.max_length - 2, tokenizer.vocab.ids[COMMA], backtrack)
    names = sorted(((tokenizer.encode(n), ids) for n, ids in (extra or {}).items()), key=lambda p: -len(p[0]))
    names = [(name, ids) for name, ids in names if name]
    for piece in pieces:
        if isinstance(piece, Break):
            builder.close()
            continue
        for group in _substitute(tokenizer.encode(piece.text), names):
            if len(group) == 1 and group[0] < tokenizer.vocab_size:
                builder.add(group[0], piece.weight)
            else:
                builder.add_group(group, piece.weight)
    return [_frame(ids, weights, tokenizer) for ids, weights in builder.finish()]


def _frame(ids: list[int], weights: list[float], tokenizer: Tokenizer) -> Chunk:
    cfg = tokenizer.cfg
    pad = cfg.max_length - 2 - len(ids)
    return Chunk(
        ids=(cfg.bos_token_id, *ids, cfg.eos_token_id, *[cfg.pad_token_id] * pad),
        weights=(1.0, *weights, 1.0, *[1.0] * pad),
    )


def tokenize_prompt(prompt: str, tokenizer: Tokenizer) -> list[Chunk]:
    """Prompt text -> its chunks (parse, then chunk)."""
    return build_chunks(parse_prompt_attention(prompt), tokenizer)


# --- 3. weights and encoders --------------------------------------------------------------------


def apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(n, L, D) hidden states, (n, L) token weights -> weighted (n, L, D), each chunk's mean kept."""
    if bool((weights == 1).all()):
        return hidden  # nothing to emphasise (and a chunk whose mean is 0 stays finite)
    weighted = hidden * weights.to(hidden.device, hidden.dtype)[..., None]  # (n, L, D)
    before = hidden.float().mean(dim=(1, 2), keepdim=True)  # (n, 1, 1)
    after = weighted.float().mean(dim=(1, 2), keepdim=True)
    ratio = torch.where(after == 0, torch.ones_like(after), before / after)  # a zero mean has no scale to keep
    return weighted * ratio.to(hidden.dtype)


def encode_chunks(
    chunks: Sequence[Chunk],
    encoder: CLIPTextModel,
    hidden_layer: int = -1,
    final_layer_norm: bool = True,
    pooled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunks -> (weighted hidden states (1, L * n, D), the first chunk's text feature (1, P) or None)."""
    device = next(encoder.parameters()).device
    ids = torch.tensor([c.ids for c in chunks], dtype=torch.long, device=device)  # (n, L)
    weights = torch.tensor([c.weights for c in chunks], device=device)  # (n, L)
    hidden, feature = encoder.encode(ids, hidden_layer, final_layer_norm, pooled)  # (n, L, D), (n, P)
    hidden = apply_emphasis(hidden, weights).reshape(1, -1, hidden.shape[-1])  # (1, L * n, D)
    return hidden, None if feature is None else feature[:1]


def _pooled_index(conditioners: Sequence[TextConditioner]) -> int | None:
    """The encoder whose projected feature is the pooled conditioning: the last one with a projection."""
    with_projection = [i for i, c in enumerate(conditioners) if c.encoder.projection_dim is not None]
    return with_projection[-1] if with_projection else None


def _skip_layers(conditioner: TextConditioner, clip_skip: int) -> int:
    """A1111's clip skip N: N - 1 layers earlier than configured (SD1: -1 -> -N), layer norm as configured."""
    if clip_skip < 1:
        raise SdlabError(f"clip_skip counts from 1 (the configured layer), got {clip_skip}")
    return conditioner.hidden_layer - (clip_skip - 1)


def _encode_with(
    pieces: Sequence[Piece],
    encoder: CLIPTextModel,
    tokenizer: Tokenizer,
    cond: TextConditioner,
    clip_skip: int,
    pooled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One encoder's weighted context (1, 77 * n, D) and, if asked, its first chunk's text feature."""
    chunks = build_chunks(pieces, tokenizer, extra=encoder.text_model.embeddings.extra_names)
    return encode_chunks(chunks, encoder, _skip_layers(cond, clip_skip), cond.final_layer_norm, pooled)


def encode_prompt(
    prompt: str,
    text_encoders: Sequence[CLIPTextModel],
    tokenizers: Sequence[Tokenizer],
    conditioners: tuple[TextConditioner, ...],
    clip_skip: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A1111 prompt -> (context (1, 77 * n, D_total), pooled (1, P) or None).

    One encoder, tokenizer and conditioner per text encoder of the model, in the config's order.
    `clip_skip` N > 1 takes the hidden state N - 1 layers before the configured one (A1111/diffusers'
    rule for SD1; diffusers' for SD2 and SDXL, where A1111 ignores clip skip by default).
    """
    if not len(text_encoders) == len(tokenizers) == len(conditioners):
        raise SdlabError(
            f"need one tokenizer and one conditioner per text encoder; got {len(text_encoders)} encoders, "
            f"{len(tokenizers)} tokenizers, {len(conditioners)} conditioners"
        )
    pieces = parse_prompt_attention(extract_networks(prompt)[0])
    pooled_at = _pooled_index(conditioners)
    contexts, pooled = [], None
    for i, (encoder, tokenizer, cond) in enumerate(zip(text_encoders, tokenizers, conditioners)):
        hidden, feature = _encode_with(pieces, encoder, tokenizer, cond, clip_skip, pooled=i == pooled_at)
        contexts.append(hidden)  # (1, 77 * n_i, D_i)
        if i == pooled_at:
            pooled = feature
    contexts = _same_chunk_count(contexts, text_encoders, tokenizers, conditioners, clip_skip)
    return torch.cat(contexts, dim=-1), pooled  # (1, 77 * n, D_total)


def _same_chunk_count(
    contexts: list[torch.Tensor],
    text_encoders: Sequence[CLIPTextModel],
    tokenizers: Sequence[Tokenizer],
    conditioners: Sequence[TextConditioner],
    clip_skip: int,
) -> list[torch.Tensor]:
    """Encoders can disagree on the chunk count (OpenCLIP tokenizers split every "!" off as the pad
    token); pad the shorter contexts with that encoder's empty-prompt chunk."""
    length = max(c.shape[1] for c in contexts)
    padded = []
    for context, encoder, tokenizer, cond in zip(contexts, text_encoders, tokenizers, conditioners):
        if context.shape[1] < length:
            empty, _ = _encode_with([Fragment("", 1.0)], encoder, tokenizer, cond, clip_skip)  # (1, 77, D)
            context = pad_chunks(context, length, empty)
        padded.append(context)
    return padded


# --- positive and negative prompts of different lengths ------------------------------------------


def pad_chunks(context: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """(B, L * n, D) -> (B, length, D) by appending copies of `empty`, the (1, L, D) empty-prompt context."""
    chunk = empty.shape[1]
    missing = length - context.shape[1]
    if missing < 0 or missing % chunk or context.shape[1] % chunk:
        raise SdlabError(
            f"cannot pad a context of {context.shape[1]} tokens to {length} with chunks of {chunk}; "
            "both must be whole numbers of chunks"
        )
    filler = empty.to(context).expand(context.shape[0], -1, -1).repeat(1, missing // chunk, 1)  # (B, missing, D)
    return torch.cat([context, filler], dim=1)


def pad_to_same_length(
    cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative contexts (B, 77 * n, D) -> both as long as the longer, the shorter padded with
    the empty prompt's context `empty` (1, 77, D), as A1111 does (`pad_cond_uncond`)."""
    length = max(cond.shape[1], uncond.shape[1])
    return pad_chunks(cond, length, empty), pad_chunks(uncond, length, empty)


def encode_prompt_pair(
    prompt: str,
    negative_prompt: str,
    text_encoders: Sequence[CLIPTextModel],
    tokenizers: Sequence[Tokenizer],
    conditioners: tuple[TextConditioner, ...],
    clip_skip: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(context, negative context, pooled, negative pooled), the contexts padded to the same length."""
    args = (text_encoders, tokenizers, conditioners, clip_skip)
    cond, pooled = encode_prompt(prompt, *args)
    uncond, negative_pooled = encode_prompt(negative_prompt, *args)
    if cond.shape[1] != uncond.shape[1]:
        empty, _ = encode_prompt("", *args)  # (1, 77, D_total)
        cond, uncond = pad_to_same_length(cond, uncond, empty)
    return cond, uncond, pooled, negative_pooled
