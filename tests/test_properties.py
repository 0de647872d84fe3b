"""Property-based tests of the text sdlab parses from people and other programs: prompts (A1111's
attention syntax, extra-network tags, embeddings) and the PNG `parameters` text. Any input gives a
result or a one-line SdlabError — never another exception — and the results keep their invariants."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdlab.errors import SdlabError
from sdlab.pipelines.metadata import format_parameters, parse_parameters
from sdlab.prompts import BREAK, Fragment, build_chunks, extract_networks, parse_prompt_attention
from sdlab.tokenizer import Tokenizer
from tests.hostile import count

CASES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
SYNTAX = st.sampled_from(["(", ")", "[", "]", ":", "\\", " ", ",", "BREAK", ":1.5)", ":-2)", ":999999999999999)",
                          "<lora:", ">", "<lora:x:0.5>", "<hypernet:y>", "a", "cat", "é", "🙂", "\n", "!"])
PROMPTS = st.lists(SYNTAX | st.text(max_size=6), max_size=40).map("".join) | st.text(max_size=200)
TOKENIZER = Tokenizer()


def _parse(prompt: str):
    try:
        text, tags = extract_networks(prompt)
        return parse_prompt_attention(text), tags
    except SdlabError as e:
        assert "\n" not in str(e) and str(e)
        return None


@CASES
@given(PROMPTS)
def test_any_prompt_parses_to_finite_weights_or_one_line(prompt):
    count("property: prompts")
    parsed = _parse(prompt)
    if parsed is None:
        return
    pieces, tags = parsed
    assert pieces, "at least one fragment"
    for piece in pieces:
        assert piece is BREAK or (isinstance(piece, Fragment) and math.isfinite(piece.weight))
    for tag in tags:
        assert tag.name and math.isfinite(tag.te_weight) and math.isfinite(tag.unet_weight)
    chunks = build_chunks(pieces, TOKENIZER)
    assert chunks and all(len(c.ids) == len(c.weights) == 77 for c in chunks)
    assert all(math.isfinite(w) for c in chunks for w in c.weights)


@CASES
@given(st.text(max_size=300))
def test_any_parameters_text_parses(text):
    count("property: parameters texts")
    prompt, negative, pairs = parse_parameters(text)
    assert isinstance(prompt, str) and isinstance(negative, str) and all(isinstance(k, str) for k in pairs)


VALUES = st.text(max_size=20).filter(lambda t: t == t.strip() and "\n" not in t and t) | st.integers()
KEYS = st.from_regex(r"[A-Za-z][A-Za-z ]{0,10}[A-Za-z]", fullmatch=True)


@CASES
@given(prompt=st.text(max_size=80).filter(lambda t: "Negative prompt: " not in t and ":" not in t),
       negative=st.text(max_size=40).filter(lambda t: "\n" not in t),
       pairs=st.dictionaries(KEYS, VALUES, max_size=5))
def test_parameters_round_trip(prompt, negative, pairs):
    count("property: parameters round trips")
    values = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, **pairs}
    got_prompt, got_negative, got = parse_parameters(format_parameters(prompt, negative, values))
    assert got == {k: str(v) for k, v in values.items()}
    assert got_prompt == prompt.strip("\n") or "\n" in prompt  # a1111 strips the text's outer newlines
    assert got_negative == negative


def test_overflowing_emphasis_is_one_line():
    for prompt in ["(" * 8000 + "a", "(a:" + "9" * 400 + ")"]:
        try:
            parse_prompt_attention(prompt)
        except SdlabError as e:
            assert "overflows" in str(e)
        else:
            raise AssertionError(f"{prompt[:20]}… parsed to an infinite weight")
