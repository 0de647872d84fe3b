"""A1111 prompt syntax, 75-token chunks and weighting; conditioning against diffusers' `encode_prompt`."""

from __future__ import annotations

import pytest
import torch

from sdlab.checkpoints.keymaps.clip import clip_from_transformers
from sdlab.config import PAD_WITH_EOS, PAD_WITH_ZERO, preset
from sdlab.errors import SdlabError
from sdlab.models.clip import CLIPTextModel
from sdlab.prompts import (
    BREAK,
    Fragment,
    apply_emphasis,
    encode_prompt,
    encode_prompt_pair,
    pad_chunks,
    pad_to_same_length,
    parse_prompt_attention,
    tokenize_prompt,
)
from sdlab.tokenizer import Tokenizer

TOL = 1e-4  # max abs difference, fp32
R, S = 1.1, 1 / 1.1  # round and square bracket multipliers
LONG = "(masterpiece:1.2), " + "cat, " * 100  # 202 tokens

# --- 1. parsing ---------------------------------------------------------------------------------------

PARSED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("a (red:1.5) cat", [("a ", 1.0), ("red", 1.5), (" cat", 1.0)]),
    ("((a))", [("a", 1.0 * R * R)]),
    ("[b]", [("b", S)]),
    ("[[b]]", [("b", 1.0 * S * S)]),
    ("\\(literal\\)", [("(literal)", 1.0)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("\\[x\\] a\\\\b c\\d", [("[x] a\\b cd", 1.0)]),  # \\ is a backslash, a lone \ is dropped
    ("a (b [c] d:1.2)", [("a ", 1.0), ("b ", 1.2), ("c", S * 1.2), (" d", 1.2)]),
    ("( a : 0.5 )", [(" a ", 0.5)]),
    ("(neg:-1)", [("neg", -1.0)]),
    ("(a:1.)(b:.5)", [("a", 1.0), ("b", 0.5)]),
    ("unclosed (paren", [("unclosed ", 1.0), ("paren", R)]),
    ("(unbalanced", [("unbalanced", R)]),
    ("((two) open", [("two", R * R), (" open", R)]),
    ("[unclosed", [("unclosed", S)]),
    ("stray) and] c:1.2)", [("stray) and] c:1.2)", 1.0)]),  # nothing open: literal
    ("[a:1.5]", [("a:1.5", S)]),  # an explicit weight only closes a round bracket
    ("(a [b) c]", [("a ", R), ("b", R * S), (" c", S)]),  # the two kinds nest independently
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),  # equal weights merge
    ("(a:1.2) (b:1.2)", [("a", 1.2), (" ", 1.0), ("b", 1.2)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("a: b", [("a: b", 1.0)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",  # the example in A1111's docstring
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), BREAK, (",b", 1.0)]),
    ("BREAK", [("", 1.0), BREAK, ("", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]),
    ("aBREAK BREAKfast Break break", [("aBREAK BREAKfast Break break", 1.0)]),  # not a word of its own
    (LONG, [("masterpiece", 1.2), (", " + "cat, " * 100, 1.0)]),
]


@pytest.mark.parametrize("prompt, expected", PARSED, ids=[p[:30] or "empty" for p, _ in PARSED])
def test_parse_prompt_attention(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


def test_parse_choices_where_a1111_misbehaves():
    # A1111 turns a bracketed BREAK into the token "break" with weight -1.1; here it still breaks
    assert parse_prompt_attention("(a BREAK b)") == [("a", R), BREAK, ("b", R)]
    # A1111 raises on float("1.2.3"); here it is text and ")" closes with 1.1
    assert parse_prompt_attention("(a:1.2.3)") == [("a:1.2.3", R)]


def test_fragments_are_named_tuples():
    (fragment,) = parse_prompt_attention("(x:2)")
    assert fragment == Fragment("x", 2.0) and fragment.text == "x" and fragment.weight == 2.0
    assert repr(BREAK) == "BREAK"


# --- 2. chunks ----------------------------------------------------------------------------------------

TOK = Tokenizer(PAD_WITH_EOS)
BOS, EOS = 49406, 49407
CAT, DOG, COMMA = (TOK.encode(w)[0] for w in ("cat", "dog", ","))


def body(chunk) -> list[int]:
    """A chunk's token ids between BOS and the first EOS."""
    ids = list(chunk.ids)
    assert ids[0] == BOS and len(ids) == 77
    return ids[1 : ids.index(EOS)]


def test_single_tokens_used_below():
    assert len({CAT, DOG, COMMA}) == 3 and TOK.encode("cat, dog") == [CAT, COMMA, DOG]


def test_short_prompt_is_framed_like_the_tokenizer():
    for pad in (PAD_WITH_EOS, PAD_WITH_ZERO):
        tok = Tokenizer(pad)
        (chunk,) = tokenize_prompt("a photo of a cat", tok)
        assert list(chunk.ids) == tok("a photo of a cat")[0].tolist()
        assert chunk.weights == (1.0,) * 77


@pytest.mark.parametrize("pad, pad_id", [(PAD_WITH_EOS, 49407), (PAD_WITH_ZERO, 0)], ids=["sd1", "openclip"])
def test_empty_prompt_is_one_padded_chunk(pad, pad_id):
    (chunk,) = tokenize_prompt("", Tokenizer(pad))
    assert chunk.ids == (BOS, EOS, *[pad_id] * 75)


def test_weights_follow_their_tokens():
    (chunk,) = tokenize_prompt("a (red:1.5) [cat]", TOK)
    assert chunk.weights[:5] == (1.0, 1.0, 1.5, S, 1.0) and set(chunk.weights[5:]) == {1.0}


@pytest.mark.parametrize("count, sizes", [(75, [75]), (76, [75, 1]), (150, [75, 75]), (200, [75, 75, 50])])
def test_chunks_hold_75_tokens(count, sizes):
    chunks = tokenize_prompt("cat " * count, TOK)
    assert [len(body(c)) for c in chunks] == sizes
    assert all(c.ids[0] == BOS and c.ids[76] == EOS for c in chunks)


def test_openclip_chunks_pad_with_zero():
    chunks = tokenize_prompt("cat " * 80, Tokenizer(PAD_WITH_ZERO))
    assert chunks[0].ids == (BOS, *[CAT] * 75, EOS)
    assert chunks[1].ids == (BOS, *[CAT] * 5, EOS, *[0] * 70)


def test_comma_backtrack_moves_the_words_after_the_last_comma():
    prompt = "cat " * 70 + ", " + "dog " * 10  # comma at 70, 5 from the chunk's end
    first, second = tokenize_prompt(prompt, TOK)
    assert body(first) == [CAT] * 70 + [COMMA]
    assert body(second) == [DOG] * 10


@pytest.mark.parametrize("cats, moved", [(55, True), (54, False)], ids=["20-back", "21-back"])
def test_comma_backtrack_reaches_back_20_tokens(cats, moved):
    prompt = "cat " * cats + ", " + "dog " * 30
    first, second = tokenize_prompt(prompt, TOK)
    if moved:
        assert body(first) == [CAT] * cats + [COMMA] and body(second) == [DOG] * 30
    else:
        assert body(first) == [CAT] * cats + [COMMA] + [DOG] * (74 - cats)
        assert len(body(second)) == 30 - (74 - cats)


def test_comma_backtrack_keeps_weights_with_their_tokens():
    first, second = tokenize_prompt("cat " * 70 + ", (dog:1.3) [dog] dog dog dog dog", TOK)  # 77 tokens
    assert body(first) == [CAT] * 70 + [COMMA] and set(first.weights) == {1.0}
    assert body(second) == [DOG] * 6 and second.weights[:8] == (1.0, 1.3, S, 1.0, 1.0, 1.0, 1.0, 1.0)


def test_comma_arriving_at_a_full_chunk_opens_the_next_one():
    first, second = tokenize_prompt("cat " * 75 + ", dog", TOK)
    assert body(first) == [CAT] * 75 and body(second) == [COMMA, DOG]


@pytest.mark.parametrize(
    "prompt, bodies",
    [
        ("cat BREAK dog", [[CAT], [DOG]]),
        ("BREAK dog", [[], [DOG]]),
        ("cat BREAK", [[CAT]]),
        ("cat BREAK BREAK dog", [[CAT], [], [DOG]]),
        ("cat " * 75 + "BREAK dog", [[CAT] * 75, [DOG]]),
        ("cat " * 60 + ", BREAK " + "dog " * 80, [[CAT] * 60 + [COMMA], [DOG] * 75, [DOG] * 5]),
    ],
    ids=["middle", "leading", "trailing", "double", "at-75", "resets-comma"],
)
def test_break_starts_a_new_chunk(prompt, bodies):
    assert [body(c) for c in tokenize_prompt(prompt, TOK)] == bodies


def test_long_prompt_chunks():
    chunks = tokenize_prompt(LONG, TOK)
    assert len(chunks) == 3 and sum(len(body(c)) for c in chunks) == 202
    assert chunks[0].weights[1] == 1.2  # "masterpiece"


# --- 3. weighting -------------------------------------------------------------------------------------


def test_emphasis_scales_tokens_and_keeps_each_chunk_mean():
    hidden = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(0)) + 0.5  # (n, L, D)
    before = hidden.clone()
    weights = torch.ones(2, 77)
    weights[0, 3] = 1.5
    weights[1, 10:12] = 0.8
    out = apply_emphasis(hidden, weights)
    assert torch.allclose(out.mean(dim=(1, 2)), hidden.mean(dim=(1, 2)), atol=1e-6)
    scale = out[0, 0] / hidden[0, 0]  # the rescale factor, the same for every element of the chunk
    assert torch.allclose(out[0, 3], hidden[0, 3] * 1.5 * scale[0], atol=1e-6)
    assert torch.allclose(out[0, 5], hidden[0, 5] * scale[0], atol=1e-6)
    assert torch.equal(apply_emphasis(hidden, torch.ones(2, 77)), hidden)  # unweighted: unchanged
    assert torch.equal(hidden, before)  # the input is not modified


# --- 4. conditioning ----------------------------------------------------------------------------------


def ours_from(hf_model, cfg) -> CLIPTextModel:
    ours = CLIPTextModel(cfg)
    ours.load_state_dict(clip_from_transformers(hf_model.state_dict(), cfg), strict=True)
    return ours.eval()


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


class Model:
    """A diffusers pipeline with random tiny encoders, and sdlab's encoders loaded with the same weights."""

    def __init__(self, name: str, seed: int) -> None:
        from tests.reference import diffusers_pipeline, text_encoders_of

        self.cfg = preset(name)
        self.pipe = diffusers_pipeline(self.cfg, seed=seed)
        self.hf = text_encoders_of(self.pipe)
        self.encoders = [ours_from(m, c.encoder) for m, c in zip(self.hf, self.cfg.text)]
        self.tokenizers = [Tokenizer(c.tokenizer) for c in self.cfg.text]

    def encode(self, prompt: str, clip_skip: int = 1):
        with torch.no_grad():
            return encode_prompt(prompt, self.encoders, self.tokenizers, self.cfg.text, clip_skip)

    def pair(self, prompt: str, negative: str):
        with torch.no_grad():
            return encode_prompt_pair(prompt, negative, self.encoders, self.tokenizers, self.cfg.text)

    def diffusers(self, prompt: str, negative: str = "blurry", clip_skip: int | None = None):
        with torch.no_grad():
            return self.pipe.encode_prompt(
                prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                negative_prompt=negative, clip_skip=clip_skip,
            )


@pytest.fixture(scope="module")
def sd1():
    pytest.importorskip("diffusers")
    return Model("tiny-sd1", seed=21)


@pytest.fixture(scope="module")
def sdxl():
    pytest.importorskip("diffusers")
    return Model("tiny-sdxl", seed=22)


SHORT = "a photo of an astronaut riding a horse, highly detailed"


def test_sd1_short_prompt_equals_diffusers(sd1):
    context, pooled = sd1.encode(SHORT)
    cond, uncond = sd1.diffusers(SHORT, negative="blurry")
    with torch.no_grad():
        ids = sd1.pipe.tokenizer(SHORT, padding="max_length", max_length=77, return_tensors="pt").input_ids
        direct = sd1.hf[0](ids)[0]  # transformers' CLIPTextModel(ids)[0]
    assert pooled is None and context.shape == (1, 77, 32)
    assert diff(context, cond) <= TOL and diff(context, direct) <= TOL
    assert diff(sd1.encode("blurry")[0], uncond) <= TOL


def test_sd1_clip_skip_2_is_diffusers_clip_skip_1(sd1):
    # diffusers' clip_skip: hidden_states[-(clip_skip + 1)], then the final LayerNorm. Its own code path
    # reaches for `text_encoder.text_model`, which transformers 5.x's flattened CLIPTextModel lacks, so
    # the same two steps are taken here on the transformers model.
    model = sd1.hf[0]
    with torch.no_grad():
        ids = sd1.pipe.tokenizer(SHORT, padding="max_length", max_length=77, return_tensors="pt").input_ids
        out = model(ids, output_hidden_states=True)
        expected = getattr(model, "text_model", model).final_layer_norm(out.hidden_states[-2])
    assert diff(sd1.encode(SHORT, clip_skip=2)[0], expected) <= TOL
    assert diff(sd1.encode(SHORT, clip_skip=2)[0], sd1.encode(SHORT)[0]) > 10 * TOL
    with pytest.raises(SdlabError, match="clip_skip"):
        sd1.encode(SHORT, clip_skip=0)


def test_sd1_weighted_prompt_is_the_unweighted_one_scaled(sd1):
    plain, _ = sd1.encode("a red cat")
    weighted, _ = sd1.encode("a (red:1.5) cat")
    ratio = plain.mean() / (plain * torch.tensor([1, 1, 1.5] + [1] * 74)[:, None]).mean()
    assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-6)
    assert diff(weighted[0, 2], plain[0, 2] * 1.5 * ratio) <= TOL  # "red"
    assert diff(weighted[0, 3], plain[0, 3] * ratio) <= TOL  # "cat"


def test_sd1_long_prompt_concatenates_chunks(sd1):
    context, _ = sd1.encode("cat " * 200)
    assert context.shape == (1, 3 * 77, 32)
    with torch.no_grad():
        for i, chunk in enumerate(tokenize_prompt("cat " * 200, sd1.tokenizers[0])):
            expected = sd1.hf[0](torch.tensor([chunk.ids]))[0]  # (1, 77, 32)
            assert diff(context[:, 77 * i : 77 * (i + 1)], expected) <= TOL


def test_sd2_uses_the_last_layer_with_zero_padding():
    cfg = preset("tiny-sd2")
    torch.manual_seed(0)
    encoder = CLIPTextModel(cfg.text[0].encoder).eval()
    tokenizer = Tokenizer(cfg.text[0].tokenizer)
    with torch.no_grad():
        context, pooled = encode_prompt(SHORT, [encoder], [tokenizer], cfg.text)
        expected = encoder(tokenizer(SHORT)).last_hidden_state
    assert pooled is None and tokenizer(SHORT)[0, -1] == 0
    assert torch.equal(context, expected)


def test_sdxl_short_prompt_equals_diffusers(sdxl):
    cond, uncond, pooled, negative_pooled = sdxl.pair(SHORT, "blurry")
    ref_cond, ref_uncond, ref_pooled, ref_negative_pooled = sdxl.diffusers(SHORT, negative="blurry")
    assert cond.shape == (1, 77, 32 + 48) and pooled.shape == (1, 32)
    assert diff(cond, ref_cond) <= TOL and diff(uncond, ref_uncond) <= TOL
    assert diff(pooled, ref_pooled) <= TOL and diff(negative_pooled, ref_negative_pooled) <= TOL


def test_sdxl_clip_skip_2_is_diffusers_clip_skip_1(sdxl):
    context, pooled = sdxl.encode(SHORT, clip_skip=2)
    ref, _, ref_pooled, _ = sdxl.diffusers(SHORT, clip_skip=1)
    assert diff(context, ref) <= TOL and diff(pooled, ref_pooled) <= TOL  # pooled stays the last layer's


def test_sdxl_long_prompt_pools_the_first_chunk(sdxl):
    context, pooled = sdxl.encode(LONG)
    assert context.shape == (1, 3 * 77, 80) and pooled.shape == (1, 32)
    first = tokenize_prompt(LONG, sdxl.tokenizers[1])[0]
    with torch.no_grad():
        expected = sdxl.hf[1](torch.tensor([first.ids])).text_embeds
    assert diff(pooled, expected) <= TOL


def test_sdxl_encoders_disagreeing_on_chunks_are_padded(sdxl):
    prompt = "wow" + "!" * 100  # one token for CLIP-L, 100 pad tokens for bigG's tokenizer
    assert [len(tokenize_prompt(prompt, t)) for t in sdxl.tokenizers] == [1, 2]
    context, _ = sdxl.encode(prompt)
    empty, _ = sdxl.encode("")
    assert context.shape == (1, 2 * 77, 80)
    assert torch.equal(context[:, 77:, :32], empty[:, :, :32])  # CLIP-L's second chunk: the empty prompt


def test_negative_prompt_is_padded_with_empty_chunks(sd1):
    cond, uncond, _, _ = sd1.pair("cat " * 100, "blurry")
    empty, _ = sd1.encode("")
    assert cond.shape == uncond.shape == (1, 2 * 77, 32)
    assert torch.equal(uncond[:, :77], sd1.encode("blurry")[0]) and torch.equal(uncond[:, 77:], empty)
    long, short = pad_to_same_length(uncond[:, :77], cond, empty)
    assert torch.equal(long, uncond) and torch.equal(short, cond)


def test_pad_chunks_needs_whole_chunks():
    empty = torch.zeros(1, 77, 4)
    assert pad_chunks(torch.ones(2, 77, 4), 231, empty).shape == (2, 231, 4)
    with pytest.raises(SdlabError, match="whole numbers of chunks"):
        pad_chunks(torch.ones(1, 77, 4), 100, empty)
    with pytest.raises(SdlabError, match="whole numbers of chunks"):
        pad_chunks(torch.ones(1, 154, 4), 77, empty)


def test_emphasis_of_a_zero_mean_chunk_stays_finite():
    from sdlab.prompts import apply_emphasis

    assert torch.equal(apply_emphasis(torch.zeros(1, 77, 8), torch.ones(1, 77)), torch.zeros(1, 77, 8))
    weights = torch.ones(1, 77)
    weights[0, 3] = 1.5
    assert torch.isfinite(apply_emphasis(torch.zeros(1, 77, 8), weights)).all()
