"""LoRA and textual inversion through the AUTOMATIC1111 API: clients name LoRAs in prompts (never paths),
the server lists what its folders hold, and an unknown name is a 4xx."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdlab.checkpoints.embeddings import Embedding, write_embedding
from sdlab.checkpoints.lora import write_lora
from sdlab.config import preset
from sdlab.models.lora import LowRank
from tests.server.conftest import FAST, start
from tests.server.wire import png_from_b64

CFG = preset("tiny-sd1")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("networks")
    g = torch.Generator().manual_seed(0)
    width = CFG.unet.block_out_channels[0]
    layer = "input_blocks.1.1.transformer_blocks.0.attn2.to_v"  # (width, context) — strong on every image
    update = LowRank(4.0, torch.randn(4, CFG.unet.cross_attention_dim, generator=g), torch.randn(width, 4, generator=g))
    write_lora(root / "loras" / "styles" / "ink.safetensors", {"unet": {layer: update}}, CFG.unet, sdxl=False)
    vectors = torch.randn(2, CFG.text[0].encoder.hidden_size, generator=g)
    write_embedding(root / "embeddings" / "inkstyle.safetensors", Embedding("inkstyle", (vectors,)))
    return root


@pytest.fixture(scope="module")
def client(models_dir, folders):
    running = start(models_dir, lora_dirs=(str(folders / "loras"),), embeddings_dirs=(str(folders / "embeddings"),))
    yield running.client()
    running.stop()


def _image(reply) -> np.ndarray:
    assert reply.status == 200, reply.text
    return np.asarray(png_from_b64(reply.json()["images"][0])).astype(int)


def test_loras_and_embeddings_are_listed(client):
    loras = client.get("/sdapi/v1/loras").json()
    assert [(x["name"], x["alias"]) for x in loras] == [("ink", "ink")]
    client.post("/sdapi/v1/txt2img", {"prompt": "warm up", "seed": 1, **FAST})  # the model is loaded by now
    loaded = client.get("/sdapi/v1/embeddings").json()["loaded"]
    assert loaded == {"inkstyle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                   "shape": CFG.text[0].encoder.hidden_size, "vectors": 2}}


def test_prompt_tags_apply_the_lora_and_are_recorded(client):
    plain = _image(client.post("/sdapi/v1/txt2img", {"prompt": "a cat", "seed": 5, **FAST}))
    reply = client.post("/sdapi/v1/txt2img", {"prompt": "a cat <lora:ink:1>", "seed": 5, **FAST})
    tagged = _image(reply)
    assert np.abs(tagged - plain).max() > 10
    info = json.loads(reply.json()["info"])
    assert 'Lora hashes: "ink: ' in info["infotexts"][0]
    again = _image(client.post("/sdapi/v1/txt2img", {"prompt": "a cat", "seed": 5, **FAST}))
    assert np.array_equal(again, plain)  # the next request without the tag: the model as loaded


def test_embedding_names_change_the_image(client):
    plain = _image(client.post("/sdapi/v1/txt2img", {"prompt": "a cat in a style", "seed": 5, **FAST}))
    styled = _image(client.post("/sdapi/v1/txt2img", {"prompt": "a cat in inkstyle", "seed": 5, **FAST}))
    assert np.abs(styled - plain).max() > 0


def test_unknown_lora_is_a_client_error(client):
    reply = client.post("/sdapi/v1/txt2img", {"prompt": "a cat <lora:../../etc/passwd:1>", "seed": 5, **FAST})
    assert 400 <= reply.status < 500 and "not found" in reply.text
