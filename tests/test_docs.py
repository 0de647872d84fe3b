"""The lab guide and the script that makes its figures agree: every picture it shows exists, and every
table the script writes has its place in the guide."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_picture_the_guide_shows_is_there():
    guide = (DOCS / "lab.md").read_text()
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", guide)
    assert len(pictures) >= 10
    missing = [p for p in pictures if not (DOCS / p).is_file()]
    assert not missing, f"run docs/make_figures.py: {missing}"


def test_every_table_the_script_writes_has_markers_in_the_guide():
    script = (DOCS / "make_figures.py").read_text()
    written = set(re.findall(r'tables\["([a-z0-9-]+)"\]', script))
    assert {"trace", "flops", "sd15-flops", "resolutions", "guidance", "samplers"} <= written
    guide = (DOCS / "lab.md").read_text()
    for name in written:
        block = re.search(rf"<!-- made: {name} -->\n(.*?)<!-- /made: {name} -->", guide, re.S)
        assert block and block.group(1).strip(), f"{name}: no table between its markers"
