"""A real server on a free loopback port, and a small HTTP client over the standard library (no test-only
HTTP package: every byte goes through a socket, as it does for any A1111 client)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from PIL import Image

from sdlab.server.app import ServerConfig, create_app


class RunningServer:
    """uvicorn in a thread, bound to 127.0.0.1 on a port the OS picks; `stop()` shuts it down."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.app = create_app(cfg)
        self.service = self.app.app.state.service
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2, timeout_keep_alive=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def client(self, auth: str | None = None) -> Client:
        return Client(self.port, auth)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class Client:
    """One connection per request; `auth` is a whole Authorization header value."""

    def __init__(self, port: int, auth: str | None = None):
        self.port = port
        self.auth = auth

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 120) -> Reply:
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        data = data.encode() if isinstance(data, str) else data
        head = {"Content-Type": "application/json"} if data is not None else {}
        if self.auth:
            head["Authorization"] = self.auth
        head.update(headers or {})
        start = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=head)
            response = conn.getresponse()
            payload = response.read()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, payload,
                         time.monotonic() - start)
        finally:
            conn.close()

    def get(self, path: str, **kw) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, body=None, **kw) -> Reply:
        return self.request("POST", path, body if body is not None else {}, **kw)

    def delete(self, path: str, **kw) -> Reply:
        return self.request("DELETE", path, **kw)

    def events(self, path: str, timeout: float = 120) -> list[tuple[str, dict, str | None]]:
        """Read a Server-Sent Events stream to its end: [(event, data, id)]."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        head = {"Accept": "text/event-stream"}
        if self.auth:
            head["Authorization"] = self.auth
        try:
            conn.request("GET", path, headers=head)
            response = conn.getresponse()
            assert response.status == 200, response.read()
            assert response.getheader("content-type").startswith("text/event-stream")
            out, event, data, event_id = [], None, [], None
            for raw in response:
                line = raw.decode().rstrip("\r\n")
                if line == "":
                    if event is not None:
                        out.append((event, json.loads("\n".join(data)), event_id))
                    event, data, event_id = None, [], None
                elif line.startswith("event: "):
                    event = line[len("event: "):]
                elif line.startswith("data: "):
                    data.append(line[len("data: "):])
                elif line.startswith("id: "):
                    event_id = line[len("id: "):]
            return out
        finally:
            conn.close()


def assert_unprocessable(reply: Reply, field: str) -> None:
    """A client mistake: 422 with a one-line message that names the field, and not the input echoed back."""
    assert reply.status == 422, reply.text
    assert field in reply.json()["errors"], reply.json()
    assert len(reply.body) < 5000


def b64_png(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def png_from_b64(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
