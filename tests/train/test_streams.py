"""WebDataset shards streamed from pipes and URLs: the same samples, in the same order, as the shards read
from disk; brace ranges expand as WebDataset expands them; failures are one line."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest
import torch

from sdlab.cli import main
from sdlab.errors import SdlabError
from sdlab.train.sources import TarShards
from sdlab.train.streams import expand_braces, is_stream, stream_samples
from tests.train.synthetic import write_shards


def test_brace_expansion():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x-{8..10}.tar") == ["a/x-8.tar", "a/x-9.tar", "a/x-10.tar", "b/x-8.tar",
                                                    "b/x-9.tar", "b/x-10.tar"]
    assert is_stream(["pipe:cat x.tar"]) and is_stream(["https://h/s.tar"]) and not is_stream(["local/*.tar"])
    with pytest.raises(SdlabError, match="backwards"):
        expand_braces("s-{3..1}.tar")


@pytest.fixture()
def served(tmp_path):
    shards = write_shards(tmp_path / "shards", count=10, per_shard=4)  # shard-00000 … shard-00002
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "shards"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield shards, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_pipes_and_urls_give_the_shards_samples_in_order(served, tmp_path):
    shards, url = served
    local = TarShards(shards, 32)
    expected = [local.read(i) for i in range(len(local))]
    folder = shards[0].parent
    for spec in ([f"pipe:cat {folder}/shard-{{00000..00002}}.tar"], [f"{url}/shard-{{00000..00002}}.tar"]):
        got = list(stream_samples(spec))
        assert [c for _, c in got] == [c for _, c in expected]
        assert all(a.tobytes() == b.tobytes() for (a, _), (b, _) in zip(got, expected))


def test_failures_are_one_line(served):
    shards, url = served
    with pytest.raises(SdlabError, match="could not fetch"):
        list(stream_samples([f"{url}/missing.tar"]))
    with pytest.raises(SdlabError, match="command failed"):
        list(stream_samples([f"pipe:cat {shards[0].parent}/missing.tar"]))
    with pytest.raises(SdlabError, match="not found"):
        list(stream_samples(["pipe:no-such-command-here x"]))


def test_finetune_on_streamed_shards_encodes_what_local_shards_do(served, tmp_path, default_model_path):
    shards, url = served
    quick = ["--steps", "1", "--batch", "2", "--precision", "fp32"]
    assert main(["finetune", "--data", *map(str, shards), "--out", str(tmp_path / "local"), *quick]) == 0
    assert main(["finetune", "--data", f"{url}/shard-{{00000..00002}}.tar", "--out", str(tmp_path / "http"), *quick]) == 0
    a = torch.load(tmp_path / "local" / "latents.pt", weights_only=True)
    b = torch.load(tmp_path / "http" / "latents.pt", weights_only=True)
    assert a["captions"] == b["captions"] and len(a["captions"]) == 10
    assert all(torch.equal(x, y) for x, y in zip(a["moments"], b["moments"]))
