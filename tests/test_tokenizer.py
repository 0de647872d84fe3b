"""sdlab's CLIP tokenizer gives transformers' CLIPTokenizer ids, built from the same vocabulary file."""

from __future__ import annotations

import gzip
import json
import random
from importlib import resources
from pathlib import Path

import pytest
import torch

from sdlab.config import PAD_WITH_EOS, PAD_WITH_ZERO, TokenizerConfig
from sdlab.tokenizer import Tokenizer, load_vocabulary, write_transformers_files

transformers = pytest.importorskip("transformers")

NUM_PROMPTS = 2400
PAD_TEXT = {49407: "<|endoftext|>", 0: "!"}  # what the diffusers repos' special_tokens_map.json name as pad_token

# --- a deterministic prompt corpus -----------------------------------------------------------------

WORDS = (
    "a photo of an astronaut riding horse on mars masterpiece best quality highly detailed portrait woman man "
    "cat dog castle landscape sunset oil painting by greg rutkowski trending artstation 8k uhd dslr soft lighting "
    "cinematic bokeh cyberpunk city night neon rain reflections studio ghibli anime style watercolor sketch "
    "photorealistic octane render unreal engine volumetric fog golden hour wide angle lens close-up macro "
    "ugly blurry lowres bad anatomy extra fingers watermark text signature jpeg artifacts deformed"
).split()
ACCENTED = [
    "café", "naïve", "Ångström", "Straße", "ÆØÅ", "Łódź", "İstanbul", "ΟΔΟΣ", "Ελληνικά", "Москва", "Київ",
    "עברית", "العربية", "हिन्दी", "ไทย", "한국어", "Việt Nam", "crème brûlée", "e\u0301te\u0301", "A\u030angstro\u0308m",
    "ǅemal", "ﬁne", "ＡＢＣ１２３", "mañana", "São Paulo", "Ørsted", "þorn", "ǰ", "ΣΊΣΥΦΟΣ", "ß ẞ", "ﬀ", "Ⅻ",
]
CJK = ["日本語", "東京タワー", "中文", "汉字", "漢字", "カタカナ", "ひらがな", "猫", "桜の花", "北京", "한글", "々〆"]
EMOJI = [
    "😀", "👍🏽", "👨\u200d👩\u200d👧", "🇯🇵", "❤️", "✨", "🔥", "🐱", "🌸🌸", "🏳️\u200d🌈", "☕", "🤖", "0️⃣", "💯",
]
NUMBERS = [
    "3.14", "1,000", "1e-5", "-2", "8k", "4K", "1920x1080", "50%", "½", "²", "①", "٣", "१२", "ⅷ", "0.5", "2024",
    "v1.5", "f/1.8", "35mm", "1:1", "16:9", "#1", "$100", "€5", "+7", "00123", "3rd", "42nd",
]
SYNTAX = [
    "({w}:1.3)", "(({w}))", "[{w}]", "[[{w}]]", "\\({w}\\)", "{{{w}|{w}}}", "<lora:{w}:0.8>", "({w}:.5)", "BREAK",
    "[{w}:{w}:0.5]", "({w})", "{w}++", "{w}--", "({w}:1.2)(({w}))", "<|endoftext|>", "<|startoftext|>",
    "<|EndOfText|>", "{w}<|endoftext|>!!", "!{w}!", "{w}!!!", "!!!", "<|endoftext|>{w}", "<<|startoftext|>>",
]
ENTITIES = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&#x27;", "&nbsp;", "&copy;", "AT&T", "&amp;amp;"]
CONTRACTIONS = [
    "it's", "don't", "I'm", "we're", "they've", "you'll", "he'd", "IT'S", "DON'T", "We'Re", "it’s", "o'clock",
    "rock'n'roll", "'''quoted'''", "'s", "''", "can't've", "y'all", "'tis", "James'", "'ll'd",
]
PUNCT = list(",.!?;:-_/\\|@#$%^&*+=~`\"'<>{}[]()") + ["...", "…", "—", "–", "«", "»", "¿", "¡", "·", "•", "©", "®",
                                                        "™", "°", "§", "¶", "†", "→", "★", "♪", "“", "”", "„", "‹›"]
SPACES = [" ", " ", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2009", "\x0b", "\x0c", "\x85", "\u2028",
          " \n\t ", "", ""]
ODD = ["\x00", "\x1c", "\x1f", "\u200b", "\u200d", "\ufeff", "\ufffd", "\u0301", "\x7f", "\u00ad", "\U0001d400"]


def _word(rng: random.Random) -> str:
    word = rng.choice(WORDS)
    case = rng.random()
    if case < 0.1:
        return word.upper()
    if case < 0.2:
        return word.title()
    if case < 0.25:
        return "".join(c.upper() if rng.random() < 0.5 else c for c in word)
    return word


def _fragment(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        return _word(rng)
    if kind < 0.55:
        return rng.choice(SYNTAX).format(w=_word(rng))
    pool = rng.choice([ACCENTED, CJK, EMOJI, NUMBERS, ENTITIES, CONTRACTIONS, PUNCT, PUNCT, ODD])
    return rng.choice(pool)


def _prompt(rng: random.Random) -> str:
    count = rng.randint(40, 160) if rng.random() < 0.1 else rng.randint(1, 14)  # some far over 77 tokens
    parts = [_fragment(rng) for _ in range(count)]
    text = "".join(part + rng.choice(SPACES + [", ", ","]) for part in parts)
    return text if rng.random() < 0.7 else rng.choice(SPACES) + text  # sometimes leading whitespace


def prompts() -> list[str]:
    rng = random.Random(20240521)
    fixed = ["", " ", "a photo of a cat", "A PHOTO OF A CAT", "(masterpiece:1.2), best quality, 1girl, solo"]
    return fixed + [_prompt(rng) for _ in range(NUM_PROMPTS - len(fixed))]


# --- the reference tokenizer, built from the same .gz ---------------------------------------------


def _byte_table() -> list[str]:
    """OpenAI's bytes_to_unicode values in byte order (written out again here, independent of sdlab)."""
    keep = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    extra = iter(range(256, 512))
    chars = {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}
    printable_first = sorted(keep) + [b for b in range(256) if b not in keep]
    return [chars[b] for b in printable_first]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    """vocab.json and merges.txt as the diffusers repos ship them, derived from sdlab's package data."""
    raw = resources.files("sdlab.data").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = _byte_table()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module", params=[PAD_WITH_EOS, PAD_WITH_ZERO], ids=["pad-eos", "pad-zero"])
def pair(request, vocab_dir):
    """(sdlab tokenizer, transformers tokenizer) for one padding convention."""
    cfg: TokenizerConfig = request.param
    # `CLIPTokenizer(vocab_file=..., merges_file=...)` silently ignores both files in transformers 5;
    # from_pretrained on the folder reads them, as it does a diffusers `tokenizer/` folder.
    reference = transformers.CLIPTokenizer.from_pretrained(vocab_dir, pad_token=PAD_TEXT[cfg.pad_token_id])
    assert len(reference) == 49408 and reference.pad_token_id == cfg.pad_token_id
    return Tokenizer(cfg), reference


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return prompts()


# --- tests -------------------------------------------------------------------------------------------


def test_corpus_is_varied(corpus):
    text = "".join(corpus)
    assert len(corpus) >= 2000 and len(set(corpus)) > 0.95 * len(corpus)
    for sample in ("日本", "🇯🇵", "(", ":1.3)", "\\(", "&amp;", "'s", "\t", "\n", "\u3000", "3.14", "é", "<|endoftext|>"):
        assert sample in text, sample
    assert sum(len(Tokenizer().encode(p)) > 77 for p in corpus[:500]) > 20


def test_known_ids():
    ids = Tokenizer()("a photo of a cat")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert set(ids[0, 7:].tolist()) == {49407}
    assert set(Tokenizer(PAD_WITH_ZERO)("a photo of a cat")[0, 7:].tolist()) == {0}


def test_encode_matches_transformers(pair, corpus):
    ours, reference = pair
    expected = reference(corpus, add_special_tokens=False)["input_ids"]
    mismatches = [(p, e, ours.encode(p)) for p, e in zip(corpus, expected) if ours.encode(p) != e]
    assert not mismatches, f"{len(mismatches)} prompts differ, first: {mismatches[0]!r}"


def test_padded_batch_matches_transformers(pair, corpus):
    ours, reference = pair
    expected = reference(corpus, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    got = ours(corpus)
    assert got.shape == (len(corpus), 77) and got.dtype == torch.long
    assert torch.equal(got, expected["input_ids"])
    long_rows = torch.tensor([len(ours.encode(p)) >= 76 for p in corpus])
    assert long_rows.any() and (got[long_rows, -1] == ours.cfg.eos_token_id).all()


def test_decode_matches_transformers(pair, corpus):
    ours, reference = pair
    for text in corpus[:300]:
        ids = reference(text)["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def test_decode_round_trips_plain_text():
    tok = Tokenizer()
    rng = random.Random(7)
    plain = [w for w in WORDS if w.isalpha()]  # "close-up" comes back as "close - up", "8k" as "8 k"
    for _ in range(200):
        text = " ".join(rng.choice(plain) for _ in range(rng.randint(1, 30)))
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok("a photo of a cat")[0], skip_special_tokens=True) == "a photo of a cat"


def test_single_string_and_list_give_the_same_rows():
    tok = Tokenizer()
    assert torch.equal(tok("a cat"), tok(["a cat"]))
    assert tok([]).shape == (0, 77)


def test_vocabulary_is_read_once():
    assert Tokenizer().vocab is Tokenizer(PAD_WITH_ZERO).vocab is load_vocabulary()
    assert len(load_vocabulary().tokens) == 49408


@pytest.mark.parametrize("cfg", [PAD_WITH_EOS, PAD_WITH_ZERO], ids=["pad-eos", "pad-zero"])
def test_written_files_are_the_reference_files(cfg, vocab_dir, tmp_path, corpus):
    write_transformers_files(tmp_path, cfg)
    def read(folder: Path, name: str) -> str:
        return (folder / name).read_text(encoding="utf-8")

    assert json.loads(read(tmp_path, "vocab.json")) == json.loads(read(vocab_dir, "vocab.json"))
    assert read(tmp_path, "merges.txt") == read(vocab_dir, "merges.txt")
    reference = transformers.CLIPTokenizer.from_pretrained(tmp_path)  # pad token from the files alone
    assert reference.pad_token_id == cfg.pad_token_id and reference.model_max_length == cfg.max_length
    sample = corpus[:200]
    expected = reference(sample, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(Tokenizer(cfg)(sample), expected["input_ids"])
