"""`sdlab train`: stage 1 (the VAE) then stage 2 (U-Net + text encoder on cached latents), one run folder.

    OUT/train.json           the run's settings (a resumed run must keep them, except the session ones)
    OUT/vae-state.pt         stage-1 checkpoint while the VAE trains (removed once vae.safetensors exists)
    OUT/vae.safetensors      the trained VAE with its latent scaling factor; found here, stage 1 is skipped
    OUT/latents.pt           the dataset encoded once: posterior moments and tokenised captions
    OUT/diffusion-state.pt   stage-2 checkpoint: weights, EMA, optimizer, scheduler, step, RNG states
    OUT/samples/*.png        VAE reconstructions and sample grids (EMA weights, the txt2img pipeline)
    OUT/log.jsonl            one line per step: stage, step, loss, lr
    OUT/ranks/rank-N.json    distributed runs: each rank's weight hash and the samples it saw
    OUT/model.safetensors    the final model (EMA weights), readable by `sdlab.load`

Launched by `torchrun` / `accelerate launch` it runs data-parallel (DDP, data sharded by rank).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from sdlab.checkpoints.save import save_single_file
from sdlab.config import ModelConfig, preset
from sdlab.errors import SdlabError
from sdlab.models.vae import AutoencoderKL
from sdlab.train import distributed
from sdlab.train.diffusion import (
    DiffusionStage,
    LatentCache,
    LatentDiffusion,
    SampleSpec,
    build_cache,
    cache_key,
    components,
    load_cache,
    new_networks,
    sample_grid,
    save_cache,
)
from sdlab.train.distributed import Dist
from sdlab.train.loop import LoopConfig, fit
from sdlab.train.settings import SESSION_FIELDS, TrainSettings, check_kept
from sdlab.train.sources import SampleStream, data_key, open_source
from sdlab.train.vae import VAELoss, VAEStage, latent_scale, load_vae, save_vae, set_scale

DEFAULT_SAMPLE_PROMPTS = 4  # distinct captions from the start of the data, when none are given


@dataclass(frozen=True)
class RunFiles:
    root: Path

    settings = property(lambda self: self.root / "train.json")
    vae_state = property(lambda self: self.root / "vae-state.pt")
    vae = property(lambda self: self.root / "vae.safetensors")
    cache = property(lambda self: self.root / "latents.pt")
    state = property(lambda self: self.root / "diffusion-state.pt")
    samples = property(lambda self: self.root / "samples")
    log = property(lambda self: self.root / "log.jsonl")
    ranks = property(lambda self: self.root / "ranks")
    model = property(lambda self: self.root / "model.safetensors")


@dataclass
class TrainResult:
    model: Path | None  # written by the main process once the last step is done
    config: ModelConfig
    finished: bool
    main: bool  # this is the main process
    vae_losses: list[float] = field(default_factory=list)  # this session's, one per step
    losses: list[float] = field(default_factory=list)
    module: LatentDiffusion | None = None


# --- settings ----------------------------------------------------------------------------------------
def check_run(s: TrainSettings, files: RunFiles, resume: bool) -> None:
    """A new run must not overwrite a training in progress; a resumed one must keep its settings."""
    if not resume:
        busy = [p.name for p in (files.vae_state, files.state) if p.exists()]
        if busy:
            raise SdlabError(
                f"{files.root}: already holds a training run ({', '.join(busy)}); pass --resume to continue it, "
                "or choose another --out"
            )
        return
    if not files.settings.exists():
        raise SdlabError(f"{files.root}: nothing to resume (no train.json); start the run without --resume")
    check_kept(files.settings, s, SESSION_FIELDS)


def model_config(s: TrainSettings) -> ModelConfig:
    cfg = preset(s.preset)
    if cfg.inpainting or cfg.requires_aesthetics_score:
        raise SdlabError(f"sdlab train makes text-to-image models; {cfg.name} is an inpainting or refiner config")
    size = s.size or cfg.default_size
    if size <= 0 or size % cfg.vae.downscale:
        raise SdlabError(f"size {size} must be a positive multiple of {cfg.vae.downscale} (the VAE's downscale factor)")
    schedule = replace(cfg.schedule, prediction_type=s.prediction_type) if s.prediction_type else cfg.schedule
    return replace(cfg, default_size=size, schedule=schedule)


def check_vae(vae: AutoencoderKL, cfg: ModelConfig, source: str) -> AutoencoderKL:
    if vae.cfg.latent_channels != cfg.unet.in_channels:
        raise SdlabError(
            f"{source}: a VAE with {vae.cfg.latent_channels} latent channels, but the {cfg.name} U-Net takes "
            f"{cfg.unet.in_channels}"
        )
    if cfg.default_size % vae.cfg.downscale:
        raise SdlabError(f"{source}: size {cfg.default_size} is not a multiple of this VAE's factor {vae.cfg.downscale}")
    return vae


def default_prompts(dataset: Dataset, count: int = DEFAULT_SAMPLE_PROMPTS, look: int = 64) -> tuple[str, ...]:
    """The first `count` distinct non-empty captions among the first `look` samples."""
    prompts: list[str] = []
    for i in range(min(look, len(dataset))):
        caption = dataset[i][1]
        if caption and caption not in prompts:
            prompts.append(caption)
        if len(prompts) == count:
            break
    return tuple(prompts)


class Log:
    """JSON lines, one per step, written by the main process. A stage's first record drops the lines of
    that stage from its step on: steps an interrupted session did after its last checkpoint."""

    def __init__(self, path: Path):
        self.path = path
        self.started: set[str] = set()

    def __call__(self, record: dict) -> None:
        if record["stage"] not in self.started:
            self.started.add(record["stage"])
            self._forget(record["stage"], record["step"])
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def _forget(self, stage: str, step: int) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = [line for line in lines if not _at_or_after(json.loads(line), stage, step)]
        if len(keep) != len(lines):
            self.path.write_text("".join(keep), encoding="utf-8")


def _at_or_after(record: dict, stage: str, step: int) -> bool:
    return record.get("stage") == stage and record.get("step", 0) >= step


# --- stages ------------------------------------------------------------------------------------------
def loop_config(s: TrainSettings, stage: str) -> LoopConfig:
    common = dict(precision=s.precision, save_every=s.save_every, sample_every=s.sample_every, seed=s.seed, clip=s.clip or None)
    if stage == "vae":
        return LoopConfig(
            steps=s.vae_steps, batch=s.vae_batch, lr=s.vae_lr, warmup=min(s.warmup, s.vae_steps // 10), **common
        )
    return LoopConfig(
        steps=s.steps, batch=s.batch, lr=s.lr, warmup=s.warmup, lr_schedule=s.lr_schedule,
        weight_decay=s.weight_decay, accumulate=s.accumulate, ema_decay=s.ema_decay, stop_at=s.stop_at, **common,
    )


def train_vae(
    s: TrainSettings, loop: LoopConfig, cfg: ModelConfig, dataset: Dataset, files: RunFiles, d: Dist,
    device: torch.device, resume: bool,
) -> tuple[AutoencoderKL, list[float]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        vae = AutoencoderKL(cfg.vae)
    stream = SampleStream(len(dataset), s.seed, d.rank, d.world)
    stage = VAEStage(VAELoss(vae, s.kl_weight), dataset, stream, s.vae_batch, s.workers, device, files.samples)
    result = fit(stage, loop, d, device, files.vae_state, resume, Log(files.log))
    return vae.eval(), result.losses


def latents(
    s: TrainSettings, vae: AutoencoderKL, cfg: ModelConfig, dataset: Dataset, files: RunFiles, d: Dist,
    device: torch.device, rescale: bool,
) -> tuple[AutoencoderKL, LatentCache]:
    """The latent cache (encoded by the main process), and the VAE with its scaling factor set when
    `rescale` (a VAE trained here): then vae.safetensors is written and the stage-1 checkpoint removed."""
    key = cache_key(vae, data_key(s.data, cfg.default_size, s.limit), cfg)
    cache = None
    if d.main:
        cache = load_cache(files.cache, key)
        if cache is None:
            cache = build_cache(vae, dataset, cfg, key, device, s.workers)
            save_cache(cache, files.cache)
        if rescale:
            generator = torch.Generator().manual_seed(s.seed)
            save_vae(set_scale(vae, latent_scale(cache.moments, generator)), files.vae)
            files.vae_state.unlink(missing_ok=True)
    distributed.barrier(d)
    if rescale:  # every session and rank continues from the file, so a resumed run sees the same VAE
        vae = load_vae(files.vae).to(device)
    if cache is None:
        cache = load_cache(files.cache, key)
    if cache is None:
        raise SdlabError(f"{files.cache}: the latent cache could not be read back")
    return vae.eval().requires_grad_(False), cache


def write_rank_record(files: RunFiles, d: Dist, stage: DiffusionStage, ema_hash: str | None) -> None:
    record = {
        "rank": d.rank,
        "world": d.world,
        "weights_sha256": distributed.state_hash(stage.module),
        "ema_sha256": ema_hash,
        "samples_seen": stage.samples_seen,
        "first_samples": stage.seen,
    }
    files.ranks.mkdir(parents=True, exist_ok=True)
    (files.ranks / f"rank-{d.rank}.json").write_text(json.dumps(record) + "\n")


# --- the whole run -----------------------------------------------------------------------------------
def train(s: TrainSettings, resume: bool = False) -> TrainResult:
    """Run (or resume) both stages; returns the final model's path once the last step is done."""
    return distributed.launched(s.device, s.threads, lambda d, device: run(s, resume, d, device))


def run(s: TrainSettings, resume: bool, d: Dist, device: torch.device) -> TrainResult:
    files = RunFiles(Path(s.out))
    check_run(s, files, resume)
    cfg = model_config(s)
    loops = {stage: loop_config(s, stage) for stage in ("vae", "diffusion")}  # bad numbers fail before any work
    dataset = open_source(s.data, cfg.default_size, s.limit)
    distributed.barrier(d)  # every rank checked the run before the main one writes to it
    if d.main:
        files.root.mkdir(parents=True, exist_ok=True)
        files.settings.write_text(json.dumps(asdict(s), indent=2) + "\n")

    vae_losses: list[float] = []
    if s.vae:
        vae, rescale = check_vae(load_vae(Path(s.vae)), cfg, s.vae), False
    elif files.vae.exists():
        vae, rescale = check_vae(load_vae(files.vae), cfg, str(files.vae)), False
    else:
        vae, vae_losses = train_vae(s, loops["vae"], cfg, dataset, files, d, device, resume)
        rescale = True
    vae, cache = latents(s, vae.to(device), cfg, dataset, files, d, device, rescale)
    cfg = replace(cfg, vae=vae.cfg)

    unet, encoders = new_networks(cfg, s.seed)
    stage = DiffusionStage(
        LatentDiffusion(cfg, unet, encoders, s.min_snr_gamma, s.min_snr_floor), vae, cache, SampleStream(len(cache), s.seed, d.rank, d.world),
        s.batch, s.cfg_dropout, device, files.samples,
        SampleSpec(s.sample_prompts or default_prompts(dataset), steps=s.sample_steps, guidance=s.sample_guidance),
    )
    result = fit(stage, loops["diffusion"], d, device, files.state, resume, Log(files.log))
    ema = result.trainer.ema
    if d.active:
        write_rank_record(files, d, stage, None if ema is None else distributed.tensors_hash(ema.shadow))
    out = TrainResult(None, cfg, result.finished, d.main, vae_losses, result.losses, stage.module)
    if result.finished and d.main:
        comps = components(stage.module, vae, ema, "sdlab train")
        out.model = save_single_file(comps, files.model, dtype=s.dtype)
        if s.sample_every and s.steps % s.sample_every and stage.sample_spec.prompts:
            sample_grid(comps, stage.sample_spec, device, files.samples / f"step-{s.steps:06d}.png")
    distributed.barrier(d)
    return out
