"""The FastAPI application: both APIs, the web page at `/`, credentials on every route, and errors that
name the request's field (422) instead of a server error.

    create_app(ServerConfig(models_dir="models/", auth="user:secret"))  ->  an ASGI app for any server
    serve(config, host="127.0.0.1", port=7860)                          ->  loads the model, runs uvicorn
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.datastructures import Headers
from starlette.staticfiles import StaticFiles

from sdlab import __version__, api
from sdlab.errors import SdlabError
from sdlab.server import a1111, v1
from sdlab.server.catalog import Catalog
from sdlab.server.jobs import QueueFull
from sdlab.server.service import Limits, Service, as_field_error

log = logging.getLogger("sdlab.server")
STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024 * 1024  # bytes of one request: a few base64 images


@dataclass(frozen=True)
class ServerConfig:
    model: str | None = None  # a model path or repo id; with models_dir, the name of the first one to load
    models_dir: str | None = None  # every .safetensors/.ckpt file and diffusers folder in it may be chosen
    device: str = "cpu"
    dtype: str | None = None
    config: str | None = None  # preset for reading a single file
    prediction_type: str | None = None
    backend: str = "auto"  # or "torch", "openvino" (sdlab.api.load)
    low_memory: bool = False  # tiled VAE above 512x512, sliced attention (sdlab.api.load)
    auth: str | None = None  # "TOKEN" (Bearer, or Basic with it as password) or "USER:PASS" (Basic)
    queue: int = 8  # waiting jobs before 429
    limits: Limits = field(default_factory=Limits)
    keep_seconds: float = 600.0  # finished jobs' results are kept this long
    keep_jobs: int = 100  # and at most this many finished jobs
    preview_interval: float = 1.0  # seconds between decoded previews of a running job
    max_body: int = MAX_BODY  # bytes of one request
    lora_dirs: tuple[str, ...] = ()  # where prompts' <lora:name:w> tags find their files (names only, never paths)
    embeddings_dirs: tuple[str, ...] = ()  # textual-inversion embeddings, used by name in prompts


def make_service(cfg: ServerConfig) -> Service:
    def loader(source: str):
        return api.load(source, device=cfg.device, dtype=cfg.dtype, config=cfg.config,
                        prediction_type=cfg.prediction_type, backend=cfg.backend, low_memory=cfg.low_memory,
                        lora_dirs=cfg.lora_dirs, embeddings_dirs=cfg.embeddings_dirs)

    return Service(Catalog(cfg.models_dir, cfg.model), loader, cfg.limits, queue=cfg.queue,
                   keep_seconds=cfg.keep_seconds, keep_jobs=cfg.keep_jobs, preview_interval=cfg.preview_interval,
                   lora_dirs=cfg.lora_dirs)


# --- credentials and request size: plain ASGI around everything, docs and the page included ----------
def credentials_check(auth: str):
    """`Authorization` header -> allowed? A USER:PASS needs HTTP Basic; a TOKEN is taken as a Bearer
    token, or as the password of HTTP Basic (so a browser's login prompt works too)."""
    user, colon, password = auth.partition(":")

    def allowed(header: str | None) -> bool:
        scheme, _, value = (header or "").partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and not colon:
            return secrets.compare_digest(value.encode(), auth.encode())
        if scheme.lower() != "basic":
            return False
        try:
            given_user, _, given_password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        if not colon:
            return secrets.compare_digest(given_password.encode(), auth.encode())
        same_user = secrets.compare_digest(given_user.encode(), user.encode())
        return secrets.compare_digest(given_password.encode(), password.encode()) and same_user

    return allowed


class Guard:
    """401 without valid credentials (when the server has them); 413 for a body over `max_body` bytes."""

    def __init__(self, app, auth: str | None, max_body: int = MAX_BODY):
        self.app = app
        self.allowed = None if auth is None else credentials_check(auth)
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.allowed is not None and not self.allowed(headers.get("authorization")):
            response = JSONResponse({"error": "Unauthorized", "detail": "credentials needed (Bearer token or HTTP Basic)"},
                                    status_code=401, headers={"WWW-Authenticate": 'Basic realm="sdlab"'})
            return await response(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            response = JSONResponse({"error": "TooLarge", "detail": f"request body over {self.max_body} bytes"},
                                    status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:  # a chunked body without Content-Length
                    raise HTTPException(413, f"request body over {self.max_body} bytes")
            return message

        return await self.app(scope, counted, send)


# --- errors -----------------------------------------------------------------------------------------
def _where(loc) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path")]
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or "body"


def _plain(item: dict) -> dict:
    """A pydantic error without the input (it may be a megabyte of base64), JSON-safe."""
    msg = str(item.get("msg", "")).removeprefix("Value error, ")
    out = {"loc": list(item.get("loc", ())), "msg": msg, "type": str(item.get("type", ""))}
    if item.get("type") == "json_invalid":  # loc is ("body", character position)
        reason = (item.get("ctx") or {}).get("error", "a JSON syntax error")
        position = out["loc"][-1] if isinstance(out["loc"][-1], int) else "?"
        out["loc"], out["msg"] = ["body"], f"not valid JSON: {reason} at character {position}"
    return out


def unprocessable(items: list[dict]) -> JSONResponse:
    message = "; ".join(f"{_where(i['loc'])}: {i['msg']}" for i in items)
    return JSONResponse({"error": "ValidationError", "detail": items, "errors": message}, status_code=422)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return unprocessable([_plain(e) for e in exc.errors()])

    @app.exception_handler(SdlabError)
    async def sdlab_error(request: Request, exc: SdlabError):
        error = as_field_error(exc, {})
        return unprocessable([{"loc": ["body", error.field], "msg": error.message, "type": "value_error"}])

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        return JSONResponse({"error": "QueueFull", "detail": str(exc), "retry_after": exc.retry_after},
                            status_code=429, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"error": type(exc).__name__, "detail": "internal server error", "body": None,
                             "errors": str(exc)}, status_code=500)


# --- the application --------------------------------------------------------------------------------
def create_app(cfg: ServerConfig, service: Service | None = None) -> Guard:
    service = service or make_service(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()  # loads the first model unless `serve` did already
        yield
        service.stop()

    app = FastAPI(title="sdlab", version=__version__, lifespan=lifespan,
                  description="AUTOMATIC1111-compatible API under /sdapi/v1, sdlab's job API under /v1.")
    app.state.service = service
    add_error_handlers(app)
    app.include_router(a1111.router(service))
    app.include_router(v1.router(service))

    @app.get("/", include_in_schema=False)
    async def page():
        index = STATIC / "index.html"
        if index.is_file():
            return FileResponse(index)
        return HTMLResponse("<!doctype html><title>sdlab</title><p>sdlab server: "
                            "<a href='/docs'>API documentation</a></p>")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return Guard(app, cfg.auth, cfg.max_body)


def serve(cfg: ServerConfig, host: str = "127.0.0.1", port: int = 7860) -> None:
    import uvicorn

    service = make_service(cfg)
    service.start()  # a model that does not load ends here, with its one-line error
    uvicorn.run(create_app(cfg, service), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
