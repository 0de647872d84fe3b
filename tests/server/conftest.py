"""Servers for the HTTP tests: tiny random models in a models folder, uvicorn on a free loopback port."""

from __future__ import annotations

import pytest

from sdlab.config import preset
from sdlab.server.app import ServerConfig
from sdlab.server.service import Limits
from tests.reference import diffusers_pipeline
from tests.server.wire import RunningServer

# tiny models make 32x32 images; generous steps so a job can be made long enough to catch mid-run
LIMITS = Limits(max_pixels=64 * 64, max_steps=5000, max_batch=16)
FAST = {"steps": 2, "width": 32, "height": 32}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """Two tiny SD1-style models (different weights) and a stray file that is not a model."""
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("alpha", 1), ("beta", 2)):
        diffusers_pipeline(preset("tiny-sd1"), seed=seed).save_pretrained(root / name)
    (root / "notes.txt").write_text("not a model")
    return root


def start(models_dir, **options) -> RunningServer:
    cfg = {"models_dir": str(models_dir), "model": "alpha", "queue": 8, "limits": LIMITS, "preview_interval": 0.0}
    return RunningServer(ServerConfig(**{**cfg, **options}))


@pytest.fixture(scope="module")
def server(models_dir):
    running = start(models_dir)
    yield running
    running.stop()


@pytest.fixture
def client(server):
    return server.client()
