"""sdlab's own API (`/v1/...`): submit a job with sdlab's setting names, follow it over Server-Sent Events,
fetch its PNGs, cancel it. The OpenAPI schema at /openapi.json describes every route and field.

    POST   /v1/jobs                   202 + the job (Location: /v1/jobs/{id}); 429 + Retry-After when the queue is full
    GET    /v1/jobs                   the jobs the server still remembers
    GET    /v1/jobs/{id}              state, progress, image URLs, parameters
    GET    /v1/jobs/{id}/events       text/event-stream: queued, started, progress, preview, image, then done | failed | cancelled
    GET    /v1/jobs/{id}/images/{n}   image n as PNG (with its `parameters` text)
    DELETE /v1/jobs/{id}              cancel: a queued job at once, a running one at its next step
    GET    /v1/models                 the models this server may load
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sdlab.pipelines.settings import FILLS, MAX_SEED, MAX_TOKEN_MERGING, SCHEDULES, Settings
from sdlab.server.codec import FieldError, decode_image, encode_base64
from sdlab.server.jobs import FINISHED, Job
from sdlab.server.service import Service, known_sampler

POLL_S = 0.05
HEARTBEAT_S = 15.0  # an SSE comment line now and then keeps proxies from closing a quiet stream
CANCEL_WAIT_S = 5.0  # DELETE waits this long for a running job to stop at its next step
_D = Settings("")  # the defaults, so the schema says what the CLI and the Python API say


class JobRequest(BaseModel):
    """A txt2img job; with `image` an img2img job; with `image` and `mask` an inpainting job."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str
    negative: str = ""
    steps: int | None = Field(_D.steps, ge=1, description="default: the model's (20; 15 for sdlab's own)")
    guidance: float = _D.guidance
    sampler: str = Field(_D.sampler, description="a key (dpmpp_2m, euler_a, ...) or an A1111 name ('DPM++ 2M Karras')")
    schedule: Literal[SCHEDULES] = _D.schedule  # type: ignore[valid-type]
    width: int | None = Field(None, ge=1, description="default: the model's size, or the image's")
    height: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="null: random (recorded in the image)")
    batch: int = Field(_D.batch, ge=1, description="images; image i uses seed + i")
    clip_skip: int = Field(_D.clip_skip, ge=1)
    guidance_rescale: float = Field(_D.guidance_rescale, ge=0, le=1)
    eta: float | None = None
    tiling: bool = _D.tiling
    vae_tiling: bool = Field(_D.vae_tiling, description="decode in windows: large images in little memory")
    cfg_end: float = Field(_D.cfg_end, ge=0, le=1, description="fraction of steps with guidance; later steps skip "
                           "the unconditional pass (faster, approximate)")
    token_merging: float = Field(_D.token_merging, ge=0, le=MAX_TOKEN_MERGING,
                                 description="fraction of full-resolution tokens merged (faster, approximate)")
    model: str | None = Field(None, description="a name from /v1/models; null: the selected model")
    image: str | None = Field(None, description="base64 image to edit (img2img, inpainting)")
    mask: str | None = Field(None, description="base64 mask of the image's size: white = repaint")
    strength: float | None = Field(None, ge=0, le=1, description="with an image; default 0.75, or 1 with a mask")
    mask_blur: int = Field(_D.mask_blur, ge=0)
    fill: Literal[FILLS] = _D.fill  # type: ignore[valid-type]
    only_masked: bool = _D.only_masked
    padding: int = Field(_D.padding, ge=0)
    composite: bool = _D.composite

    check_sampler = field_validator("sampler")(known_sampler)


class Progress(BaseModel):
    image: int = Field(description="the image of the batch being made, from 0")
    images: int
    step: int = Field(description="steps done of that image")
    total: int = Field(description="its steps (0 until the first step)")
    fraction: float = Field(description="0..1 of the whole job")


class JobView(BaseModel):
    id: str
    kind: Literal["txt2img", "img2img", "inpaint"]
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    position: int = Field(description="jobs to run before this one")
    progress: Progress
    cancel_requested: bool
    error: str | None
    images: list[str] = Field(description="URLs of the finished images")
    seeds: list[int]
    parameters: list[str] = Field(description="A1111 infotext of each image")
    settings: dict
    model: str | None
    created: float
    started: float | None
    finished: float | None
    events: str = Field(description="URL of the Server-Sent Events stream")


class ModelView(BaseModel):
    name: str
    title: str
    hash: str | None
    sha256: str | None
    selected: bool
    loaded: bool


def _image_urls(job: Job) -> list[str]:
    return [f"/v1/jobs/{job.id}/images/{i}" for i in range(len(job.results))]


def view(job: Job, service: Service) -> JobView:
    return JobView(
        id=job.id, kind=job.kind, state=job.state, position=service.queue.position(job),
        progress=Progress(image=job.image_no, images=job.images, step=job.step, total=job.total,
                          fraction=job.fraction),
        cancel_requested=job.cancel_requested.is_set(), error=job.error, images=_image_urls(job),
        seeds=[r.seed for r in job.results], parameters=[r.parameters for r in job.results],
        settings=job.settings.to_dict(), model=None if job.model_info is None else job.model_info.name,
        created=job.created, started=job.started, finished=job.finished, events=f"/v1/jobs/{job.id}/events",
    )


def _job(req: JobRequest, service: Service) -> Job:
    entry = None if req.model is None else service.model(req.model, "model")
    limit = service.limits.max_input_pixels
    image = None if req.image is None else decode_image(req.image, "image", limit)
    mask = None
    if req.mask is not None:
        if image is None:
            raise FieldError("mask", "a mask needs an image to inpaint; send `image` too")
        mask = decode_image(req.mask, "mask", limit, keep_alpha=True)
        if mask.size != image.size:
            raise FieldError("mask", f"is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; "
                             "send a mask of the image's size")
    if req.strength is not None and image is None:
        raise FieldError("strength", "only an edit has a strength; send `image` too")
    strength = req.strength if req.strength is not None or image is None else (1.0 if mask is not None else 0.75)
    values = req.model_dump(exclude={"model", "image", "mask", "strength"})
    settings = Settings(**values, strength=strength)
    service.check(settings, image, entry, {})
    kind = "txt2img" if image is None else "img2img" if mask is None else "inpaint"
    return Job(settings, kind, image=image, mask=mask, model=entry, origin="v1")


def _sse(event: str, data: dict, event_id: int | None = None) -> str:
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


async def _events(job: Job, request: Request, previews: bool, after: int):
    """Every event of the job in order (from `after`), previews as they are decoded, until the job ends."""
    sent, preview_version = after, 0
    loop = asyncio.get_running_loop()
    last_write = loop.time()
    yield "retry: 2000\n\n"
    while True:
        if previews and job.state in ("queued", "running"):
            job.ask_preview()
        while sent < len(job.events):
            event = dict(job.events[sent])
            sent += 1
            name = event.pop("event")
            if name in ("done", "cancelled"):
                event["images"] = _image_urls(job)
            elif name == "image":
                event["url"] = f"/v1/jobs/{job.id}/images/{event['index']}"
            yield _sse(name, event, sent)
            last_write = loop.time()
            if name in FINISHED:
                return
        if previews and job.preview is not None and job.preview_version != preview_version:
            preview_version = job.preview_version
            yield _sse("preview", {"image": job.image_no, "step": job.step, "png": encode_base64(job.preview)})
            last_write = loop.time()
        if loop.time() - last_write > HEARTBEAT_S:
            yield ": keep-alive\n\n"
            last_write = loop.time()
        if await request.is_disconnected():
            return
        await asyncio.sleep(POLL_S)


def router(service: Service) -> APIRouter:
    api = APIRouter(prefix="/v1", tags=["sdlab"])

    def find(job_id: str) -> Job:
        job = service.queue.get(job_id)
        if job is None or job.kind == "switch":
            raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept for a while, then forgotten)")
        return job

    @api.post("/jobs", status_code=202, response_model=JobView,
              responses={429: {"description": "the queue is full; see Retry-After"}})
    async def submit(req: JobRequest, response: Response) -> JobView:
        job = service.submit(_job(req, service))
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return view(job, service)

    @api.get("/jobs", response_model=list[JobView])
    async def jobs() -> list[JobView]:
        return [view(j, service) for j in service.queue.jobs()]

    @api.get("/jobs/{job_id}", response_model=JobView)
    async def get(job_id: str) -> JobView:
        return view(find(job_id), service)

    @api.get("/jobs/{job_id}/events", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}})
    async def events(job_id: str, request: Request, previews: bool = True):
        """`event:` names: queued, started, progress {image, images, step, total}, preview {image, step, png},
        image {index, seed, url}, and last done {images} | failed {error} | cancelled {images}.
        Reconnecting with Last-Event-ID resumes after that event."""
        job = find(job_id)
        last = request.headers.get("last-event-id", "0")
        after = int(last) if last.isdigit() else 0
        return StreamingResponse(_events(job, request, previews, after), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.get("/jobs/{job_id}/images/{n}", response_class=Response,
             responses={200: {"content": {"image/png": {}}}})
    async def image(job_id: str, n: int):
        job = find(job_id)
        if job.released:
            raise HTTPException(410, f"job {job_id}'s images were delivered and dropped")
        if not 0 <= n < len(job.results):
            raise HTTPException(404, f"job {job_id} has {len(job.results)} finished images; no image {n}")
        return Response(job.results[n].png, media_type="image/png")

    @api.delete("/jobs/{job_id}", response_model=JobView)
    async def cancel(job_id: str) -> JobView:
        job = find(job_id)
        service.queue.cancel(job)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_WAIT_S
        while job.state == "running" and loop.time() < deadline:
            await asyncio.sleep(POLL_S)
        return view(job, service)

    @api.get("/models", response_model=list[ModelView])
    def models() -> list[ModelView]:  # a thread: the first listing hashes the model files
        loaded = service.host.loaded[0] if service.host.loaded else None
        out = []
        for entry in service.catalog.entries():
            info = service.catalog.info(entry)
            out.append(ModelView(
                name=entry.name, title=service.catalog.title(entry),
                hash=None if info is None else info.short_hash, sha256=None if info is None else info.sha256,
                selected=entry == service.host.selected, loaded=entry == loaded,
            ))
        return out

    return api
