"""The CLIP byte-level BPE tokenizer (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision"), giving the same ids as transformers' `CLIPTokenizer`.

Text -> ids, in the order transformers (v5, backed by the `tokenizers` library) applies it:

1. special tokens: the literal strings of BOS, EOS and PAD split the text first and map straight
   to their ids (case-sensitive, never normalised). With PAD = "!" (OpenCLIP models) every "!" in
   a prompt is therefore id 0 on its own, as it is in transformers.
2. normalise each remaining span: Unicode NFC, every whitespace run -> one space, lower case
   character by character (so a word-final "Σ" becomes "σ", not "ς"). No ftfy, no HTML unescaping.
3. pre-tokenise with CLIP's regex into letter runs, single digits, runs of other symbols and the
   English contractions; whitespace is dropped.
4. map each piece's UTF-8 bytes to printable characters (GPT-2's byte table), mark its last
   character as end of word ("</w>") and apply the learned merges, lowest rank first.
"""

from __future__ import annotations

import functools
import gzip
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import regex
import torch

from sdlab.config import TokenizerConfig

VOCAB_RESOURCE = "bpe_simple_vocab_16e6.txt.gz"  # in the sdlab.data package
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file
BOS_TEXT = "<|startoftext|>"
EOS_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
BPE_CACHE_SIZE = 1 << 16  # distinct words remembered per process

# Step 3. A special token's text that survives to here (e.g. from "<|EndOfText|>") is one piece,
# which the byte-level stage then splits again into "<|", the name, and "|>".
_PIECE = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"
)
_SPECIAL_PIECE = regex.compile(r"(<\|)(startoftext|endoftext)(\|>)")
_WHITESPACE = regex.compile(r"\s+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte 0..255 -> a printable character (printable Latin-1 bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHARS = bytes_to_unicode()
_CHAR_BYTES = {c: b for b, c in _BYTE_CHARS.items()}


@dataclass(frozen=True)
class Vocabulary:
    """The 49,408 CLIP tokens and the merge ranks, read once from the package data."""

    tokens: tuple[str, ...]  # id -> token text
    ids: dict[str, int]  # token text -> id
    ranks: dict[tuple[str, str], int]  # merge pair -> priority (lower merges first)


@functools.cache
def load_vocabulary() -> Vocabulary:
    """Bytes, bytes + "</w>", one token per merge, then BOS and EOS — the order that fixes the ids."""
    data = resources.files("sdlab.data").joinpath(VOCAB_RESOURCE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    byte_chars = list(_BYTE_CHARS.values())
    tokens = (
        *byte_chars,
        *(c + END_OF_WORD for c in byte_chars),
        *("".join(pair) for pair in merges),
        BOS_TEXT,
        EOS_TEXT,
    )
    return Vocabulary(
        tokens=tokens,
        ids={t: i for i, t in enumerate(tokens)},
        ranks={pair: rank for rank, pair in enumerate(merges)},  # type: ignore[misc]
    )


def normalize(text: str) -> str:
    """NFC, whitespace runs -> " ", then lower case one character at a time."""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    # str.lower() alone would give a word-final capital sigma the final form "ς"; per character it is "σ".
    return text.replace("Σ", "σ").lower()


def pre_tokenize(text: str) -> list[str]:
    """Normalised text -> the pieces BPE sees."""
    pieces: list[str] = []
    for piece in _PIECE.findall(text):
        special = _SPECIAL_PIECE.fullmatch(piece)
        pieces.extend(special.groups() if special else (piece,))
    return pieces


@functools.lru_cache(maxsize=BPE_CACHE_SIZE)
def bpe(piece: str) -> tuple[int, ...]:
    """One pre-tokenised piece -> token ids."""
    vocab = load_vocabulary()
    chars = "".join(_BYTE_CHARS[b] for b in piece.encode("utf-8"))
    symbols = [*chars[:-1], chars[-1] + END_OF_WORD]
    while len(symbols) > 1:
        pairs = zip(symbols, symbols[1:])
        best = min(pairs, key=lambda pair: vocab.ranks.get(pair, NUM_MERGES))
        if best not in vocab.ranks:
            break
        symbols = _merge(symbols, best)
    return tuple(vocab.ids[s] for s in symbols)


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every non-overlapping occurrence of `pair`, left to right, by its concatenation."""
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


class Tokenizer:
    """Prompt text -> CLIP token ids, identical to transformers' `CLIPTokenizer` with the same PAD token."""

    def __init__(self, cfg: TokenizerConfig = TokenizerConfig()) -> None:
        self.cfg = cfg
        self.vocab = load_vocabulary()
        self.special_ids = {self.vocab.tokens[i]: i for i in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)}
        # longest first, so that the leftmost match is also the longest one
        alternatives = sorted(self.special_ids, key=len, reverse=True)
        self._special = regex.compile("(" + "|".join(regex.escape(t) for t in alternatives) + ")")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab.tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`: no BOS/EOS, no truncation."""
        ids: list[int] = []
        # split() with a capturing group alternates: plain text, special, plain text, ...
        for i, span in enumerate(self._special.split(text)):
            if i % 2:
                ids.append(self.special_ids[span])
            else:
                for piece in pre_tokenize(normalize(span)):
                    ids.extend(bpe(piece))
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Ids -> text: each end of word becomes a space (so "a, b" comes back as "a , b")."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        special = set(self.special_ids.values())
        tokens = [self.vocab.tokens[i] for i in ids if not (skip_special_tokens and i in special)]
        data = bytes(_CHAR_BYTES[c] for c in "".join(tokens))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> (B, max_length) int64: BOS, ids cut to fit, EOS, then PAD."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self._frame(self.encode(t)) for t in texts]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.cfg.max_length)  # (B, L)

    def _frame(self, ids: list[int]) -> list[int]:
        cfg = self.cfg
        row = [cfg.bos_token_id, *ids[: cfg.max_length - 2], cfg.eos_token_id]
        return row + [cfg.pad_token_id] * (cfg.max_length - len(row))


def write_transformers_files(folder: Path | str, cfg: TokenizerConfig = TokenizerConfig()) -> None:
    """Write the tokenizer as a diffusers `tokenizer/` folder: vocab.json, merges.txt and the two JSON
    files that name the special tokens (transformers' `CLIPTokenizer.from_pretrained` reads it back)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = load_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab.ids, ensure_ascii=False), encoding="utf-8")
    merges = "".join(f"{a} {b}\n" for a, b in vocab.ranks)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    special = {
        "bos_token": vocab.tokens[cfg.bos_token_id],
        "eos_token": vocab.tokens[cfg.eos_token_id],
        "pad_token": vocab.tokens[cfg.pad_token_id],
        "unk_token": EOS_TEXT,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": cfg.max_length, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
