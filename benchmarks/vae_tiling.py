"""Peak memory and time of a large tiled VAE decode: SD 1.5's full-size VAE (random weights) decoding a
2048x2048 image in windows (sdlab.models.vae_tiling), in a fresh process so ru_maxrss is this decode's.

    python benchmarks/vae_tiling.py [--size 2048] [--window 64] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from sdlab.config import PRESETS
from sdlab.models.vae import AutoencoderKL
from sdlab.models.vae_tiling import decode_tiled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048, help="image side in pixels")
    p.add_argument("--window", type=int, default=64, help="window side in latent pixels")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    vae = AutoencoderKL(PRESETS["sd15"].vae).eval().to(dtype)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    z = torch.randn(1, 4, args.size // 8, args.size // 8, dtype=dtype)
    start = time.perf_counter()
    image = decode_tiled(vae, z, window=args.window)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{args.size}x{args.size} tiled decode ({args.dtype}, window {args.window}): {tuple(image.shape)} in {wall:.1f} s, "
          f"peak RSS {peak:.2f} GiB (weights and interpreter before the decode: {base:.2f} GiB)")


if __name__ == "__main__":
    main()
