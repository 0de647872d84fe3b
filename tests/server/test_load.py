"""A bounded load test on loopback: 8 clients × 10 A1111 requests against a queue of 4. Every request ends
as an image or a 429 (none lost, none duplicated, counted by seed) and /progress answers throughout."""

from __future__ import annotations

import json
import statistics
import threading
import time

import pytest

from tests.server.conftest import start
from tests.server.wire import png_from_b64

CLIENTS, REQUESTS, QUEUE = 8, 10, 4
PROGRESS_BOUND_S = 2.0  # the slowest /progress answer allowed while the worker is busy
TEST_BOUND_S = 60.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@pytest.mark.load
def test_eight_clients_against_a_queue_of_four(models_dir):
    server = start(models_dir, queue=QUEUE, preview_interval=1.0)
    outcomes: dict[int, tuple[str, float]] = {}  # seed -> ("image" | "429", seconds)
    problems: list[str] = []
    progress_times: list[float] = []
    stop = threading.Event()
    deadline = time.monotonic() + TEST_BOUND_S

    def client_loop(index: int) -> None:
        client = server.client()
        for i in range(REQUESTS):
            seed = 1000 * (index + 1) + i
            if time.monotonic() > deadline:
                problems.append(f"seed {seed}: not sent before the deadline")
                continue
            reply = client.post("/sdapi/v1/txt2img", {"prompt": f"client {index}", "seed": seed, "steps": 2,
                                                      "width": 32, "height": 32}, timeout=TEST_BOUND_S)
            if reply.status == 429:
                if int(reply.headers.get("retry-after", "0")) < 1:
                    problems.append(f"seed {seed}: 429 without Retry-After")
                outcomes[seed] = ("429", reply.seconds)
                time.sleep(0.02)
                continue
            if reply.status != 200:
                problems.append(f"seed {seed}: HTTP {reply.status} {reply.text[:200]}")
                continue
            out = reply.json()
            seeds = json.loads(out["info"])["all_seeds"]
            made = [png_from_b64(b).info["parameters"] for b in out["images"]]
            if seeds != [seed] or len(made) != 1 or f"Seed: {seed}," not in made[0]:
                problems.append(f"seed {seed}: got seeds {seeds}")
            if seed in outcomes:
                problems.append(f"seed {seed}: answered twice")
            outcomes[seed] = ("image", reply.seconds)

    def watch_progress() -> None:
        client = server.client()
        while not stop.is_set():
            reply = client.get("/sdapi/v1/progress", timeout=10)
            if reply.status != 200:
                problems.append(f"/progress: HTTP {reply.status}")
            progress_times.append(reply.seconds)
            time.sleep(0.05)

    try:
        watcher = threading.Thread(target=watch_progress, daemon=True)
        watcher.start()
        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(CLIENTS)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic() + 5))
        elapsed = time.monotonic() - started
        stop.set()
        watcher.join(10)
    finally:
        stop.set()
        server.stop()

    assert not any(t.is_alive() for t in threads), "a client was still waiting at the deadline"
    assert not problems, problems
    expected = {1000 * (c + 1) + i for c in range(CLIENTS) for i in range(REQUESTS)}
    assert set(outcomes) == expected  # none lost
    images = [s for s, (kind, _) in outcomes.items() if kind == "image"]
    rejected = [s for s, (kind, _) in outcomes.items() if kind == "429"]
    latencies = [seconds for _, seconds in outcomes.values()]
    served = [outcomes[s][1] for s in images]
    print(f"\nload: {len(outcomes)} requests in {elapsed:.1f} s: {len(images)} images, {len(rejected)} × 429; "
          f"latency p50 {statistics.median(latencies) * 1000:.0f} ms, p99 {_percentile(latencies, 0.99) * 1000:.0f} ms"
          f" (images only: p50 {statistics.median(served) * 1000:.0f} ms, p99 {_percentile(served, 0.99) * 1000:.0f} ms);"
          f" /progress: {len(progress_times)} calls, p99 {_percentile(progress_times, 0.99) * 1000:.0f} ms,"
          f" max {max(progress_times) * 1000:.0f} ms")
    assert images, "no request was served"
    assert len(progress_times) >= 5 and max(progress_times) < PROGRESS_BOUND_S
