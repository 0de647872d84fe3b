"""AUTOMATIC1111's API over real HTTP: what its clients send, what they read back, and every client mistake a 422."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from sdlab.pipelines.metadata import parse_parameters
from tests.reference import smooth_picture
from tests.server.conftest import FAST, start
from tests.server.wire import assert_unprocessable, b64_png, png_from_b64

LONG = {"steps": 4000, "width": 32, "height": 32, "sampler_name": "Euler"}  # seconds of work, stopped early


def _wait(predicate, timeout: float = 60.0, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def _in_background(client, path, body):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("reply", client.post(path, body)), daemon=True)
    thread.start()
    return thread, box


def _with_preview(client):
    state = client.get("/sdapi/v1/progress").json()
    return state if state["current_image"] else None


def _on_image(client, n: int):
    state = client.get("/sdapi/v1/progress?skip_current_image=true").json()
    return state if state["state"]["job_no"] >= n else None


def _running(client):
    state = client.get("/sdapi/v1/progress?skip_current_image=true").json()
    return state if state["state"]["sampling_step"] > 0 else None


def test_txt2img_round_trip_as_an_a1111_client(client):
    body = {"prompt": "a red circle", "negative_prompt": "blurry", "seed": 123, "batch_size": 2, "cfg_scale": 5,
            "sampler_name": "Euler a", "scheduler": "Karras", "styles": [], "restore_faces": False,
            "a_field_a1111_does_not_know": {"x": 1}, **FAST}
    reply = client.post("/sdapi/v1/txt2img", body)
    assert reply.status == 200, reply.text
    out = reply.json()
    assert set(out) == {"images", "parameters", "info"}
    assert out["parameters"]["prompt"] == "a red circle" and out["parameters"]["steps"] == 2
    info = json.loads(out["info"])
    assert info["all_seeds"] == [123, 124] and info["seed"] == 123
    assert info["sd_model_name"] == "alpha" and len(info["sd_model_hash"]) == 10
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 5 and info["width"] == 32
    images = [png_from_b64(b) for b in out["images"]]
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    assert [im.info["parameters"] for im in images] == info["infotexts"]
    prompt, negative, pairs = parse_parameters(images[1].info["parameters"])
    assert (prompt, negative, pairs["Seed"], pairs["Sampler"]) == ("a red circle", "blurry", "124", "Euler a")
    assert pairs["Schedule type"] == "Karras" and pairs["Model"] == "alpha"

    read = client.post("/sdapi/v1/png-info", {"image": out["images"][1]}).json()
    assert read["info"] == info["infotexts"][1]
    assert read["parameters"]["Prompt"] == "a red circle" and read["parameters"]["Negative prompt"] == "blurry"
    assert read["parameters"]["Seed"] == "124" and read["parameters"]["Size-1"] == "32"
    assert "sdlab" in read["items"]  # sdlab's own record rides along


def test_same_seed_same_image_and_random_seed_recorded(client):
    first = client.post("/sdapi/v1/txt2img", {"prompt": "a cat", "seed": -1, **FAST}).json()
    seed = json.loads(first["info"])["all_seeds"][0]
    assert 0 <= seed < 2**32
    again = client.post("/sdapi/v1/txt2img", {"prompt": "a cat", "seed": seed, **FAST}).json()
    a, b = (np.asarray(png_from_b64(r["images"][0])) for r in (first, again))
    assert np.array_equal(a, b)


def test_batch_size_times_n_iter_images_with_consecutive_seeds(client):
    out = client.post("/sdapi/v1/txt2img", {"prompt": "x", "seed": 7, "batch_size": 2, "n_iter": 2, **FAST}).json()
    assert len(out["images"]) == 4 and json.loads(out["info"])["all_seeds"] == [7, 8, 9, 10]


def test_send_images_false_and_legacy_sampler_index(client):
    out = client.post("/sdapi/v1/txt2img", {"prompt": "x", "seed": 1, "send_images": False,
                                             "sampler_index": "DPM++ 2M Karras", **FAST}).json()
    info = json.loads(out["info"])
    assert out["images"] == [] and info["sampler_name"] == "DPM++ 2M"
    assert "Schedule type: Karras" in info["infotexts"][0]


def test_img2img_with_a_data_url(client):
    init = smooth_picture(32, seed=3)
    body = {"init_images": ["data:image/png;base64," + b64_png(init)], "prompt": "x", "seed": 5,
            "denoising_strength": 0.5, "steps": 4}
    reply = client.post("/sdapi/v1/img2img", body)
    assert reply.status == 200, reply.text
    out = reply.json()
    image = png_from_b64(out["images"][0])
    assert image.size == (32, 32) and "Denoising strength: 0.5" in image.info["parameters"]
    assert out["parameters"]["init_images"] is None  # as A1111: not echoed unless include_init_images
    assert json.loads(out["info"])["denoising_strength"] == 0.5


@pytest.mark.parametrize("invert", [0, 1])
def test_inpaint_keeps_the_unmasked_pixels(client, invert):
    init = smooth_picture(32, seed=4)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 255  # repaint the left half (the right half with inpainting_mask_invert)
    body = {"init_images": [b64_png(init)], "mask": b64_png(Image.fromarray(mask)), "prompt": "x", "seed": 2,
            "steps": 3, "denoising_strength": 1.0, "inpainting_fill": 1, "inpaint_full_res": False,
            "mask_blur": 0, "inpainting_mask_invert": invert}
    reply = client.post("/sdapi/v1/img2img", body)
    assert reply.status == 200, reply.text
    out = np.asarray(png_from_b64(reply.json()["images"][0]).convert("RGB")).astype(int)
    kept = slice(16, 32) if not invert else slice(0, 16)
    changed = slice(0, 16) if not invert else slice(16, 32)
    assert np.abs(out[:, kept] - np.asarray(init)[:, kept]).max() <= 1
    assert np.abs(out[:, changed] - np.asarray(init)[:, changed]).max() > 10
    assert "Masked content: original" in png_from_b64(reply.json()["images"][0]).info["parameters"]


def test_only_masked_inpainting(client):
    init = smooth_picture(32, seed=5)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 255
    body = {"init_images": [b64_png(init)], "mask": b64_png(Image.fromarray(mask)), "prompt": "x", "seed": 2,
            "steps": 3, "inpaint_full_res": True, "inpaint_full_res_padding": 4, "width": 16, "height": 16}
    reply = client.post("/sdapi/v1/img2img", body)
    assert reply.status == 200, reply.text
    image = png_from_b64(reply.json()["images"][0])
    assert image.size == (32, 32) and "Inpaint area: Only masked" in image.info["parameters"]


def test_progress_preview_and_interrupt(client):
    assert client.get("/sdapi/v1/progress").json()["progress"] == 0  # idle
    thread, box = _in_background(client, "/sdapi/v1/txt2img", {"prompt": "x", "seed": 9, **LONG})
    _wait(lambda: _running(client))
    state = _wait(lambda: _with_preview(client))
    assert 0 < state["progress"] < 1 and state["eta_relative"] > 0
    assert state["state"]["job_count"] == 1 and state["state"]["sampling_steps"] == LONG["steps"]
    assert png_from_b64(state["current_image"]).size == (32, 32)
    assert client.get("/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None
    assert client.post("/sdapi/v1/interrupt").status == 200
    thread.join(60)
    reply = box["reply"]
    assert reply.status == 200 and reply.json()["images"] == []  # interrupted before its only image was done
    assert client.get("/sdapi/v1/progress").json()["progress"] == 0
    assert client.post("/sdapi/v1/txt2img", {"prompt": "after", **FAST}).status == 200  # nothing left held


def test_interrupt_keeps_finished_images_of_a_batch(client):
    thread, box = _in_background(client, "/sdapi/v1/txt2img", {"prompt": "x", "seed": 20, "n_iter": 3, **LONG,
                                                               "steps": 60})
    _wait(lambda: _on_image(client, 1), timeout=120)
    client.post("/sdapi/v1/interrupt")
    thread.join(60)
    out = box["reply"].json()
    assert box["reply"].status == 200 and 1 <= len(out["images"]) < 3
    assert json.loads(out["info"])["all_seeds"] == [20, 21][: len(out["images"])]


def test_a_client_that_disconnects_cancels_its_job(server, client):
    body = json.dumps({"prompt": "x", **LONG}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    first = _wait(lambda: _running(client))
    sock.close()
    started = time.monotonic()
    _wait(lambda: client.get("/sdapi/v1/progress?skip_current_image=true").json()["progress"] == 0, timeout=30)
    assert time.monotonic() - started < 10  # well before its 4000 steps would have ended
    job = server.client().get(f"/v1/jobs/{first['state']['job']}").json()
    assert job["state"] == "cancelled"


def test_samplers_and_schedulers(client):
    samplers = {s["name"]: s for s in client.get("/sdapi/v1/samplers").json()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(samplers)
    assert "k_dpmpp_2m" in samplers["DPM++ 2M"]["aliases"] and samplers["DPM++ 2M"]["options"]["scheduler"] == "karras"
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert [s["label"] for s in schedulers] == ["Automatic", "Uniform", "Karras", "Exponential"]
    assert all(set(s) == {"name", "label", "aliases", "default_rho", "need_inner_model"} for s in schedulers)


def test_sd_models_lists_the_folder(client):
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["alpha", "beta"]  # notes.txt is not a model
    for m in models:
        assert m["title"] == f"{m['model_name']} [{m['hash']}]" and m["sha256"].startswith(m["hash"])
        assert "/" not in m["filename"]  # no server paths


def _model_of(reply) -> str:
    return json.loads(reply.json()["info"])["sd_model_name"]


def test_options_switch_models_after_the_running_job(client):
    models = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models").json()}
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models["alpha"]["title"]
    try:
        thread, box = _in_background(client, "/sdapi/v1/txt2img", {"prompt": "x", **LONG, "steps": 60})
        _wait(lambda: _running(client))
        switched = client.post("/sdapi/v1/options", {"sd_model_checkpoint": models["beta"]["title"],
                                                      "some_option_sdlab_ignores": True})
        assert switched.status == 200, switched.text
        thread.join(60)
        assert _model_of(box["reply"]) == "alpha"  # the job that was running finished on its model
        options = client.get("/sdapi/v1/options").json()
        assert options["sd_model_checkpoint"] == models["beta"]["title"]
        assert options["sd_checkpoint_hash"] == models["beta"]["sha256"]
        assert _model_of(client.post("/sdapi/v1/txt2img", {"prompt": "x", **FAST})) == "beta"
        # one request may name another model; the selected one stays
        override = {"prompt": "x", "override_settings": {"sd_model_checkpoint": "alpha"}, **FAST}
        assert _model_of(client.post("/sdapi/v1/txt2img", override)) == "alpha"
        assert _model_of(client.post("/sdapi/v1/txt2img", {"prompt": "x", **FAST})) == "beta"
        by_hash = client.post("/sdapi/v1/options", {"sd_model_checkpoint": models["alpha"]["hash"]})
        assert by_hash.status == 200
        assert _model_of(client.post("/sdapi/v1/txt2img", {"prompt": "x", **FAST})) == "alpha"
    finally:
        client.post("/sdapi/v1/options", {"sd_model_checkpoint": "alpha"})


def test_clip_skip_option(client):
    try:
        assert client.post("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 2}).status == 200
        out = client.post("/sdapi/v1/txt2img", {"prompt": "x", **FAST}).json()
        assert json.loads(out["info"])["clip_skip"] == 2 and "Clip skip: 2" in json.loads(out["info"])["infotexts"][0]
    finally:
        client.post("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 1})


def test_token_merging_option_and_override(client):
    body = {"prompt": "x", **FAST, "width": 64, "height": 64}
    try:
        assert client.post("/sdapi/v1/options", {"token_merging_ratio": 0.5}).status == 200
        assert client.get("/sdapi/v1/options").json()["token_merging_ratio"] == 0.5
        out = client.post("/sdapi/v1/txt2img", body).json()
        assert "Token merging ratio: 0.5" in json.loads(out["info"])["infotexts"][0]
    finally:
        client.post("/sdapi/v1/options", {"token_merging_ratio": 0})
    override = {**body, "override_settings": {"token_merging_ratio": 0.25}}
    out = client.post("/sdapi/v1/txt2img", override).json()
    assert "Token merging ratio: 0.25" in json.loads(out["info"])["infotexts"][0]
    plain = client.post("/sdapi/v1/txt2img", body).json()
    assert "Token merging" not in json.loads(plain["info"])["infotexts"][0]


def _bad_request(body: dict, **extra) -> dict:
    return {"prompt": "x", **FAST, **body, **extra}


NOT_AN_IMAGE = "aGVsbG8gd29ybGQ="  # "hello world"
TXT2IMG_ERRORS = [
    (b'{"prompt": "x", "steps": ', "body"),  # malformed JSON
    (b'[1, 2, 3]', "body"),
    (b'{"prompt": "x", "cfg_scale": NaN}', "cfg_scale"),
    (b'{"prompt": "x", "cfg_scale": Infinity}', "cfg_scale"),
    (b'{"prompt": "x", "eta": -Infinity, "sampler_name": "DDIM"}', "eta"),
    (_bad_request({"width": 33}), "width"),  # not a multiple of the VAE's factor (2 for tiny models)
    (_bad_request({"width": 0}), "width"),
    (_bad_request({"width": 128, "height": 128}), "width"),  # over --max-size
    (_bad_request({"steps": 10**6}), "steps"),
    (_bad_request({"steps": 0}), "steps"),
    (_bad_request({"batch_size": 9, "n_iter": 2}), "batch_size"),
    (_bad_request({"sampler_name": "Euler b"}), "sampler_name"),
    (_bad_request({"scheduler": "Beta"}), "scheduler"),
    (_bad_request({"seed": "abc"}), "seed"),
    (_bad_request({"seed": 2**40}), "seed"),
    (_bad_request({"prompt": "x" * 30_000}), "prompt"),
    (_bad_request({"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}), "sd_model_checkpoint"),
    (_bad_request({"override_settings": {"CLIP_stop_at_last_layers": 40}}), "CLIP_stop_at_last_layers"),
    (_bad_request({"override_settings": {"token_merging_ratio": 0.9}}), "token_merging_ratio"),
    (_bad_request({"override_settings": {"token_merging_ratio": "half"}}), "token_merging_ratio"),
]


@pytest.mark.parametrize("body, field", TXT2IMG_ERRORS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(TXT2IMG_ERRORS)])
def test_txt2img_client_mistakes_are_422_naming_the_field(client, body, field):
    assert_unprocessable(client.post("/sdapi/v1/txt2img", body), field)


def _img2img(**fields) -> dict:
    return {"init_images": [b64_png(smooth_picture(32))], "prompt": "x", "steps": 2, **fields}


IMG2IMG_ERRORS = [
    (_img2img(init_images=["%%% not base64 %%%"]), "init_images[0]"),
    (_img2img(init_images=[NOT_AN_IMAGE]), "init_images[0]"),
    (_img2img(init_images=["http://127.0.0.1/picture.png"]), "init_images[0]"),
    (_img2img(init_images=[]), "init_images"),
    ({"prompt": "x"}, "init_images"),
    (_img2img(mask=b64_png(Image.new("L", (16, 16), 255))), "mask"),
    (_img2img(mask="data:image/png;base64,!!!"), "mask"),
    (_img2img(denoising_strength=2), "denoising_strength"),
    (_img2img(inpainting_fill=7), "inpainting_fill"),
    (_img2img(mask_blur=-1), "mask_blur"),
    (_img2img(init_images=[b64_png(Image.new("RGB", (400, 400)))]), "init_images[0]"),  # over 4 × --max-size
]


@pytest.mark.parametrize("body, field", IMG2IMG_ERRORS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(IMG2IMG_ERRORS)])
def test_img2img_client_mistakes_are_422_naming_the_field(client, body, field):
    assert_unprocessable(client.post("/sdapi/v1/img2img", body), field)


def test_other_routes_reject_bad_input(client):
    assert "image" in client.post("/sdapi/v1/png-info", {"image": "###"}).json()["errors"]
    assert client.post("/sdapi/v1/png-info", {"image": NOT_AN_IMAGE}).status == 422
    assert client.post("/sdapi/v1/png-info", {"image": ""}).json()["info"] == ""
    plain = client.post("/sdapi/v1/png-info", {"image": b64_png(smooth_picture(8))}).json()
    assert plain["info"] == "" and plain["parameters"] == {}
    assert client.get("/sdapi/v1/progress?skip_current_image=maybe").status == 422
    bad_model = client.post("/sdapi/v1/options", {"sd_model_checkpoint": "/etc/passwd"})
    assert bad_model.status == 422 and "sd_model_checkpoint" in bad_model.json()["errors"]
    assert client.post("/sdapi/v1/options", {"CLIP_stop_at_last_layers": "two"}).status == 422
    assert client.post("/sdapi/v1/options", {"token_merging_ratio": 2}).status == 422
    assert client.post("/sdapi/v1/options", b"not json").status == 422


def test_an_oversized_body_is_refused_before_it_is_read(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n{" % (1 << 30))
        assert sock.recv(1000).startswith(b"HTTP/1.1 413")


def test_a_chunked_body_over_the_limit_is_refused(models_dir):
    server = start(models_dir, max_body=10_000)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b'{"prompt": "' + b"x" * 6000
            for _ in range(3):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            assert sock.recv(1000).startswith(b"HTTP/1.1 413")
        assert server.client().post("/sdapi/v1/txt2img", {"prompt": "x", **FAST}).status == 200
    finally:
        server.stop()
