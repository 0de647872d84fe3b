"""sdlab's job API over real HTTP: submit, follow (Server-Sent Events), fetch, cancel, the queue's limits."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from sdlab.pipelines.metadata import parse_parameters
from sdlab.pipelines.settings import Settings
from sdlab.server.catalog import Catalog
from sdlab.server.jobs import Job, JobQueue
from tests.reference import smooth_picture
from tests.server.conftest import start
from tests.server.wire import assert_unprocessable, b64_png, png_from_b64

SMALL = {"steps": 2, "width": 32, "height": 32}
LONG = {"steps": 4000, "width": 32, "height": 32, "sampler": "euler"}


def _until_finished(client, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


def _until_running(client, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] == "running" and job["progress"]["step"] > 0:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not start")


def test_submit_follow_and_fetch(client):
    reply = client.post("/v1/jobs", {"prompt": "a red circle", "seed": 11, "batch": 2, "sampler": "DPM++ 2M Karras",
                                     **SMALL})
    assert reply.status == 202, reply.text
    job = reply.json()
    assert reply.headers["location"] == f"/v1/jobs/{job['id']}" and job["state"] in ("queued", "running", "done")
    job = _until_finished(client, job["id"])
    assert job["state"] == "done" and job["kind"] == "txt2img" and job["seeds"] == [11, 12]
    assert job["progress"]["fraction"] == 1 and job["model"] == "alpha"
    assert job["settings"]["sampler"] == "dpmpp_2m" and job["settings"]["schedule"] == "karras"
    for url, parameters in zip(job["images"], job["parameters"]):
        png = client.get(url)
        assert png.status == 200 and png.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(png.body))
        assert image.size == (32, 32) and image.info["parameters"] == parameters
    assert parse_parameters(job["parameters"][1])[2]["Seed"] == "12"
    assert job["id"] in [j["id"] for j in client.get("/v1/jobs").json()]


def test_events_arrive_in_order_and_end_with_done(client):
    job = client.post("/v1/jobs", {"prompt": "x", "seed": 3, "batch": 2, **SMALL, "steps": 30}).json()
    events = client.events(job["events"])
    names = [e for e, _, _ in events]
    assert names[0] == "queued" and names[-1] == "done" and "started" in names
    counted = [(e, d, i) for e, d, i in events if e != "preview"]
    assert [int(i) for _, _, i in counted] == list(range(1, len(counted) + 1))  # ids count every event but previews
    progress = [(d["image"], d["step"]) for e, d, _ in events if e == "progress"]
    assert progress == [(image, step) for image in range(2) for step in range(1, 31)]
    images = [d for e, d, _ in events if e == "image"]
    assert [d["seed"] for d in images] == [3, 4] and names.index("image") > names.index("progress")
    assert events[-1][1]["images"] == [d["url"] for d in images]
    previews = [d for e, d, _ in events if e == "preview"]
    assert previews, "a running job with a listener sends previews"
    assert png_from_b64(previews[0]["png"]).size == (32, 32)
    again = client.events(job["events"] + "?previews=false")  # a finished job replays its events
    assert [e for e, _, _ in again] == [e for e, _, _ in counted]


def test_img2img_and_inpaint_jobs(client):
    init = smooth_picture(32, seed=8)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    edit = client.post("/v1/jobs", {"prompt": "x", "image": b64_png(init), "strength": 0.6, "seed": 1, "steps": 3})
    paint = client.post("/v1/jobs", {"prompt": "x", "image": b64_png(init), "mask": b64_png(mask), "seed": 1,
                                     "steps": 3, "mask_blur": 0})
    edit, paint = (_until_finished(client, r.json()["id"]) for r in (edit, paint))
    assert (edit["kind"], edit["state"], edit["settings"]["strength"]) == ("img2img", "done", 0.6)
    assert (paint["kind"], paint["state"], paint["settings"]["strength"]) == ("inpaint", "done", 1.0)
    out = np.asarray(Image.open(io.BytesIO(client.get(paint["images"][0]).body)).convert("RGB")).astype(int)
    assert np.abs(out[:, 16:] - np.asarray(init)[:, 16:]).max() <= 1


def test_cancel_a_running_and_a_queued_job(client):
    running = client.post("/v1/jobs", {"prompt": "x", **LONG}).json()
    queued = client.post("/v1/jobs", {"prompt": "x", **LONG}).json()
    _until_running(client, running["id"])
    assert client.get(f"/v1/jobs/{queued['id']}").json()["position"] == 1
    cancelled = client.delete(f"/v1/jobs/{queued['id']}").json()
    assert cancelled["state"] == "cancelled" and cancelled["images"] == []
    stopped = client.delete(f"/v1/jobs/{running['id']}").json()
    assert stopped["state"] == "cancelled" and stopped["cancel_requested"]
    assert client.events(running["events"])[-1][0] == "cancelled"
    after = client.post("/v1/jobs", {"prompt": "x", **SMALL}).json()
    assert _until_finished(client, after["id"])["state"] == "done"  # the worker is free again


def test_a_job_that_fails_in_the_worker_frees_it(client):
    """beta has not been loaded in this module's server, so its settings are checked when the job runs."""
    bad = client.post("/v1/jobs", {"prompt": "x", "model": "beta", "clip_skip": 40, **SMALL})
    assert bad.status in (202, 422)
    if bad.status == 202:  # the server had not seen beta yet: the worker finds the mistake
        job = _until_finished(client, bad.json()["id"])
        assert job["state"] == "failed" and "clip skip" in job["error"]
        assert client.events(job["events"])[-1][0] == "failed"
    good = client.post("/v1/jobs", {"prompt": "x", **SMALL}).json()
    assert _until_finished(client, good["id"])["state"] == "done"


V1_ERRORS = [
    ({"prompt": "x", "cfg_scale": 7}, "cfg_scale"),  # sdlab's API forbids unknown fields
    ({"steps": 2}, "prompt"),
    ({"prompt": "x", "strength": 0.5}, "strength"),
    ({"prompt": "x", "mask": b64_png(Image.new("L", (32, 32)))}, "mask"),
    ({"prompt": "x", "image": b64_png(smooth_picture(32)), "mask": b64_png(Image.new("L", (8, 8)))}, "mask"),
    ({"prompt": "x", "image": "bm90IGFuIGltYWdl"}, "image"),
    ({"prompt": "x", "model": "../alpha"}, "model"),
    ({"prompt": "x", "sampler": "nope"}, "sampler"),
    ({"prompt": "x", "schedule": "beta"}, "schedule"),
    ({"prompt": "x", "width": 31}, "width"),
    ({"prompt": "x", "batch": 17}, "batch"),
    ({"prompt": "x", "steps": 5001}, "steps"),
    ({"prompt": "x", "sampler": "dpmpp_2m", "eta": 0.5}, "eta"),
    ({"prompt": "x", "fill": "sand"}, "fill"),
]


@pytest.mark.parametrize("body, field", V1_ERRORS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(V1_ERRORS)])
def test_job_mistakes_are_422_naming_the_field(client, body, field):
    assert_unprocessable(client.post("/v1/jobs", body), field)


def test_unknown_jobs_and_images_are_404(client):
    assert client.get("/v1/jobs/nope").status == 404
    assert client.get("/v1/jobs/nope/events").status == 404
    assert client.delete("/v1/jobs/nope").status == 404
    job = client.post("/v1/jobs", {"prompt": "x", **SMALL}).json()
    _until_finished(client, job["id"])
    assert client.get(f"/v1/jobs/{job['id']}/images/1").status == 404
    assert client.get(f"/v1/jobs/{job['id']}/images/x").status == 422


def test_models_and_openapi(client):
    models = client.get("/v1/models").json()
    assert [(m["name"], m["selected"]) for m in models] == [("alpha", True), ("beta", False)]
    schema = client.get("/openapi.json").json()
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/images/{n}",
                 "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress", "/sdapi/v1/options"):
        assert path in schema["paths"], path
    assert {"JobRequest", "JobView", "Txt2ImgRequest", "Img2ImgRequest"} <= set(schema["components"]["schemas"])
    assert client.get("/docs").status == 200
    assert client.get("/").status == 200


def test_a_full_queue_answers_429_with_retry_after(models_dir):
    server = start(models_dir, queue=1)
    try:
        client = server.client()
        first = client.post("/v1/jobs", {"prompt": "x", **LONG}).json()
        _until_running(client, first["id"])
        second = client.post("/v1/jobs", {"prompt": "x", **LONG})
        assert second.status == 202
        full = client.post("/v1/jobs", {"prompt": "x", **SMALL})
        assert full.status == 429 and int(full.headers["retry-after"]) >= 1
        a1111 = client.post("/sdapi/v1/txt2img", {"prompt": "x", **SMALL})
        assert a1111.status == 429 and int(a1111.headers["retry-after"]) >= 1
        client.delete(f"/v1/jobs/{second.json()['id']}")
        assert client.post("/v1/jobs", {"prompt": "x", **SMALL}).status == 202  # room again
        client.delete(f"/v1/jobs/{first['id']}")
    finally:
        server.stop()


def test_finished_jobs_expire(monkeypatch):
    queue = JobQueue(None, limit=10, keep_seconds=60, keep_jobs=2)  # type: ignore[arg-type]  (never started)
    jobs = [queue.submit(Job(Settings("x"))) for _ in range(4)]
    for job in jobs[:3]:
        queue.cancel(job)
    assert [queue.get(j.id) is not None for j in jobs] == [False, True, True, True]  # at most 2 finished kept
    clock = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: clock)
    assert [queue.get(j.id) is not None for j in jobs] == [False, False, False, True]  # waiting jobs stay


def test_catalog_never_names_a_path_outside_its_folder(models_dir):
    catalog = Catalog(models_dir)
    assert [e.name for e in catalog.entries()] == ["alpha", "beta"]
    for name in ("../alpha", str(models_dir / "alpha"), "/etc/passwd", "notes.txt", ""):
        assert catalog.find(name) is None
    assert catalog.find("alpha").source == str(models_dir / "alpha")
