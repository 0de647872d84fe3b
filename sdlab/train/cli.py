"""`sdlab train`: the command line over `sdlab.train.trainer.train`.

    sdlab train --preset shapes-64 --data shapes --out runs/shapes
    sdlab train --data photos/ --out runs/photos --vae-steps 5000 --steps 40000 --batch 32
    torchrun --standalone --nproc_per_node 2 -m sdlab.cli train --data 'shards/*.tar' --out runs/tar
    sdlab train --out runs/shapes --resume            # continue with the settings in runs/shapes/train.json

Every option defaults to None here so that a resumed run can tell what was given; the defaults are
TrainSettings'.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from pathlib import Path

from sdlab.errors import SdlabError
from sdlab.train.settings import CHOICES, TrainSettings, read_settings

DEFAULTS = {f.name: f.default for f in fields(TrainSettings)}


def _help(text: str, name: str) -> str:
    default = DEFAULTS.get(name)
    return f"{text} (default: {default})" if default not in (None, ()) else text


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a latent diffusion model: the VAE, then U-Net + text encoder on cached latents",
        description="Stage 1 trains the VAE (skipped with --vae or when OUT/vae.safetensors exists); stage 2 "
        "trains the U-Net and text encoder from scratch and writes OUT/model.safetensors. Under torchrun or "
        "accelerate launch it runs data-parallel.",
    )
    p.add_argument("--out", required=True, help="run folder: checkpoints, samples, log, model.safetensors")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where its checkpoint left it")
    p.add_argument("--preset", help=_help("model config (shapes-64, tiny-sd1, sd15, …)", "preset"))
    p.add_argument("--data", nargs="+", help="'shapes', a folder of images with same-name .txt captions, or .tar shards/globs")
    p.add_argument("--limit", type=int, help="use the first N samples (the shapes dataset's length, default 20000)")
    p.add_argument("--size", type=int, help="image size in pixels (default: the preset's)")
    p.add_argument("--prediction-type", choices=CHOICES["prediction_type"][1:], help="default: the preset's")
    p.add_argument("--vae", help="a trained VAE (OUT/vae.safetensors of another run, or any model): skip stage 1")
    p.add_argument("--seed", type=int, help=_help("seed of the weights, data order and noise", "seed"))
    p.add_argument("--precision", choices=CHOICES["precision"], help=_help("autocast dtype", "precision"))

    g = p.add_argument_group("stage 1: the VAE")
    g.add_argument("--vae-steps", type=int, help=_help("optimizer steps", "vae_steps"))
    g.add_argument("--vae-batch", type=int, help=_help("images per step and process", "vae_batch"))
    g.add_argument("--vae-lr", type=float, help=_help("learning rate (constant after warm-up)", "vae_lr"))
    g.add_argument("--kl-weight", type=float, help=_help("β of the KL term, per image value", "kl_weight"))

    g = p.add_argument_group("stage 2: U-Net and text encoder")
    g.add_argument("--steps", type=int, help=_help("optimizer steps", "steps"))
    g.add_argument("--batch", type=int, help=_help("latents per micro-batch and process", "batch"))
    g.add_argument("--lr", type=float, help=_help("peak learning rate (AdamW)", "lr"))
    g.add_argument("--warmup", type=int, help=_help("linear warm-up steps (stage 1: at most a tenth)", "warmup"))
    g.add_argument("--lr-schedule", choices=CHOICES["lr_schedule"], help=_help("after warm-up", "lr_schedule"))
    g.add_argument("--weight-decay", type=float, help=_help("AdamW weight decay", "weight_decay"))
    g.add_argument("--accumulate", type=int, help=_help("micro-batches per optimizer step", "accumulate"))
    g.add_argument("--clip", type=float, help=_help("max gradient norm, 0 for none (both stages)", "clip"))
    g.add_argument("--ema-decay", type=float, help=_help("EMA decay, warmed up as (1+n)/(10+n)", "ema_decay"))
    g.add_argument("--cfg-dropout", type=float, help=_help("rate of captions replaced by the empty prompt", "cfg_dropout"))
    g.add_argument("--min-snr-gamma", type=float, help="weight each timestep's loss by min(SNR, γ), e.g. 5 (default: off)")
    g.add_argument("--min-snr-floor", type=float, help="but by no less than this at the noisiest timesteps, e.g. 0.1 (default 0)")

    g = p.add_argument_group("this session (may change on --resume)")
    g.add_argument("--save-every", type=int, help=_help("checkpoint every N steps", "save_every"))
    g.add_argument("--sample-every", type=int, help=_help("progress images every N steps, 0 for none", "sample_every"))
    g.add_argument("--sample-prompt", dest="sample_prompts", action="append",
                   help="a prompt of the sample grids (repeat it; default: the first captions of the data)")
    g.add_argument("--sample-steps", type=int, help=_help("sampler steps of the grids", "sample_steps"))
    g.add_argument("--sample-guidance", type=float, help=_help("CFG scale of the grids", "sample_guidance"))
    g.add_argument("--stop-at", type=int, help="end this session after stage-2 step N, checkpointed (resume later)")
    g.add_argument("--workers", type=int, help=_help("DataLoader processes reading images", "workers"))
    g.add_argument("--threads", type=int, help="torch CPU threads (default: the cores, shared among local ranks)")
    g.add_argument("--device", help=_help("auto, cpu, cuda", "device"))
    g.add_argument("--dtype", choices=CHOICES["dtype"], help=_help("storage dtype of model.safetensors", "dtype"))
    p.set_defaults(func=cmd_train)
    return p


def settings_from_args(args: argparse.Namespace, cls=TrainSettings, stored_name: str = "train.json"):
    """The given options over `cls`'s defaults, or over the run's own settings (OUT/stored_name) with --resume."""
    given = {f.name: tuple(v) if isinstance(v, list) else v for f in fields(cls) if (v := getattr(args, f.name, None)) is not None}
    if not args.resume:
        return cls(**given)
    stored = Path(args.out) / stored_name
    if not stored.exists():
        raise SdlabError(f"{args.out}: nothing to resume (no {stored_name}); start the run without --resume")
    return replace(read_settings(stored, cls), stop_at=None, **given)  # a stop is for one session


def cmd_train(args: argparse.Namespace) -> int:
    from sdlab.train.trainer import train

    result = train(settings_from_args(args), resume=args.resume)
    if result.model is not None:
        print(result.model)
    elif not result.finished and result.main:
        print(f"stopped before the last step; continue with: sdlab train --out {args.out} --resume", file=sys.stderr)
    return 0


# --- sdlab finetune -----------------------------------------------------------------------------------
def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    from sdlab.train.finetune import METHODS, FinetuneSettings

    defaults = {f.name: f.default for f in fields(FinetuneSettings)}

    def default(text: str, name: str) -> str:
        value = defaults.get(name)
        return f"{text} (default: {value})" if value not in (None, (), False) else text

    p = subparsers.add_parser(
        "finetune",
        help="adapt a model to your images: LoRA, full fine-tuning, DreamBooth, textual inversion",
        description="Trains on a folder of images with .txt captions (or .tar shards) from a base model and writes "
        "OUT/NAME.safetensors: a kohya-layout LoRA, an AUTOMATIC1111 embedding, or a single-file model. Under "
        "torchrun or accelerate launch it runs data-parallel.",
    )
    p.add_argument("--out", required=True, help="run folder: checkpoint, samples, log, the result")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where its checkpoint left it")
    p.add_argument("--data", nargs="+", help="a folder of images with same-name .txt captions, or .tar shards/globs")
    p.add_argument("--model", help="the base model: a file, diffusers folder or repo id (default: sdlab's own)")
    p.add_argument("--method", choices=METHODS, help=default("what to train", "method"))
    p.add_argument("--name", help="the result's file name, and a textual-inversion embedding's name (default: OUT's)")
    p.add_argument("--caption", help="one caption for every image (DreamBooth's instance prompt, e.g. 'a photo of sks dog')")
    p.add_argument("--size", type=int, help="pixels: a square's side, every bucket's area (default: the model's)")
    p.add_argument("--buckets", action="store_true", default=None, help="aspect-ratio bucketing instead of square crops")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, help=default("rank r of each update", "rank"))
    g.add_argument("--alpha", type=float, help="alpha: updates are scaled by alpha / r (default: r)")
    g.add_argument("--targets", choices=("attention", "transformer", "all"),
                   help=default("layers: attention, the transformers (kohya's default), or all with convolutions (LoCon)",
                                "targets"))
    g.add_argument("--train-text-encoder", action="store_true", default=None, help="train the text encoder(s) too")
    g = p.add_argument_group("textual inversion")
    g.add_argument("--vectors", type=int, help=default("vectors of the embedding", "vectors"))
    g.add_argument("--init-word", help=default("its vectors start as this word's", "init_word"))
    g = p.add_argument_group("DreamBooth prior preservation")
    g.add_argument("--class-prompt", help="e.g. 'a photo of a dog': the base model draws the class images from it")
    g.add_argument("--class-images", type=int, help="how many class images (made once, in OUT/class-images)")
    g.add_argument("--prior-weight", type=float, help=default("loss weight of a class image", "prior_weight"))
    g = p.add_argument_group("optimisation")
    for flag, kind, text in (("--steps", int, "optimizer steps"), ("--batch", int, "images per micro-batch and process"),
                             ("--lr", float, "learning rate (AdamW)"), ("--warmup", int, "linear warm-up steps"),
                             ("--weight-decay", float, "AdamW weight decay"), ("--accumulate", int, "micro-batches per step"),
                             ("--clip", float, "max gradient norm, 0 for none"), ("--seed", int, "seed"),
                             ("--caption-dropout", float, "rate of captions replaced by the empty prompt")):
        g.add_argument(flag, type=kind, help=default(text, flag[2:].replace("-", "_")))
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), help=default("after warm-up", "lr_schedule"))
    g.add_argument("--ema-decay", type=float, help="keep an EMA of what is trained (default: none)")
    g.add_argument("--min-snr-gamma", type=float, help="weight each timestep's loss by min(SNR, γ) (default: off)")
    g.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help=default("autocast dtype", "precision"))
    g.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute U-Net activations in the backward pass: less memory, a third slower")
    g.add_argument("--fsdp", action="store_true", default=None,
                   help="full fine-tuning under torchrun / accelerate: shard weights, gradients and optimizer state "
                        "across the processes (FSDP2) instead of copying them (DDP)")
    g = p.add_argument_group("this session (may change on --resume)")
    g.add_argument("--save-every", type=int, help=default("checkpoint every N steps", "save_every"))
    g.add_argument("--sample-every", type=int, help="sample grids every N steps (default: never)")
    g.add_argument("--sample-prompt", dest="sample_prompts", action="append", help="a prompt of the grids (repeatable)")
    g.add_argument("--sample-steps", type=int, help=default("sampler steps of grids and class images", "sample_steps"))
    g.add_argument("--sample-guidance", type=float, help=default("CFG scale of grids and class images", "sample_guidance"))
    g.add_argument("--stop-at", type=int, help="end this session after step N, checkpointed")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--device", help=default("auto, cpu, cuda", "device"))
    g.add_argument("--diffusers", action="store_true", default=None, help="also write the result in diffusers' layout")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help=default("storage dtype of a fine-tuned model", "dtype"))
    p.set_defaults(func=cmd_finetune)
    return p


def cmd_finetune(args: argparse.Namespace) -> int:
    from sdlab.train.finetune import FinetuneSettings, finetune

    result = finetune(settings_from_args(args, FinetuneSettings, "finetune.json"), resume=args.resume)
    for path in result.outputs:
        print(path)
    if not result.finished and result.main:
        print(f"stopped before the last step; continue with: sdlab finetune --out {args.out} --resume", file=sys.stderr)
    return 0
