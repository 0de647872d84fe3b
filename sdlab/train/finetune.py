"""`sdlab finetune`: adapt a trained model to a folder of images — a LoRA, the whole U-Net (and text
encoder), DreamBooth with prior preservation, or a textual-inversion embedding.

    OUT/finetune.json        the run's settings (a resumed run keeps them, except the session ones)
    OUT/class-images/        DreamBooth's class images, made once by the base model (PNG + .txt)
    OUT/latents.pt           the images encoded once (posterior moments per sample, bucketed) and captions
    OUT/state.pt             checkpoint: what is trained, optimizer, schedule, step, RNG states
    OUT/samples/*.png        sample grids with what is trained applied
    OUT/log.jsonl            one line per step
    OUT/ranks/rank-N.json    distributed runs: each rank's weight hash and the batches it saw
    OUT/NAME.safetensors     the result: a LoRA in kohya's layout, an embedding in AUTOMATIC1111's, or a
                             single-file model; with --diffusers also OUT/NAME-diffusers/ in diffusers' layout

The objective is the pretraining one (`train/diffusion.py`): ε/v MSE at uniform timesteps, captions
replaced by the empty prompt at `caption_dropout`. DreamBooth adds class images made by the base model
from `class_prompt`; each sample's loss is weighted 1 (instance) or `prior_weight` (class) and the batch
mean taken. Launched by torchrun / accelerate launch it runs data-parallel like `sdlab train`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from sdlab.checkpoints.embeddings import Embedding, write_embedding
from sdlab.checkpoints.formats import strip_prefix
from sdlab.checkpoints.load import TEXT_COMPONENT_NAMES, Components, build, load
from sdlab.checkpoints.lora import write_lora
from sdlab.checkpoints.save import save_diffusers, save_single_file
from sdlab.errors import SdlabError
from sdlab.models.clip import CLIPTextModel
from sdlab.models.layers import gradient_checkpointing
from sdlab.models.unet import UNet
from sdlab.pipelines.images import save_png
from sdlab.pipelines.runner import Runner
from sdlab.pipelines.settings import Settings
from sdlab.prompts import Fragment, build_chunks
from sdlab.train import distributed
from sdlab.train.adapters import TARGETS, LoraTraining, TextualInversionTraining, text_layers, unet_layers
from sdlab.train.buckets import BucketStream, bucket_sizes, fit_to_bucket, nearest_bucket
from sdlab.train.diffusion import ENCODE_BATCH, LatentDiffusion, SampleSpec, denoising_loss, freeze_unused, sample_grid
from sdlab.train.distributed import Dist, tensors_hash
from sdlab.train.loop import LoopConfig, atomic_torch_save, fit
from sdlab.train.settings import check_kept
from sdlab.train.sources import data_key, expand, open_pictures, to_tensor
from sdlab.train.streams import is_stream, stream_samples
from sdlab.train.trainer import Log
from sdlab.train.vae import encode_moments

METHODS = ("lora", "full", "textual-inversion")


@dataclass(frozen=True)
class FinetuneSettings:
    out: str
    data: tuple[str, ...] = ()  # one folder of images with .txt captions, or .tar shards
    model: str | None = None  # the base model (default: sdlab's own)
    method: str = "lora"
    name: str | None = None  # of the result file, and of a textual-inversion embedding (default: OUT's name)
    caption: str | None = None  # every image's caption (DreamBooth's instance prompt); default: its .txt
    size: int | None = None  # pixels (a square's side; the area of every bucket); default: the model's
    buckets: bool = False  # aspect-ratio bucketing instead of square centre crops
    # LoRA
    rank: int = 8
    alpha: float | None = None  # default: the rank (scale 1)
    targets: str = "transformer"  # attention | transformer (kohya's default) | all (+ residual convs: LoCon)
    train_text_encoder: bool = False  # LoRA on / full training of the text encoder(s) too
    # textual inversion
    vectors: int = 1
    init_word: str = "*"
    # DreamBooth
    class_prompt: str | None = None
    class_images: int = 0
    prior_weight: float = 1.0
    # optimisation
    steps: int = 500
    batch: int = 4
    lr: float = 1e-4
    warmup: int = 0
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    accumulate: int = 1
    clip: float = 1.0
    ema_decay: float | None = None
    caption_dropout: float = 0.0
    min_snr_gamma: float | None = None
    precision: str = "bf16"
    gradient_checkpointing: bool = False
    fsdp: bool = False  # full fine-tuning under several processes: shard weights, gradients, optimizer state
    seed: int = 0
    # this session
    save_every: int = 250
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    sample_guidance: float = 5.0
    stop_at: int | None = None
    threads: int | None = None
    device: str = "auto"
    diffusers: bool = False  # also write the result in diffusers' layout
    dtype: str = "fp32"  # storage dtype of a full fine-tune's model

    def __post_init__(self) -> None:
        choices = {"method": METHODS, "targets": TARGETS, "precision": ("bf16", "fp16", "fp32"),
                   "lr_schedule": ("constant", "cosine"), "dtype": ("fp32", "fp16", "bf16")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise SdlabError(f"{key.replace('_', ' ')} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if not self.data:
            raise SdlabError("finetune needs --data: a folder of images with .txt captions, or .tar shards")
        if self.rank < 1 or self.vectors < 1:
            raise SdlabError(f"rank and vectors must be at least 1, got {self.rank} and {self.vectors}")
        if not 0 <= self.caption_dropout <= 1:
            raise SdlabError(f"caption dropout must be in [0, 1], got {self.caption_dropout}")
        if self.class_images < 0 or self.prior_weight < 0:
            raise SdlabError("class images and prior weight must not be negative")
        if self.class_images and not self.class_prompt:
            raise SdlabError("class images (DreamBooth prior preservation) need a --class-prompt")
        if self.fsdp and self.method != "full":
            raise SdlabError("--fsdp shards full fine-tuning; LoRA and textual inversion train little enough for DDP")
        if self.method == "textual-inversion" and self.class_images:
            raise SdlabError("prior preservation is for LoRA and full fine-tuning, not textual inversion")

    @property
    def result_name(self) -> str:
        return self.name or Path(self.out).name


SESSION_FIELDS = frozenset({"out", "save_every", "sample_every", "sample_prompts", "sample_steps", "sample_guidance",
                            "stop_at", "threads", "device", "diffusers", "dtype"})


@dataclass(frozen=True)
class Files:
    root: Path

    settings = property(lambda self: self.root / "finetune.json")
    class_images = property(lambda self: self.root / "class-images")
    cache = property(lambda self: self.root / "latents.pt")
    state = property(lambda self: self.root / "state.pt")
    samples = property(lambda self: self.root / "samples")
    log = property(lambda self: self.root / "log.jsonl")
    ranks = property(lambda self: self.root / "ranks")


def check_run(s: FinetuneSettings, files: Files, resume: bool) -> None:
    if not resume:
        if files.state.exists():
            raise SdlabError(f"{files.root}: already holds a run (state.pt); pass --resume to continue it, or choose another --out")
        return
    if not files.settings.exists():
        raise SdlabError(f"{files.root}: nothing to resume (no finetune.json); start the run without --resume")
    check_kept(files.settings, s, SESSION_FIELDS)


# --- the examples: instance images (and DreamBooth's class images) ---------------------------------------
Example = tuple[Image.Image, str, float]  # image as stored, caption, loss weight


def instance_examples(s: FinetuneSettings) -> Iterator[Example]:
    """The training images with their captions, read one at a time: local folders and shards, or shards
    streamed from URLs / pipes (`sdlab.train.streams`)."""
    if is_stream(s.data):
        source: Iterator[tuple[Image.Image, str]] = stream_samples(s.data)
    else:
        pictures = open_pictures(list(s.data), 0)
        source = (pictures.read(i) for i in range(len(pictures)))
    for image, caption in source:
        caption = s.caption if s.caption is not None else caption
        if s.method == "textual-inversion" and s.result_name not in caption:
            raise SdlabError(f"textual inversion learns the name {s.result_name!r}: every caption must contain it "
                             f"({caption!r} does not; pass --caption 'a photo of NAME' or write it into the .txt files)")
        yield image, caption, 1.0


def make_class_images(s: FinetuneSettings, comps: Components, files: Files, device: torch.device) -> None:
    """DreamBooth's class images, made by the base model from the class prompt (seeds 0, 1, …) and kept in
    OUT/class-images/, so a resumed run reuses them."""
    folder = files.class_images
    folder.mkdir(parents=True, exist_ok=True)
    runner = Runner(comps, device, torch.float32)
    for i in range(s.class_images):
        path = folder / f"{i:05d}.png"
        if not path.exists():
            settings = Settings(s.class_prompt or "", steps=s.sample_steps, guidance=s.sample_guidance, seed=i)
            ((_, image),) = list(runner.generate_images(settings.resolved(comps.config)))
            save_png(image, path, {})


def class_examples(s: FinetuneSettings, files: Files) -> Iterator[Example]:
    for i in range(s.class_images):
        with Image.open(files.class_images / f"{i:05d}.png") as im:
            yield im.convert("RGB"), s.class_prompt or "", s.prior_weight


# --- the cache ----------------------------------------------------------------------------------------
@dataclass
class Cache:
    key: str
    moments: list[Tensor]  # (2C, h, w) float32 per sample; h, w by its bucket
    buckets: list[int]
    ids: tuple[Tensor, ...]  # (N, L) per text encoder
    weights: Tensor  # (N,)
    captions: list[str]

    def save(self, path: Path) -> None:
        atomic_torch_save({"key": self.key, "moments": self.moments, "buckets": self.buckets, "ids": list(self.ids),
                           "weights": self.weights, "captions": self.captions}, path)


def caption_ids(captions: list[str], comps: Components, extra: list[dict[str, tuple[int, ...]]]) -> tuple[Tensor, ...]:
    """(N, L) token ids per text encoder: each caption's first chunk, an embedding's name as its ids."""
    out = []
    for tokenizer, names in zip(comps.tokenizers, extra):
        chunks = [build_chunks([Fragment(c, 1.0)], tokenizer, extra=names)[0].ids for c in captions]
        out.append(torch.tensor(chunks, dtype=torch.long))
    return tuple(out)


def bucket_multiple(comps: Components) -> int:
    """Pixels a side must be a multiple of: latents that every U-Net level halves evenly (64 for SD)."""
    return comps.config.vae.downscale * 2 ** (len(comps.config.unet.block_out_channels) - 1)


def build_cache(examples: Iterable[Example], comps: Components, size: int, buckets: bool, extra, device: torch.device,
                key: str) -> Cache:
    """Encode every example (fp32) at its bucket's size, a batch of one bucket at a time, as they arrive."""
    sizes = bucket_sizes(size, bucket_multiple(comps)) if buckets else [(size, size)]
    moments: list[Tensor | None] = []
    assigned, captions, weights = [], [], []
    pending: dict[int, list[tuple[int, Tensor]]] = {}

    def flush(b: int) -> None:
        part = pending.pop(b, [])
        if part:
            pixels = torch.stack([x for _, x in part])  # (n, 3, H, W)
            for (i, _), m in zip(part, encode_moments(comps.vae, iter([pixels]), device)):
                moments[i] = m

    for n, (image, caption, weight) in enumerate(examples):
        b = nearest_bucket(*image.size, sizes)
        assigned.append(b)
        captions.append(caption)
        weights.append(weight)
        moments.append(None)
        pending.setdefault(b, []).append((n, to_tensor(fit_to_bucket(image, sizes[b]))))
        if len(pending[b]) == ENCODE_BATCH:
            flush(b)
    for b in list(pending):
        flush(b)
    if not captions:
        raise SdlabError("the data holds no images")
    ids = caption_ids(captions, comps, extra)
    return Cache(key, moments, assigned, ids, torch.tensor(weights), captions)  # type: ignore[arg-type]


def cache_key(s: FinetuneSettings, comps: Components, size: int, extra) -> str:
    """What the cache depends on: the VAE, the data (local files by path, size and time; streams by URL),
    the captions and class images asked for, the size, buckets and embedding ids."""
    data = " ".join(s.data) if is_stream(s.data) else data_key(list(s.data), size, None)
    parts = [tensors_hash(comps.vae.state_dict()), data, json.dumps([s.caption, s.class_prompt, s.class_images,
             s.prior_weight, size, s.buckets, [sorted(e.items()) for e in extra]])]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def cached(files: Files, key: str) -> Cache | None:
    if not files.cache.is_file():
        return None
    try:
        state = torch.load(files.cache, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 — an unreadable cache is rebuilt
        return None
    if state.get("key") != key:
        return None
    return Cache(key, list(state["moments"]), list(state["buckets"]), tuple(state["ids"]), state["weights"],
                 list(state["captions"]))


# --- what is trained ------------------------------------------------------------------------------------
def text_components(comps: Components) -> tuple[str, ...]:
    return TEXT_COMPONENT_NAMES.get(comps.config.family, ("text_encoder",))


def trained_module(s: FinetuneSettings, model: LatentDiffusion, comps: Components) -> nn.Module:
    if s.method == "lora":
        layers = {"unet": unet_layers(model.unet, s.targets)}
        if s.train_text_encoder:
            for name, encoder, spec in zip(text_components(comps), comps.text_encoders, comps.config.text):
                pooled = model.pooled_at is not None and comps.text_encoders[model.pooled_at] is encoder
                layers[name] = text_layers(encoder, s.targets, None if pooled else spec.hidden_layer)
        return LoraTraining(model, layers, s.rank, s.alpha or float(s.rank), seed=s.seed)
    if s.method == "textual-inversion":
        return TextualInversionTraining(model, s.result_name, s.vectors, s.init_word, comps.tokenizers)
    model.requires_grad_(False)
    model.unet.requires_grad_(True)
    if s.train_text_encoder:
        for i, (encoder, spec) in enumerate(zip(model.text_encoders, comps.config.text)):
            encoder.requires_grad_(True)
            freeze_unused(encoder, spec, pooled=i == model.pooled_at)
    return model


@dataclass
class FinetuneStage:
    """The loop's stage (`sdlab.train.loop.Stage`)."""

    name: str
    module: nn.Module
    comps: Components  # the model as it runs, with what is trained in place (for sample grids)
    cache: Cache
    stream: BucketStream
    cfg_dropout: float
    device: torch.device
    samples: Path
    sample_spec: SampleSpec
    batches_seen: list[list[int]] = field(default_factory=list)

    def batches(self, start: int):
        for idx in self.stream.batches(start):
            if len(self.batches_seen) < 64:
                self.batches_seen.append(idx)
            moments = torch.stack([self.cache.moments[i] for i in idx])  # (B, 2C, h, w), one bucket
            yield moments, tuple(ids[idx] for ids in self.cache.ids), self.cache.weights[idx]

    def loss(self, model: nn.Module, batch, generator: torch.Generator) -> Tensor:
        moments, ids, weights = batch
        uniform = bool((weights == 1).all())
        return denoising_loss(model, self.comps.vae, moments, ids, self.cfg_dropout, self.comps.config, generator,
                              self.device, None if uniform else weights)

    def sample(self, step: int, ema) -> None:
        if self.sample_spec.prompts:
            with torch.no_grad():
                sample_grid(self.comps, self.sample_spec, self.device, self.samples / f"step-{step:06d}.png")


# --- the run ------------------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    outputs: list[Path]
    finished: bool
    main: bool
    losses: list[float] = field(default_factory=list)
    module: nn.Module | None = None


def finetune(s: FinetuneSettings, resume: bool = False) -> FinetuneResult:
    return distributed.launched(s.device, s.threads, lambda d, device: run(s, resume, d, device))


def base_model(s: FinetuneSettings, device: torch.device) -> Components:
    from sdlab.api import default_model

    comps = load(s.model or default_model(), dtype=torch.float32, device=device)
    if comps.config.inpainting or comps.config.requires_aesthetics_score:
        raise SdlabError(f"finetune adapts text-to-image models; {comps.source} is an inpainting model or a refiner")
    return comps


def run(s: FinetuneSettings, resume: bool, d: Dist, device: torch.device) -> FinetuneResult:
    files = Files(Path(s.out))
    check_run(s, files, resume)
    loop = LoopConfig(steps=s.steps, batch=s.batch, lr=s.lr, warmup=s.warmup, lr_schedule=s.lr_schedule,  # type: ignore[arg-type]
                      weight_decay=s.weight_decay, accumulate=s.accumulate, clip=s.clip or None, ema_decay=s.ema_decay,
                      precision=s.precision, save_every=s.save_every, sample_every=s.sample_every, stop_at=s.stop_at,  # type: ignore[arg-type]
                      seed=s.seed, fsdp=s.fsdp)
    comps = base_model(s, device)
    size = s.size or comps.config.default_size
    if size % bucket_multiple(comps):
        raise SdlabError(f"size {size} must be a multiple of {bucket_multiple(comps)}")
    if s.method == "textual-inversion" and s.caption is not None and s.result_name not in s.caption:
        raise SdlabError(f"textual inversion learns the name {s.result_name!r}: the caption must contain it")
    if not is_stream(s.data):
        expand(list(s.data))  # missing files fail here, on every rank, before anything is written
    distributed.barrier(d)  # every rank checked the run before the main one writes to it
    if d.main:
        files.root.mkdir(parents=True, exist_ok=True)
        files.settings.write_text(json.dumps(asdict(s), indent=2) + "\n")
    if s.class_images:
        distributed.main_first(d, lambda: make_class_images(s, comps, files, device))

    model = LatentDiffusion(comps.config, comps.unet, comps.text_encoders, s.min_snr_gamma)
    module = trained_module(s, model, comps)
    if s.gradient_checkpointing:
        gradient_checkpointing(comps.unet)
    extra = [e.text_model.embeddings.extra_names for e in comps.text_encoders]
    key = cache_key(s, comps, size, extra)

    def build() -> Cache:  # the main process: the cache on disk, or made from the data and saved
        cache = cached(files, key)
        if cache is None:
            examples = itertools.chain(instance_examples(s), class_examples(s, files))
            cache = build_cache(examples, comps, size, s.buckets, extra, device, key)
            cache.save(files.cache)
        return cache

    cache = distributed.main_first(d, build) or cached(files, key)  # the other ranks read what main saved
    if cache is None:
        raise SdlabError(f"{files.cache}: the latent cache could not be read back")

    spec = SampleSpec(s.sample_prompts or tuple(dict.fromkeys(cache.captions))[:4], steps=s.sample_steps,
                      guidance=s.sample_guidance)
    stage = FinetuneStage(s.method, module, comps, cache, BucketStream(cache.buckets, s.batch, s.seed, d.rank, d.world),
                          s.caption_dropout, device, files.samples, spec)
    result = fit(stage, loop, d, device, files.state, resume, Log(files.log))
    if result.trainer.ema is not None:
        result.trainer.ema.copy_to(module)
    if result.trainer.sharded:  # every rank joins the gathering; the main one writes from a whole copy
        from sdlab.train.sharding import gathered

        state = gathered(module.state_dict())
        module = whole_copy(state, comps) if d.main else module
    else:
        state = module.state_dict()
    if d.active:
        files.ranks.mkdir(parents=True, exist_ok=True)
        record = {"rank": d.rank, "world": d.world, "weights_sha256": tensors_hash(state),
                  "sharded": result.trainer.sharded, "first_batches": stage.batches_seen}
        (files.ranks / f"rank-{d.rank}.json").write_text(json.dumps(record) + "\n")
    outputs = write_result(s, module, comps, files) if result.finished and d.main else []
    distributed.barrier(d)
    return FinetuneResult(outputs, result.finished, d.main, result.losses, module)


def whole_copy(state: dict[str, Tensor], comps: Components) -> LatentDiffusion:
    """An unsharded LatentDiffusion holding a gathered state dict (unet.…, text_encoders.N.…)."""
    cfg = comps.config
    unet = build(lambda: UNet(cfg.unet), strip_prefix(state, "unet."), "gathered U-Net")
    encoders = [build(lambda: CLIPTextModel(spec.encoder), strip_prefix(state, f"text_encoders.{i}."), "gathered text encoder")
                for i, spec in enumerate(cfg.text)]
    return LatentDiffusion(cfg, unet, encoders)


def write_result(s: FinetuneSettings, module: nn.Module, comps: Components, files: Files) -> list[Path]:
    name, cfg = s.result_name, comps.config
    target = files.root / f"{name}.safetensors"
    extra = files.root / f"{name}-diffusers"
    sdxl = cfg.family.startswith("sdxl")
    if isinstance(module, LoraTraining):
        updates = module.updates()
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(module.rank),
                "ss_network_alpha": str(module.alpha), "ss_output_name": name, "ss_steps": str(s.steps),
                "ss_base_model": comps.source, "sdlab_targets": s.targets}
        out = [write_lora(target, updates, cfg.unet, sdxl=sdxl, layout="kohya", metadata=meta)]
        if s.diffusers:
            out.append(write_lora(extra / "pytorch_lora_weights.safetensors", updates, cfg.unet, sdxl=sdxl,
                                  layout="diffusers"))
        return out
    if isinstance(module, TextualInversionTraining):
        embedding = Embedding(name, tuple(v.detach().float().cpu() for v in module.vectors))
        out = [write_embedding(target, embedding)]
        if s.diffusers and len(embedding.vectors) == 1:
            out.append(write_embedding(extra / "learned_embeds.safetensors", embedding, "diffusers"))
        return out
    trained = replace(comps, unet=module.unet, text_encoders=tuple(module.text_encoders), source=f"sdlab finetune {name}")
    out = [save_single_file(trained, target, dtype=s.dtype)]
    if s.diffusers:
        out.append(save_diffusers(trained, extra, dtype=s.dtype))
    return out
