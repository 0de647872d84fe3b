"""Fixtures shared across the test tree."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The shipped default model's weights; a test that needs them skips on an install without them."""
    from sdlab.api import default_model
    from sdlab.errors import SdlabError

    try:
        return default_model()
    except SdlabError:
        pytest.skip("this install has no default model")


def pytest_terminal_summary(terminalreporter):
    """How many hostile files and fuzz cases the loaders were given (tests/hostile.py counts them)."""
    from tests.hostile import TRIED

    if TRIED:
        terminalreporter.write_sep("-", "hostile inputs tried")
        for kind, n in sorted(TRIED.items()):
            terminalreporter.write_line(f"{kind}: {n}")
