"""With --auth every route needs the credentials: the APIs, the docs, the schema and the web page."""

from __future__ import annotations

import pytest

from tests.server.conftest import start
from tests.server.wire import basic

ROUTES = [
    ("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/static/none.css"),
    ("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/img2img"), ("GET", "/sdapi/v1/progress"),
    ("POST", "/sdapi/v1/interrupt"), ("GET", "/sdapi/v1/samplers"), ("GET", "/sdapi/v1/schedulers"),
    ("GET", "/sdapi/v1/sd-models"), ("GET", "/sdapi/v1/options"), ("POST", "/sdapi/v1/options"),
    ("POST", "/sdapi/v1/png-info"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/x"),
    ("GET", "/v1/jobs/x/events"), ("GET", "/v1/jobs/x/images/0"), ("DELETE", "/v1/jobs/x"), ("GET", "/v1/models"),
    ("GET", "/no/such/route"),
]  # fmt: skip


@pytest.fixture(scope="module", params=["user:pass", "s3cret-token"])
def guarded(request, models_dir):
    server = start(models_dir, auth=request.param)
    yield server, request.param
    server.stop()


def _good_credentials(auth: str) -> list[str]:
    if ":" in auth:
        return [basic(*auth.split(":", 1))]
    return [f"Bearer {auth}", basic("anyone", auth)]


def _bad_credentials(auth: str) -> list[str]:
    if ":" in auth:
        user, password = auth.split(":", 1)
        return [basic(user, password + "x"), basic("other", password), f"Bearer {auth}", "Basic !!!"]
    return [f"Bearer {auth}x", basic(auth, "wrong"), f"Token {auth}", "Bearer"]


@pytest.mark.parametrize("method, path", ROUTES)
def test_every_route_needs_the_credentials(guarded, method, path):
    server, auth = guarded
    body = {"steps": 2, "width": 32, "height": 32} if method == "POST" else None
    for header in [None, *_bad_credentials(auth)]:
        reply = server.client(header).request(method, path, body)
        assert reply.status == 401, (header, reply.text)
        assert reply.headers["www-authenticate"].startswith("Basic")
    for header in _good_credentials(auth):
        reply = server.client(header).request(method, path, body)
        assert reply.status != 401 and reply.status < 500, (header, reply.status, reply.text)


def test_a_guarded_server_still_generates(guarded):
    server, auth = guarded
    client = server.client(_good_credentials(auth)[0])
    reply = client.post("/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "width": 32, "height": 32})
    assert reply.status == 200 and len(reply.json()["images"]) == 1
