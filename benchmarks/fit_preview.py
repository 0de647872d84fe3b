"""Fit the shapes-64 progress previewer (sdlab.models.preview.PreviewNet) by distillation from the model's VAE
decoder, then measure it: error against the real decode in 8-bit levels, and time against a sampling step.

    python benchmarks/fit_preview.py [--out sdlab/data/shapes-64-preview.safetensors] [--iters 6000]

About 10 minutes on two idle cores (making the latents, then the fit). Latents to learn from, all scaled
as the sampler sees them:
  clean      posterior samples of shapes training images (what the U-Net learned to make)
  x̂0         every step's prediction while sampling training captions (blurry early, sharp late)
The target of each is the real VAE decode, clamped to [-1, 1] as pictures are. The held-out check uses
held-out-split images and held-out prompts with other seeds.

What was tried (3,000 iterations, mean levels on held-out clean / x̂0 latents; time of the network alone):
  width 32, 2 convs, no norm         5.2 / 14.7
  width 24, 4 convs, norm each       3.6 /  8.4   0.30 ms
  width 24, 4 convs, norm first      3.3 /  8.1   0.15 ms
  width 16, 4 convs, norm first      3.9 /  9.5   0.11 ms   <- shipped (6,000 iterations, more x̂0: 3.4 / 8.3)
  a full-size 3x3 conv after the pixel shuffle did not help.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import timeit
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import sdlab
from sdlab.api import default_model
from sdlab.checkpoints.preview import save_preview_net
from sdlab.models.preview import PreviewNet, PreviewNetConfig, vae_signature
from sdlab.pipelines.settings import Settings
from sdlab.train.shapes import ShapesDataset, heldout_prompts

SAMPLERS = ("dpmpp_2m", "euler_a", "euler")  # a spread of trajectories; dpmpp_2m is the default


@torch.no_grad()
def clean_latents(pipe, split: str, n: int, seed: int) -> Tensor:
    """(n, 4, 16, 16) posterior samples of the first n images of a shapes split."""
    data = ShapesDataset(split, n)
    images = torch.stack([data[i][0] for i in range(n)])  # (n, 3, 64, 64) in [-1, 1]
    generator = torch.Generator().manual_seed(seed)
    vae = pipe.runner.components.vae
    return torch.cat([vae.scale_latents(vae.encode(x).sample(generator)) for x in images.split(256)])


@torch.no_grad()
def trajectories(pipe, prompts: list[str], seed: int) -> Tensor:
    """(n·steps, 4, 16, 16): x̂0 after every step of sampling each prompt, samplers and step counts varied."""
    seen: list[Tensor] = []
    for i, prompt in enumerate(prompts):
        s = Settings(prompt, steps=(20, 10, 30)[i % 3], sampler=SAMPLERS[i % len(SAMPLERS)], seed=seed + i,
                     guidance=(7.0, 4.0)[i % 2])
        pipe.run(s.resolved(pipe.config), on_preview=lambda x: seen.append(x[:1].clone()))
    return torch.cat(seen)


@torch.no_grad()
def decoded(pipe, latents: Tensor) -> Tensor:
    """The real decode, clamped as pictures are: (n, 3, 64, 64) in [-1, 1]."""
    vae = pipe.runner.components.vae
    return torch.cat([vae.decode(vae.unscale_latents(z)).clamp(-1, 1) for z in latents.split(256)])


def fit(latents: Tensor, targets: Tensor, cfg: PreviewNetConfig, iters: int, batch: int, seed: int) -> PreviewNet:
    torch.manual_seed(seed)
    net = PreviewNet(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=iters, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    for it in range(iters):
        idx = torch.randint(len(latents), (batch,), generator=g)
        out = net(latents[idx])  # (batch, 3, 64, 64)
        loss = F.mse_loss(out, targets[idx]) + F.l1_loss(out, targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if it % 500 == 0 or it == iters - 1:
            print(f"  iter {it:5d}  loss {loss.item():.5f}", flush=True)
    return net.eval().requires_grad_(False)


def levels(images: Tensor) -> Tensor:
    """[-1, 1] -> 8-bit levels exactly as pictures are made (sdlab.pipelines.images.to_pil)."""
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round()


@torch.no_grad()
def errors(net: PreviewNet, latents: Tensor, targets: Tensor) -> dict[str, float]:
    diff = (levels(net(latents)) - levels(targets)).abs()  # (n, 3, 64, 64)
    per_image = diff.mean(dim=(1, 2, 3))
    return {"mean": diff.mean().item(), "worst_image_mean": per_image.max().item(), "max": diff.max().item(),
            "p99": diff.flatten().kthvalue(int(0.99 * diff.numel())).values.item()}


@torch.no_grad()
def timings(pipe, net: PreviewNet, repeats: int = 30) -> dict[str, float]:
    """Median ms of: a preview (network + picture), the full decode (+ picture), one U-Net call as CFG makes it."""
    runner = pipe.runner
    runner.previewer = net
    z = torch.randn(1, 4, 16, 16)
    unet = runner.components.unet
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([500.0, 500.0])
    context = torch.randn(2, runner.config.text[0].tokenizer.max_length, runner.config.unet.cross_attention_dim)
    calls = {"preview": lambda: runner.preview(z), "decode": lambda: runner.decode(z), "unet": lambda: unet(x, t, context)}
    return {name: 1000 * statistics.median(timeit.repeat(call, number=1, repeat=repeats)[3:])  # 3 to warm up
            for name, call in calls.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("sdlab/data/shapes-64-preview.safetensors"))
    p.add_argument("--images", type=int, default=4000, help="training-split images to encode")
    p.add_argument("--prompts", type=int, default=240, help="captions sampled for x̂0 trajectories")
    p.add_argument("--width", type=int, default=PreviewNetConfig.width)
    p.add_argument("--layers", type=int, default=PreviewNetConfig.layers)
    p.add_argument("--groups", type=int, default=PreviewNetConfig.groups)
    p.add_argument("--iters", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    pipe = sdlab.load(default_model(), backend="torch")
    cfg = PreviewNetConfig(latent_channels=pipe.config.vae.latent_channels, width=args.width, layers=args.layers,
                           groups=args.groups, upscale=pipe.config.vae.downscale)

    start = time.perf_counter()
    captions = [ShapesDataset("train", 10**6).example(10**5 + i).caption for i in range(args.prompts)]  # training distribution
    train = torch.cat([clean_latents(pipe, "train", args.images, args.seed), trajectories(pipe, captions, 1000)])
    test = {
        "clean (held-out images)": clean_latents(pipe, "heldout", 500, args.seed + 1),
        "x̂0 (held-out prompts)": trajectories(pipe, [c for c, _ in heldout_prompts(24)], 5000),
    }
    train_targets = decoded(pipe, train)
    test = {name: (z, decoded(pipe, z)) for name, z in test.items()}
    print(f"{len(train)} training latents, {sum(len(z) for z, _ in test.values())} held out "
          f"({time.perf_counter() - start:.0f} s to make)", flush=True)

    start = time.perf_counter()
    net = fit(train, train_targets, cfg, args.iters, args.batch, args.seed).half().float()  # as the file keeps it
    print(f"fitted {sum(p.numel() for p in net.parameters())} parameters in {time.perf_counter() - start:.0f} s")

    results = {name: errors(net, z, target) for name, (z, target) in test.items()}
    for name, r in results.items():
        print(f"{name:26s} mean {r['mean']:.2f}  worst image {r['worst_image_mean']:.2f}  p99 {r['p99']:.0f}  "
              f"max {r['max']:.0f} levels")
    t = timings(pipe, net)
    print(f"median ms: preview {t['preview']:.3f}, full decode {t['decode']:.2f}, U-Net call (batch 2) {t['unet']:.2f}; "
          f"preview = {100 * t['preview'] / t['unet']:.2f}% of a U-Net call")
    save_preview_net(net, vae_signature(pipe.runner.components.vae), args.out,
                     {"sdlab_preview_fit": json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "errors": results})})
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
