"""Soak test of `sdlab serve`: clients hammer a server for a while; its memory must stay flat, no request
may be lost, and every response must be an image or a 4xx / 429. Run by hand (it takes `--minutes`):

    python benchmarks/soak.py --minutes 30 --clients 6            # prints a Markdown block for RESULTS.md

The server runs as its own process (`sdlab serve`, sdlab's own model, a queue of 4, small limits), so its
resident memory is read from /proc. The clients mix: valid txt2img and img2img requests, invalid ones
(bad sampler, too many steps, malformed JSON, a broken image), progress polls, interrupts, and LoRA tags
naming nothing. A request that raises, times out or gets a 5xx is
"lost"; a 429 is the queue saying no, which a client may retry.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
INTERRUPTED = 299  # reported as "200, no images (interrupted)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def png_b64(seed: int) -> str:
    image = Image.new("RGB", (64, 64), (seed * 37 % 256, 90, 160))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class Client:
    def __init__(self, port: int):
        self.port = port

    def call(self, method: str, path: str, body=None, raw: bytes | None = None) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            response = conn.getresponse()
            payload = response.read()
            if response.status == 200 and path.endswith("2img"):
                images = json.loads(payload)["images"]
                if not all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images):
                    raise ValueError("a 200 whose images are not PNGs")
                if not images:  # an interrupt stopped the job before its first image: A1111 answers so too
                    return INTERRUPTED
            return response.status
        finally:
            conn.close()


def one_request(client: Client, rng: random.Random) -> tuple[str, int]:
    kind = rng.choices(
        ["txt2img", "img2img", "invalid", "malformed", "broken-image", "progress", "interrupt", "lora-tag", "options"],
        weights=[30, 10, 12, 5, 5, 20, 3, 5, 5],
    )[0]
    small = {"steps": rng.randint(2, 6), "width": 64, "height": 64, "seed": rng.randint(0, 10**6)}
    if kind == "txt2img":
        return kind, client.call("POST", "/sdapi/v1/txt2img", {"prompt": "a red circle on a blue background", **small,
                                                                "batch_size": rng.randint(1, 2)})
    if kind == "img2img":
        return kind, client.call("POST", "/sdapi/v1/img2img", {"prompt": "a green star", "init_images": [png_b64(rng.randint(0, 9))],
                                                               "denoising_strength": 0.6, **small})
    if kind == "invalid":
        body = rng.choice([{"prompt": "x", "sampler_name": "nope"}, {"prompt": "x", "steps": 10**6},
                           {"prompt": "x", "width": 63}, {"prompt": "x", "cfg_scale": "many"}])
        return kind, client.call("POST", "/sdapi/v1/txt2img", body)
    if kind == "malformed":
        return kind, client.call("POST", "/sdapi/v1/txt2img", raw=b'{"prompt": "x", "steps": ')
    if kind == "broken-image":
        return kind, client.call("POST", "/sdapi/v1/img2img", {"prompt": "x", "init_images": ["bm90IGFuIGltYWdl"], **small})
    if kind == "progress":
        return kind, client.call("GET", "/sdapi/v1/progress")
    if kind == "interrupt":
        return kind, client.call("POST", "/sdapi/v1/interrupt")
    if kind == "lora-tag":
        return kind, client.call("POST", "/sdapi/v1/txt2img", {"prompt": "x <lora:nothing:1>", **small})
    return kind, client.call("GET", "/sdapi/v1/options")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--sample-seconds", type=float, default=10)
    args = p.parse_args()

    port = free_port()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "sdlab.cli", "serve", "--port", str(port), "--queue", "4",
                               "--max-size", "128x128", "--max-steps", "20", "--max-batch", "2"],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    client = Client(port)
    deadline = time.monotonic() + 120
    while True:
        try:
            if client.call("GET", "/sdapi/v1/options") == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            print("the server did not start", file=sys.stderr)
            return 1
        time.sleep(0.5)

    statuses: Counter = Counter()
    lost: list[str] = []
    lock = threading.Lock()
    end = time.monotonic() + 60 * args.minutes
    samples: list[tuple[float, float]] = []
    start = time.monotonic()

    def worker(index: int) -> None:
        rng = random.Random(index)
        while time.monotonic() < end:
            try:
                kind, status = one_request(Client(port), rng)
            except Exception as e:  # noqa: BLE001 — a request that raised is a lost request
                with lock:
                    lost.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                statuses[(kind, status)] += 1
                if status >= 500:
                    lost.append(f"{kind}: {status}")
            if status == 429:
                time.sleep(rng.uniform(0.2, 1.0))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    while time.monotonic() < end:
        samples.append((time.monotonic() - start, rss_mb(server.pid)))
        time.sleep(args.sample_seconds)
    for t in threads:
        t.join(600)
    samples.append((time.monotonic() - start, rss_mb(server.pid)))
    server.terminate()
    server.wait(60)

    warm = [m for t, m in samples if t >= 0.1 * 60 * args.minutes]  # after the first tenth: warmed up
    half = len(warm) // 2
    early, late = statistics.mean(warm[:half] or warm), statistics.mean(warm[half:] or warm)
    total = sum(statuses.values())
    unexpected = {k: v for k, v in statuses.items() if not (k[1] in (200, INTERRUPTED) or 400 <= k[1] < 500)}
    print(f"## Soak: `sdlab serve` under {args.clients} clients for {args.minutes:g} minutes ({time.strftime('%Y-%m-%d')})\n")
    print(f"- command: `python benchmarks/soak.py --minutes {args.minutes:g} --clients {args.clients}`")
    print(f"- requests: {total}; lost (raised, timed out or 5xx): {len(lost)}; other than 200/4xx: {sum(unexpected.values())}")
    print(f"- server RSS: start {samples[0][1]:.0f} MB, max {max(m for _, m in samples):.0f} MB, "
          f"mean of the first warm half {early:.0f} MB, of the second {late:.0f} MB ({late - early:+.0f} MB)\n")
    print("| request | status | count |\n|---|---|---|")
    for (kind, status), n in sorted(statuses.items()):
        print(f"| {kind} | {'200, no images (interrupted)' if status == INTERRUPTED else status} | {n} |")
    if lost:
        print("\nlost:", "; ".join(sorted(set(lost))[:10]))
    return 0 if not lost and not unexpected else 1


if __name__ == "__main__":
    sys.exit(main())
