"""`sdlab serve` as a user runs it, and sdlab without the `server` extra."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

from sdlab.cli import main
from tests.server.wire import Client

WITHOUT_FASTAPI = """
import sys
sys.modules["fastapi"] = None  # as if the server extra were not installed
sys.modules["uvicorn"] = None
import sdlab, sdlab.api, sdlab.cli
assert "fastapi" not in sys.modules or sys.modules["fastapi"] is None
sys.exit(sdlab.cli.main(["serve", "--model", "anything"]))
"""


def test_sdlab_works_without_the_server_extra():
    run = subprocess.run([sys.executable, "-c", WITHOUT_FASTAPI], capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and "pip install 'sdlab[server]'" in run.stderr


def test_bad_serve_options_are_one_line(tmp_path, capsys):
    assert main(["serve", "--models-dir", str(tmp_path / "missing")]) == 1
    assert "not a folder" in capsys.readouterr().err
    assert main(["serve", "--models-dir", str(tmp_path)]) == 1
    assert "no models" in capsys.readouterr().err
    assert main(["serve", "--models-dir", str(tmp_path), "--queue", "0"]) == 1
    assert "--queue" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sdlab_serve_runs_and_stops(models_dir):
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sdlab.cli", "serve", "--models-dir", str(models_dir), "--model", "beta",
         "--port", str(port), "--auth", "tok", "--queue", "2", "--max-steps", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        client = Client(port, "Bearer tok")
        deadline = time.monotonic() + 120
        while True:
            try:
                reply = client.get("/sdapi/v1/options", timeout=5)
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        assert reply.status == 200 and reply.json()["sd_model_checkpoint"].startswith("beta [")
        assert Client(port).get("/sdapi/v1/options").status == 401
        too_long = client.post("/sdapi/v1/txt2img", {"prompt": "x", "steps": 11, "width": 32, "height": 32})
        assert too_long.status == 422 and "steps" in too_long.json()["errors"]
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0]
    assert process.returncode in (0, 130) and "Traceback" not in output, output  # 130: stopped by Ctrl-C
