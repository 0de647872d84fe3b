"""AUTOMATIC1111's HTTP API (`/sdapi/v1/...`), request and response shapes as its `modules/api/models.py`
writes them (shared/REFERENCE-a1111.md), so its clients work unchanged.

Fields sdlab has no counterpart for (hires fix, face restoration, subseeds, scripts, styles, refiner,
resize modes) are accepted and ignored, as A1111 ignores fields it does not know; unknown fields too.
Where A1111 would use 512 for a missing width or height, sdlab uses the model's own size (txt2img)
or the init image's (img2img).
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sdlab import __version__
from sdlab.diffusion.samplers import A1111_NAMES, SAMPLER_NAMES, SAMPLERS, display_name, resolve_sampler
from sdlab.errors import SdlabError
from sdlab.pipelines.images import read_png_text
from sdlab.pipelines.masks import load_mask
from sdlab.pipelines.metadata import PARAMETERS_KEY, parse_parameters
from sdlab.pipelines.networks import NETWORK_SUFFIXES, find_files
from sdlab.pipelines.settings import MAX_SEED, MAX_TOKEN_MERGING, Settings
from sdlab.server.codec import FieldError, decode_base64, decode_image, encode_base64
from sdlab.server.jobs import Job
from sdlab.server.service import Service, as_field_error, known_sampler

# sdlab setting -> the A1111 field a message about it names
FIELDS = {
    "negative": "negative_prompt", "guidance": "cfg_scale", "sampler": "sampler_name", "schedule": "scheduler",
    "batch": "batch_size", "strength": "denoising_strength", "fill": "inpainting_fill",
    "only_masked": "inpaint_full_res", "padding": "inpaint_full_res_padding",
    "clip_skip": "override_settings.CLIP_stop_at_last_layers", "image": "init_images",
    "token_merging": "override_settings.token_merging_ratio",
}  # fmt: skip
FILL_CODES = ("fill", "original", "noise", "nothing")  # A1111's inpainting_fill 0..3
# A1111's "Automatic" schedule: the sampler's own default (its sd_samplers_kdiffusion options)
AUTOMATIC_SCHEDULE = {"dpmpp_2m": "karras", "dpmpp_sde": "karras", "dpmpp_2m_sde": "exponential",
                      "dpm2": "karras", "dpm2_a": "karras", "dpmpp_2s_a": "karras"}
SCHEDULERS = (  # (A1111 name, label, sdlab schedule or None for the sampler's own, default rho)
    ("automatic", "Automatic", None, -1.0), ("uniform", "Uniform", "default", -1.0),
    ("karras", "Karras", "karras", 7.0), ("exponential", "Exponential", "exponential", -1.0),
)  # fmt: skip
POLL_S = 0.05  # how often a waiting request looks at its job and its connection


def _schedule(scheduler: str | None, sampler: str) -> str:
    key = resolve_sampler(sampler)[0]
    wanted = (scheduler or "automatic").strip().lower()
    for name, label, schedule, _ in SCHEDULERS:
        if wanted in (name, label.lower()):
            return schedule or AUTOMATIC_SCHEDULE.get(key, "default")
    if wanted == "default":
        return "default"
    raise FieldError("scheduler", f"unknown scheduler {scheduler!r}; use one of "
                     f"{', '.join(label for _, label, _, _ in SCHEDULERS)}")


class GenerationRequest(BaseModel):
    """The fields txt2img and img2img share (A1111's StableDiffusionProcessing)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"  # legacy: used when sampler_name is empty, as in A1111
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = Field(50, ge=1)
    cfg_scale: float = 7.0
    width: int | None = Field(None, ge=1)  # None: the model's own size
    height: int | None = Field(None, ge=1)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    force_task_id: str | None = None
    infotext: str | None = None

    check_sampler = field_validator("sampler_name", "sampler_index")(known_sampler)

    @property
    def sampler(self) -> str:
        return self.sampler_name or self.sampler_index


class Txt2ImgRequest(GenerationRequest):
    enable_hr: bool = False
    denoising_strength: float | None = Field(None, ge=0, le=1)  # A1111: for the hires pass, unused here
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(GenerationRequest):
    init_images: list[str] = Field(min_length=1)  # base64, with or without a data: prefix
    resize_mode: int = 0
    denoising_strength: float = Field(0.75, ge=0, le=1)
    image_cfg_scale: float | None = None
    mask: str | None = None  # base64; white = repaint
    mask_blur_x: int = Field(4, ge=0)
    mask_blur_y: int = Field(4, ge=0)
    mask_blur: int | None = Field(None, ge=0)
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpaint_full_res: bool = True  # "only masked"
    inpaint_full_res_padding: int = Field(0, ge=0)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs, each with its `parameters` text chunk")
    parameters: dict[str, Any] = Field(description="the request, defaults filled in")
    info: str = Field(description="a JSON string: all_seeds, infotexts, ... as AUTOMATIC1111 writes it")


class PngInfoRequest(BaseModel):
    image: str = ""


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float = Field(description="0..1 of the running job")
    eta_relative: float = Field(description="seconds left, estimated")
    state: ProgressState
    current_image: str | None = Field(None, description="base64 PNG of the latest preview")
    textinfo: str | None = None


def _settings(req: GenerationRequest, service: Service) -> tuple[Settings, Any]:
    overrides = req.override_settings or {}
    entry = None
    if overrides.get("sd_model_checkpoint"):
        entry = service.model(str(overrides["sd_model_checkpoint"]), "override_settings.sd_model_checkpoint")
    clip_skip = overrides.get("CLIP_stop_at_last_layers", service.options["CLIP_stop_at_last_layers"])
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or clip_skip < 1:
        raise FieldError("override_settings.CLIP_stop_at_last_layers", f"must be a whole number >= 1, got {clip_skip!r}")
    token_merging = _token_merging(overrides.get("token_merging_ratio", service.options["token_merging_ratio"]),
                                   "override_settings.token_merging_ratio")
    key = resolve_sampler(req.sampler)[0]
    takes_eta = "eta" in inspect.signature(SAMPLERS[key].fn).parameters  # A1111 ignores eta where unused
    settings = Settings(
        prompt=req.prompt, negative=req.negative_prompt, steps=req.steps, guidance=req.cfg_scale,
        sampler=req.sampler, schedule=_schedule(req.scheduler, req.sampler), width=req.width, height=req.height,
        seed=None if req.seed == -1 else req.seed, batch=req.batch_size * req.n_iter, clip_skip=clip_skip,
        eta=req.eta if takes_eta else None, tiling=bool(req.tiling), token_merging=token_merging,
    )
    return settings, entry


def _token_merging(value: Any, field: str) -> float:
    """A1111's token_merging_ratio option: a number in [0, 0.75] (0 = off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_TOKEN_MERGING:
        raise FieldError(field, f"must be a number in [0, {MAX_TOKEN_MERGING}], got {value!r}")
    return float(value)


def _check_batch(req: GenerationRequest, service: Service) -> None:
    if req.batch_size * req.n_iter > service.limits.max_batch:
        raise FieldError("batch_size", f"batch_size × n_iter = {req.batch_size * req.n_iter} images is more than "
                         f"this server's limit of {service.limits.max_batch} per request")


def _info(req: GenerationRequest, job: Job) -> dict:
    """A1111's `Processed.js()`."""
    s, results = job.settings, job.results
    seeds = [r.seed for r in results]
    infotexts = [r.parameters for r in results]
    extra = {}
    if infotexts:
        core = {"Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model", "Denoising strength",
                "Clip skip", "Version"}
        extra = {k: v for k, v in parse_parameters(infotexts[0])[2].items() if k not in core}
    info = job.model_info
    seed = seeds[0] if seeds else (s.seed if s.seed is not None else -1)
    return {
        "prompt": s.prompt, "all_prompts": [s.prompt] * len(results),
        "negative_prompt": s.negative, "all_negative_prompts": [s.negative] * len(results),
        "seed": seed, "all_seeds": seeds, "subseed": seed, "all_subseeds": seeds,
        "subseed_strength": 0, "width": s.width, "height": s.height,
        "sampler_name": display_name(s.sampler), "cfg_scale": s.guidance, "steps": s.steps,
        "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": None if info is None else info.name,
        "sd_model_hash": None if info is None else info.short_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": s.strength, "extra_generation_params": extra, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": req.styles or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
        "clip_skip": s.clip_skip, "is_using_inpainting_conditioning": job.inpainting_conditioning,
        "version": f"sdlab {__version__}",
    }


async def run_to_end(job: Job, request: Request, service: Service) -> None:
    """Wait for a job; a client that hangs up (or a server shutting down) cancels it."""
    try:
        while not job.done.is_set():
            if await request.is_disconnected():
                break
            await asyncio.sleep(POLL_S)
    finally:
        if not job.done.is_set():
            service.queue.cancel(job)


def _respond(req: GenerationRequest, job: Job, echo: dict) -> JSONResponse:
    if job.state == "failed":
        if job.invalid:
            raise as_field_error(SdlabError(job.error or "invalid settings"), FIELDS)
        return JSONResponse({"error": "GenerationFailed", "detail": job.error, "body": None, "errors": job.error},
                            status_code=500)
    images = [encode_base64(r.png) for r in job.results] if req.send_images else []
    body = GenerationResponse(images=images, parameters=echo, info=json.dumps(_info(req, job)))
    return JSONResponse(body.model_dump())


async def _generate(req: GenerationRequest, job: Job, echo: dict, request: Request, service: Service) -> JSONResponse:
    service.submit(job)
    try:
        await run_to_end(job, request, service)
        return _respond(req, job, echo)
    finally:
        service.queue.release(job)


def router(service: Service) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])

    @api.post("/txt2img", response_model=GenerationResponse)
    async def txt2img(req: Txt2ImgRequest, request: Request):
        _check_batch(req, service)
        settings, entry = _settings(req, service)
        service.check(settings, None, entry, FIELDS)
        job = Job(settings, "txt2img", model=entry, origin="a1111")
        return await _generate(req, job, req.model_dump(), request, service)

    @api.post("/img2img", response_model=GenerationResponse)
    async def img2img(req: Img2ImgRequest, request: Request):
        _check_batch(req, service)
        if len(req.init_images) > 1:
            raise FieldError("init_images", f"sdlab takes one init image per request, got {len(req.init_images)}")
        settings, entry = _settings(req, service)
        image = decode_image(req.init_images[0], "init_images[0]", service.limits.max_input_pixels)
        mask = None
        if req.mask:
            mask = decode_image(req.mask, "mask", service.limits.max_input_pixels, keep_alpha=True)
            if mask.size != image.size:
                raise FieldError("mask", f"is {mask.width}x{mask.height} but init_images[0] is "
                                 f"{image.width}x{image.height}; send a mask of the image's size")
            mask = load_mask(mask, image.size, invert=bool(req.inpainting_mask_invert))
        settings = Settings.from_dict({
            **settings.to_dict(), "strength": req.denoising_strength, "fill": FILL_CODES[req.inpainting_fill],
            "mask_blur": req.mask_blur_x if req.mask_blur is None else req.mask_blur,
            "only_masked": req.inpaint_full_res, "padding": req.inpaint_full_res_padding,
        })
        service.check(settings, image, entry, FIELDS)
        job = Job(settings, "img2img" if mask is None else "inpaint", image=image, mask=mask, model=entry, origin="a1111")
        echo = req.model_dump()
        if not req.include_init_images:
            echo["init_images"] = echo["mask"] = None
        return await _generate(req, job, echo, request, service)

    @api.get("/progress", response_model=ProgressResponse)
    async def progress(skip_current_image: bool = False):
        job = service.queue.running
        if job is None or job.kind == "switch":
            return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState())
        if not skip_current_image:
            job.ask_preview()
        fraction = job.fraction
        elapsed = time.time() - (job.started or job.created)
        state = ProgressState(
            interrupted=job.cancel_requested.is_set(), job=job.id, job_count=job.images,
            job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
            job_no=job.image_no, sampling_step=job.step, sampling_steps=job.total,
        )
        preview = None if skip_current_image or job.preview is None else encode_base64(job.preview)
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        return ProgressResponse(progress=fraction, eta_relative=eta, state=state, current_image=preview)

    @api.post("/interrupt")
    async def interrupt():
        service.queue.interrupt()
        return {}

    @api.get("/samplers")
    async def samplers():
        out = []
        for name in A1111_NAMES:
            key = SAMPLER_NAMES[name.lower()]
            aliases = [f"k_{key}"] + [a for a, k in SAMPLER_NAMES.items() if k == key and a != name.lower()]
            options = {"scheduler": AUTOMATIC_SCHEDULE[key]} if key in AUTOMATIC_SCHEDULE else {}
            out.append({"name": name, "aliases": list(dict.fromkeys(aliases)), "options": options})
        return out

    @api.get("/schedulers")
    async def schedulers():
        return [{"name": name, "label": label, "aliases": None, "default_rho": rho, "need_inner_model": False}
                for name, label, _, rho in SCHEDULERS]

    @api.get("/sd-models")
    def sd_models():  # a thread: the first listing hashes the model files
        out = []
        for entry in service.catalog.entries():
            info = service.catalog.info(entry)
            out.append({
                "title": service.catalog.title(entry), "model_name": entry.name,
                "hash": None if info is None else info.short_hash, "sha256": None if info is None else info.sha256,
                "filename": entry.filename, "config": None,
            })
        return out

    @api.get("/loras")
    def loras():  # a thread: it walks the LoRA folders
        found = find_files(service.lora_dirs, NETWORK_SUFFIXES) if service.lora_dirs else {}
        return [{"name": name, "alias": name, "path": str(path), "metadata": {}} for name, path in sorted(found.items())]

    @api.post("/refresh-loras")
    async def refresh_loras():
        return None  # the folders are read on every listing and every tag

    @api.get("/embeddings")
    async def embeddings():
        loaded = service.host.loaded
        found = {} if loaded is None else loaded[1].embeddings
        return {"loaded": {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                  "shape": e.vectors[0].shape[-1], "vectors": e.length}
                           for name, (e, _) in sorted(found.items())},
                "skipped": {}}

    @api.get("/options")
    def get_options():
        selected = service.host.selected
        info = service.catalog.info(selected)
        return {
            "sd_model_checkpoint": service.catalog.title(selected),
            "sd_checkpoint_hash": None if info is None else info.sha256,
            "samples_format": "png", "sd_vae": "None", **service.options,
        }

    @api.post("/options")
    async def set_options(options: dict[str, Any]) -> None:
        """sd_model_checkpoint (a title, name or hash from /sd-models) switches the model once the running
        and queued jobs are done; CLIP_stop_at_last_layers sets the default clip skip, token_merging_ratio the
        default token merging; others are ignored."""
        merging = _token_merging(options.get("token_merging_ratio", service.options["token_merging_ratio"]),
                                 "token_merging_ratio")
        clip_skip = options.get("CLIP_stop_at_last_layers", service.options["CLIP_stop_at_last_layers"])
        if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or clip_skip < 1:
            raise FieldError("CLIP_stop_at_last_layers", f"must be a whole number >= 1, got {clip_skip!r}")
        entry = None
        if options.get("sd_model_checkpoint") is not None:
            entry = service.model(str(options["sd_model_checkpoint"]), "sd_model_checkpoint")
        service.options["CLIP_stop_at_last_layers"] = clip_skip
        service.options["token_merging_ratio"] = merging
        if entry is not None and entry != service.host.selected:
            job = Job(Settings(prompt=""), "switch", model=entry, origin="a1111")
            service.queue.submit(job, bypass_limit=True)
            while not job.done.is_set():  # the switch happens even if this client goes away
                await asyncio.sleep(POLL_S)
            if job.state == "failed":
                raise FieldError("sd_model_checkpoint", job.error or "the model did not load")

    @api.post("/png-info")
    async def png_info(req: PngInfoRequest):
        if not req.image.strip():
            return {"info": "", "items": {}, "parameters": {}}
        data = decode_base64(req.image, "image")
        decode_image(req.image, "image", service.limits.max_input_pixels, keep_alpha=True)  # is it an image?
        text = read_png_text(io.BytesIO(data))
        geninfo = text.pop(PARAMETERS_KEY, "")
        parameters: dict[str, Any] = {}
        if geninfo:
            prompt, negative, pairs = parse_parameters(geninfo)
            parameters = {"Prompt": prompt, "Negative prompt": negative, **pairs}
            if "x" in pairs.get("Size", ""):
                parameters["Size-1"], parameters["Size-2"] = pairs["Size"].split("x", 1)
        return {"info": geninfo, "items": text, "parameters": parameters}

    return api
