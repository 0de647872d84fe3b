"""AUTOMATIC1111's `parameters` text: written as A1111 writes it, read back to the same settings."""

from __future__ import annotations

import pytest
from PIL import Image

from sdlab.errors import SdlabError
from sdlab.pipelines.images import read_png_text, save_png
from sdlab.pipelines.metadata import format_parameters, parse_parameters

A1111_SAMPLE = (
    "a photo of a cat, (masterpiece:1.2)\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 965400086, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
)


def test_parses_an_a1111_infotext():
    prompt, negative, pairs = parse_parameters(A1111_SAMPLE)
    assert prompt == "a photo of a cat, (masterpiece:1.2)"
    assert negative == "blurry, lowres"
    assert pairs == {
        "Steps": "20", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7", "Seed": "965400086",
        "Size": "512x768", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "Version": "v1.10.1",
    }


def test_format_matches_a1111_and_round_trips():
    pairs = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7", "Seed": 965400086,
             "Size": "512x768", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "Version": "v1.10.1"}
    text = format_parameters("a photo of a cat, (masterpiece:1.2)", "blurry, lowres", pairs)
    assert text == A1111_SAMPLE
    assert parse_parameters(text)[2] == {k: str(v) for k, v in pairs.items()}


def test_quoting_multiline_and_no_negative():
    pairs = {"Steps": 5, "Model": 'odd, "name": here', "Seed": 1}
    text = format_parameters("line one\nline two", "", pairs)
    assert "Negative prompt" not in text
    assert 'Model: "odd, \\"name\\": here"' in text
    prompt, negative, parsed = parse_parameters(text)
    assert prompt == "line one\nline two" and negative == ""
    assert parsed["Model"] == 'odd, "name": here' and parsed["Seed"] == "1"


def test_png_text_chunks_round_trip(tmp_path):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", {"parameters": A1111_SAMPLE, "sdlab": "{}"})
    assert read_png_text(path) == {"parameters": A1111_SAMPLE, "sdlab": "{}"}
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_unreadable_image_is_one_line(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(SdlabError, match="not a readable image"):
        read_png_text(tmp_path / "x.png")
    with pytest.raises(SdlabError, match="no such file"):
        read_png_text(tmp_path / "missing.png")
