"""Stage 2: the U-Net and its text encoder(s), trained jointly from scratch on the latents of a frozen VAE.

    x0  = scaling_factor · (z − shift),  z ~ q(z|x)      cached posterior moments, a fresh sample each use
    t   ~ U{0, …, T−1},  ε ~ N(0, I)                    T and ᾱ from the model's ScheduleConfig
    x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε
    loss = mean (net(x_t, t, c) − target)²,  target = ε (epsilon) or sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x0 (v)

With `min_snr_gamma` γ each sample's squared error is weighted by min(SNR_t, γ) / SNR_t (epsilon) or
min(SNR_t, γ) / (SNR_t + 1) (v), SNR_t = ᾱ_t / (1 − ᾱ_t): the x0-error weighted by min(SNR, γ), so the
nearly clean timesteps stop dominating (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy"). Near zero terminal SNR that weight also vanishes at the noisiest timesteps, which
alone decide the background and the layout; `min_snr_floor` f keeps every weight at least f there:
w = max(w_min-SNR, f). (With plain v-MSE those timesteps, whose loss stays large because x0 is barely
predictable there, dominated instead, and the model never learned the objects.)

c is the caption's context. With probability `cfg_dropout` a caption is replaced by the empty prompt,
tokenised exactly as the pipelines tokenise an empty negative prompt (and zeroed for models that
force zeros for it, as SDXL base does): the unconditional half of classifier-free guidance.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from sdlab.checkpoints.load import Components
from sdlab.config import ModelConfig, TextConditioner, to_dict
from sdlab.diffusion.schedules import alphas_cumprod
from sdlab.models.clip import CLIPTextModel
from sdlab.models.layers import ResBlock, SpatialTransformer
from sdlab.models.unet import UNet, added_condition
from sdlab.models.vae import AutoencoderKL, DiagonalGaussian
from sdlab.pipelines.settings import Settings
from sdlab.pipelines.runner import Runner
from sdlab.prompts import _pooled_index as pooled_index  # the encoder whose feature SDXL pools
from sdlab.prompts import tokenize_prompt
from sdlab.tokenizer import Tokenizer
from sdlab.train.distributed import tensors_hash
from sdlab.train.grids import write_grid
from sdlab.train.loop import EMA, atomic_torch_save
from sdlab.train.sources import SampleStream
from sdlab.train.vae import encode_moments

ENCODE_BATCH = 64  # images per VAE forward while caching latents
RECORDED_SAMPLES = 1024  # sample indices a stage remembers (ranks/rank-N.json of distributed runs)


# --- captions ----------------------------------------------------------------------------------------
def empty_prompt_ids(tokenizer: Tokenizer) -> Tensor:
    """(L,) ids of "" as the pipelines tokenise an empty negative prompt (BOS, EOS, then PAD)."""
    (chunk,) = tokenize_prompt("", tokenizer)
    return torch.tensor(chunk.ids, dtype=torch.long)


def drop_captions(batch: int, rate: float, generator: torch.Generator) -> Tensor:
    """(B,) bool: which captions become the empty prompt, each independently with probability `rate`."""
    return torch.rand(batch, generator=generator) < rate


# --- from-scratch initialisation --------------------------------------------------------------------
@torch.no_grad()
def init_unet(unet: UNet) -> UNet:
    """ldm's `zero_module`s: every residual branch's last conv, every transformer's proj_out and the
    output conv start at zero, so the untrained network is the identity on each residual path."""
    zero = [unet.out[-1]]
    for m in unet.modules():
        if isinstance(m, ResBlock):
            zero.append(m.out_layers[-1])
        elif isinstance(m, SpatialTransformer):
            zero.append(m.proj_out)
    for layer in zero:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return unet


@torch.no_grad()
def init_text_encoder(encoder: CLIPTextModel) -> CLIPTextModel:
    """OpenAI CLIP's initialisation: small embeddings, residual projections scaled by depth, zero biases."""
    cfg = encoder.cfg
    width = cfg.hidden_size
    attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * cfg.num_layers) ** -0.5, (2 * width) ** -0.5
    text = encoder.text_model
    nn.init.normal_(text.embeddings.token_embedding.weight, std=0.02)
    nn.init.normal_(text.embeddings.position_embedding.weight, std=0.01)
    for layer in text.encoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for linear, std in ((attn.q_proj, attn_std), (attn.k_proj, attn_std), (attn.v_proj, attn_std),
                            (attn.out_proj, proj_std), (mlp.fc1, fc_std), (mlp.fc2, proj_std)):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)
    if cfg.projection_dim is not None:
        nn.init.normal_(encoder.text_projection.weight, std=width**-0.5)
    return encoder


def freeze_unused(encoder: CLIPTextModel, spec: TextConditioner, pooled: bool) -> None:
    """Stop training what the conditioning never reads (layers after `hidden_layer`, an unapplied final
    LayerNorm, an unpooled projection): DDP needs every trained parameter to get a gradient."""
    if pooled:
        return
    used = spec.hidden_layer % (encoder.cfg.num_layers + 1)  # hidden states 0..used are computed
    for layer in encoder.text_model.encoder.layers[used:]:
        layer.requires_grad_(False)
    if not spec.final_layer_norm:
        encoder.text_model.final_layer_norm.requires_grad_(False)
    if encoder.cfg.projection_dim is not None:
        encoder.text_projection.requires_grad_(False)


def new_networks(cfg: ModelConfig, seed: int) -> tuple[UNet, list[CLIPTextModel]]:
    """A freshly initialised U-Net and text encoders, the same for a seed whatever the global RNG holds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = init_unet(UNet(cfg.unet))
        encoders = [init_text_encoder(CLIPTextModel(spec.encoder)) for spec in cfg.text]
    pooled_at = pooled_index(cfg.text)
    for i, (encoder, spec) in enumerate(zip(encoders, cfg.text)):
        freeze_unused(encoder, spec, pooled=i == pooled_at)
    return unet, encoders


# --- the trained module --------------------------------------------------------------------------------
class LatentDiffusion(nn.Module):
    """U-Net + text encoders; forward(x0, ids, drop, t, noise) is the ε/v MSE of one batch."""

    def __init__(
        self, cfg: ModelConfig, unet: UNet, text_encoders: Sequence[CLIPTextModel], min_snr_gamma: float | None = None,
        min_snr_floor: float = 0.0,
    ):
        super().__init__()
        self.cfg = cfg
        self.min_snr_gamma = min_snr_gamma
        self.min_snr_floor = min_snr_floor
        self.unet = unet
        self.text_encoders = nn.ModuleList(text_encoders)
        self.pooled_at = pooled_index(cfg.text)
        self.register_buffer("alphas_cumprod", alphas_cumprod(cfg.schedule), persistent=False)  # (T,)
        self.empty_ids = [empty_prompt_ids(Tokenizer(spec.tokenizer)) for spec in cfg.text]  # (L,) each

    def condition(self, ids: Sequence[Tensor], drop: Tensor) -> tuple[Tensor, Tensor | None]:
        """Token ids (B, L) per encoder, drop (B,) -> context (B, L, D_total) and SDXL's y (B, adm) or None."""
        contexts, pooled = [], None
        for i, (encoder, spec, tokens) in enumerate(zip(self.text_encoders, self.cfg.text, ids)):
            empty = self.empty_ids[i].to(tokens.device)
            tokens = torch.where(drop[:, None], empty, tokens)  # (B, L)
            hidden, feature = encoder.encode(tokens, spec.hidden_layer, spec.final_layer_norm, i == self.pooled_at)
            contexts.append(hidden)  # (B, L, D_i)
            pooled = feature if i == self.pooled_at else pooled
        context = torch.cat(contexts, dim=-1)  # (B, L, D_total)
        if self.cfg.force_zeros_for_empty_prompt:
            keep = (~drop).to(context.dtype)
            context = context * keep[:, None, None]
            pooled = None if pooled is None else pooled * keep[:, None]
        if not self.cfg.unet.addition_embed_dim:
            return context, None
        size = float(self.cfg.default_size)  # SDXL micro-conditioning as the pipeline sets it by default
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=context.device).expand(len(context), -1)
        return context, added_condition(pooled, time_ids, self.cfg.unet)

    def forward(
        self, x0: Tensor, ids: Sequence[Tensor], drop: Tensor, t: Tensor, noise: Tensor, weights: Tensor | None = None
    ) -> Tensor:
        """The batch's mean loss; with `weights` (B,), the mean of each sample's loss times its weight."""
        context, y = self.condition(ids, drop)
        ac = self.alphas_cumprod[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise  # (B, C, h, w)
        if self.cfg.prediction_type == "v_prediction":
            target = ac.sqrt() * noise - (1 - ac).sqrt() * x0
        else:
            target = noise
        prediction = self.unet(x_t, t, context, y=y)  # (B, C, h, w)
        if self.min_snr_gamma is None and weights is None:
            return F.mse_loss(prediction.float(), target.float())
        per_sample = (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
        if self.min_snr_gamma is not None:
            per_sample = self.loss_weights(t) * per_sample
        return (per_sample if weights is None else weights.to(per_sample) * per_sample).mean()

    def loss_weights(self, t: Tensor) -> Tensor:
        """Min-SNR-γ weights (B,) of timesteps t (B,), at least `min_snr_floor`."""
        ac = self.alphas_cumprod[t].double()
        snr = ac / (1 - ac)
        clipped = snr.clamp(max=self.min_snr_gamma)
        weights = clipped / (snr + 1) if self.cfg.prediction_type == "v_prediction" else clipped / snr
        return weights.clamp(min=self.min_snr_floor).float()


# --- the latent cache --------------------------------------------------------------------------------
@dataclass
class LatentCache:
    """The dataset encoded once: posterior moments and the tokenised captions, in dataset order."""

    key: str
    moments: Tensor  # (N, 2C, h, w) float32
    ids: tuple[Tensor, ...]  # (N, L) int64 per text encoder

    def __len__(self) -> int:
        return len(self.moments)


def cache_key(vae: AutoencoderKL, data: str, cfg: ModelConfig) -> str:
    tokenizers = [json.dumps(to_dict(spec.tokenizer)) for spec in cfg.text]
    return hashlib.sha256("|".join([tensors_hash(vae.state_dict()), data, *tokenizers]).encode()).hexdigest()


def build_cache(
    vae: AutoencoderKL, dataset: Dataset, cfg: ModelConfig, key: str, device: torch.device, workers: int
) -> LatentCache:
    """Encode every image (fp32) and tokenise every caption, in dataset order."""
    captions: list[str] = []

    def images() -> Iterator[Tensor]:
        for x, text in DataLoader(dataset, batch_size=ENCODE_BATCH, num_workers=workers, generator=torch.Generator()):
            captions.extend(text)
            yield x

    moments = encode_moments(vae, images(), device)  # (N, 2C, h, w)
    ids = tuple(Tokenizer(spec.tokenizer)(captions) for spec in cfg.text)  # (N, L) each
    return LatentCache(key, moments, ids)


def save_cache(cache: LatentCache, path: Path) -> None:
    atomic_torch_save({"key": cache.key, "moments": cache.moments, "ids": list(cache.ids)}, path)


def load_cache(path: Path, key: str) -> LatentCache | None:
    """The cache at `path` if it was made from the same VAE, data and tokenizers; else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 — an unreadable cache is rebuilt
        return None
    if state.get("key") != key:
        return None
    return LatentCache(key, state["moments"], tuple(state["ids"]))


# --- one batch's loss --------------------------------------------------------------------------------
def denoising_loss(
    model: nn.Module, vae: AutoencoderKL, moments: Tensor, ids: Sequence[Tensor], cfg_dropout: float, cfg: ModelConfig,
    generator: torch.Generator, device: torch.device, weights: Tensor | None = None,
) -> Tensor:
    """Draw the batch's latents, timesteps, noise and dropped captions from `generator`; `model`'s loss.

    moments (B, 2C, h, w) posterior moments, ids (B, L) per text encoder, weights (B,) or None."""
    x0 = vae.scale_latents(DiagonalGaussian(moments).sample(generator))  # (B, C, h, w)
    b = len(x0)
    t = torch.randint(0, cfg.schedule.num_train_timesteps, (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    drop = drop_captions(b, cfg_dropout, generator)
    to = device
    extra = {} if weights is None else {"weights": weights.to(to)}
    return model(x0.to(to), [i.to(to) for i in ids], drop.to(to), t.to(to), noise.to(to), **extra)


# --- the stage ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleSpec:
    prompts: tuple[str, ...]
    seeds: int = 2  # columns: seeds 0 .. seeds - 1 for every prompt
    steps: int = 20
    guidance: float = 5.0
    sampler: str = "dpmpp_2m"


def components(module: LatentDiffusion, vae: AutoencoderKL, ema: EMA | None, source: str) -> Components:
    """A model the pipelines can run: a copy of the trained networks, with the EMA weights when given."""
    averaged = copy.deepcopy(module)
    if ema is not None:
        ema.copy_to(averaged)
    averaged.eval().requires_grad_(False)
    cfg = module.cfg
    tokenizers = tuple(Tokenizer(spec.tokenizer) for spec in cfg.text)
    return Components(cfg, averaged.unet, vae, tuple(averaged.text_encoders), tokenizers, source)


@torch.no_grad()
def sample_grid(comps: Components, spec: SampleSpec, device: torch.device, path: Path) -> Path:
    """One row per prompt, one column per seed, through the txt2img pipeline."""
    runner = Runner(comps, device, torch.float32)
    tiles = []
    for prompt in spec.prompts:
        s = Settings(prompt, steps=spec.steps, guidance=spec.guidance, sampler=spec.sampler, seed=0, batch=spec.seeds)
        tiles.extend(image for _, image in runner.generate_images(s.resolved(comps.config)))
    return write_grid(tiles, spec.seeds, path, {"prompts": json.dumps(list(spec.prompts))})


@dataclass
class DiffusionStage:
    """Stage 2 for the loop in `sdlab.train.loop`."""

    module: LatentDiffusion
    vae: AutoencoderKL  # frozen; its config carries the scaling factor
    cache: LatentCache
    stream: SampleStream
    batch: int
    cfg_dropout: float
    device: torch.device
    samples: Path
    sample_spec: SampleSpec
    name: str = "diffusion"
    seen: list[int] = field(default_factory=list)  # the first RECORDED_SAMPLES indices this session used
    samples_seen: int = 0

    def batches(self, start: int) -> Iterator[tuple[Tensor, tuple[Tensor, ...]]]:
        for idx in self.stream.batches(start * self.batch, self.batch):
            self.seen.extend(idx[: max(0, RECORDED_SAMPLES - len(self.seen))])
            self.samples_seen += len(idx)
            yield self.cache.moments[idx], tuple(ids[idx] for ids in self.cache.ids)

    def loss(self, model: nn.Module, batch: tuple[Tensor, tuple[Tensor, ...]], generator: torch.Generator) -> Tensor:
        moments, ids = batch
        return denoising_loss(model, self.vae, moments, ids, self.cfg_dropout, self.module.cfg, generator, self.device)

    def sample(self, step: int, ema: EMA | None) -> None:
        if self.sample_spec.prompts:
            comps = components(self.module, self.vae, ema, f"step {step}")
            sample_grid(comps, self.sample_spec, self.device, self.samples / f"step-{step:06d}.png")

