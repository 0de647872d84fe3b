"""The job queue: jobs wait in a bounded line and one worker thread runs them, one at a time, on the loaded model.

    submit ──> waiting (at most `limit`, else QueueFull) ──> worker: running ──> done | failed | cancelled

The worker is the only thread that loads models or runs them, so a model switch (itself a queued job)
never interleaves with a generation. HTTP handlers only read jobs and set their cancel flag; the
sampler's step callback raises `Cancelled` when it is set, and a finished job lets go of its inputs.
Finished jobs are kept for `keep_seconds`, and at most `keep_jobs` of them (bounded memory).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from PIL import Image

from sdlab.api import ModelInfo, Pipeline
from sdlab.config import ModelConfig
from sdlab.errors import SdlabError
from sdlab.pipelines.settings import Settings
from sdlab.server.catalog import ModelEntry, ModelHost
from sdlab.server.codec import png_bytes

log = logging.getLogger("sdlab.server")

State = Literal["queued", "running", "done", "failed", "cancelled"]
FINISHED = ("done", "failed", "cancelled")
Kind = Literal["txt2img", "img2img", "inpaint", "switch"]
PREVIEW_INTEREST_S = 3.0  # previews are decoded only while someone asked for one this recently
DEFAULT_JOB_S = 5.0  # Retry-After's guess of a job's duration before any job has finished


class Cancelled(Exception):
    """Raised from the sampler's step callback to stop a job (cancel, interrupt, disconnect, shutdown)."""


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Result:
    png: bytes  # with A1111's `parameters` and sdlab's record as text chunks
    seed: int
    parameters: str


@dataclass(eq=False)
class Job:
    settings: Settings  # resolved by the worker against the model it runs on
    kind: Kind = "txt2img"
    image: Image.Image | None = None
    mask: Image.Image | None = None
    model: ModelEntry | None = None  # None: the selected model when the job starts
    origin: str = "v1"  # "v1" or "a1111"
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    state: State = "queued"
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    invalid: bool = False  # the error is the request's fault (an SdlabError): 422, not 500
    image_no: int = 0  # the image of the batch being made (0-based)
    step: int = 0  # steps done of that image
    total: int = 0  # its steps (img2img runs fewer than `steps`)
    results: list[Result] = field(default_factory=list)
    released: bool = False  # results dropped once delivered (A1111 calls)
    events: list[dict] = field(default_factory=list)  # appended by the worker, read by event streams
    preview: bytes | None = None  # PNG of the latest decoded x̂0
    preview_version: int = 0
    preview_asked: float = 0.0  # monotonic time of the last request for a preview
    preview_made: float = 0.0
    model_info: ModelInfo | None = None
    inpainting_conditioning: bool = False
    check: Callable[[Settings], None] | None = None  # the server's limits, on the resolved settings
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def images(self) -> int:
        return self.settings.batch

    @property
    def fraction(self) -> float:
        if self.state == "done":
            return 1.0
        within = self.step / self.total if self.total else 0.0
        return min(1.0, (self.image_no + within) / max(1, self.images))

    def emit(self, event: str, **data) -> None:
        self.events.append({"event": event, **data})

    def ask_preview(self) -> None:
        self.preview_asked = time.monotonic()


def fill_size(settings: Settings, image: Image.Image | None, cfg: ModelConfig) -> Settings:
    """An edit with no width/height works at the image's size, rounded down to the VAE's multiple."""
    return settings if image is None else settings.sized_for(image.size, cfg.vae.downscale)


class JobQueue:
    def __init__(self, host: ModelHost, limit: int, *, keep_seconds: float = 600.0, keep_jobs: int = 100,
                 preview_interval: float = 1.0):
        self.host = host
        self.limit = limit  # waiting jobs; the running one is not counted
        self.keep_seconds = keep_seconds
        self.keep_jobs = keep_jobs
        self.preview_interval = preview_interval
        self.running: Job | None = None
        self._waiting: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}  # every job still remembered, oldest first
        self._durations: deque[float] = deque(maxlen=20)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="sdlab-worker", daemon=True)

    # --- what HTTP handlers call --------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            while self._waiting:
                self._finish(self._waiting.popleft(), "cancelled")
            if self.running is not None:
                self.running.cancel_requested.set()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job, *, bypass_limit: bool = False) -> Job:
        """Queue a job; QueueFull when `limit` jobs already wait (model switches pass: they are not work)."""
        with self._cond:
            self._prune()
            if self._stopping:
                raise QueueFull(self.retry_after())
            waiting = sum(1 for j in self._waiting if j.kind != "switch")
            if not bypass_limit and waiting >= self.limit:
                raise QueueFull(self.retry_after())
            self._waiting.append(job)
            self._jobs[job.id] = job
            job.emit("queued", position=len(self._waiting))
            self._cond.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            self._prune()
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._cond:
            self._prune()
            return [j for j in self._jobs.values() if j.kind != "switch"]

    def position(self, job: Job) -> int:
        """How many jobs run before this one (0 when it is running or next)."""
        with self._cond:
            if job.state != "queued":
                return 0
            ahead = [j for j in self._waiting if j.kind != "switch"]
            return ahead.index(job) + (self.running is not None) if job in ahead else 0

    def cancel(self, job: Job) -> None:
        """A queued job ends at once; a running one at its next sampler step."""
        with self._cond:
            if job.state == "queued" and job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, "cancelled")
            elif job.state == "running":
                job.cancel_requested.set()

    def interrupt(self) -> Job | None:
        """A1111's /interrupt: stop the running job, keeping the images it finished."""
        job = self.running
        if job is not None:
            job.cancel_requested.set()
        return job

    def release(self, job: Job) -> None:
        """Drop a delivered job's images; its record stays until it expires."""
        job.results = []
        job.released = True

    def retry_after(self) -> int:
        per_job = sum(self._durations) / len(self._durations) if self._durations else DEFAULT_JOB_S
        return max(1, min(600, math.ceil(per_job * (len(self._waiting) + 1))))

    # --- the worker ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._waiting.popleft()
                self.running, job.state, job.started = job, "running", time.time()
            job.emit("started")
            outcome: State = "done"
            error = None
            try:
                self._run(job)
            except Cancelled:
                outcome = "cancelled"
            except SdlabError as e:
                outcome, error, job.invalid = "failed", str(e), True
            except Exception as e:  # a bug or the device (out of memory): the job fails, the server goes on
                log.exception("job %s failed", job.id)
                outcome, error = "failed", f"internal error: {type(e).__name__}: {e}"
            with self._cond:
                self.running = None
                if outcome == "done" and job.kind != "switch":
                    self._durations.append(time.time() - (job.started or job.created))
                self._finish(job, outcome, error)

    def _finish(self, job: Job, state: State, error: str | None = None) -> None:
        job.state, job.error, job.finished = state, error, time.time()
        job.image = job.mask = None  # let go of the inputs
        job.emit(state, **({"error": error} if error else {"images": len(job.results)}))
        job.done.set()

    def _run(self, job: Job) -> None:
        if job.kind == "switch":
            self.host.pipeline(job.model)
            self.host.selected = job.model or self.host.selected
            return
        _, pipe = self.host.pipeline(job.model)
        settings = fill_size(job.settings, job.image, pipe.config).resolved(pipe.config)
        if job.check is not None:
            job.check(settings)
        job.settings, job.model_info = settings, pipe.info
        job.inpainting_conditioning = pipe.runner.inpainting_model and job.mask is not None
        for i in range(settings.batch):  # one image per run: finished images survive a cancel
            if job.cancel_requested.is_set():
                raise Cancelled
            job.image_no, job.step, job.total = i, 0, 0
            one = replace(settings, seed=settings.seed + i, batch=1)
            image = pipe.run(one, self._on_step(job, i), image=job.image, mask=job.mask,
                             on_preview=self._on_preview(job, pipe))[0]
            text = {k: v for k, v in image.info.items() if isinstance(v, str)}
            job.results.append(Result(png_bytes(image, text), one.seed, text.get("parameters", "")))
            job.emit("image", index=i, seed=one.seed)

    def _on_step(self, job: Job, image_no: int) -> Callable[[int, int], None]:
        def on_step(done: int, total: int) -> None:
            job.step, job.total = done, total
            job.emit("progress", image=image_no, images=job.images, step=done, total=total)
            if job.cancel_requested.is_set() or self._stopping:
                raise Cancelled

        return on_step

    def _on_preview(self, job: Job, pipe: Pipeline):
        def on_preview(latents) -> None:  # latents: x̂0, (1, 4, h, w)
            now = time.monotonic()
            if now - job.preview_asked > PREVIEW_INTEREST_S or now - job.preview_made < self.preview_interval:
                return
            job.preview = png_bytes(pipe.runner.preview(latents[:1])[0])
            job.preview_made = now
            job.preview_version += 1

        return on_preview

    def _prune(self) -> None:
        """Forget finished jobs past their time, and the oldest beyond `keep_jobs`."""
        now = time.time()
        finished = [j for j in self._jobs.values() if j.state in FINISHED]
        expired = finished[: max(0, len(finished) - self.keep_jobs)]
        expired += [j for j in finished if now - (j.finished or now) > self.keep_seconds]
        for job in expired:
            self._jobs.pop(job.id, None)
