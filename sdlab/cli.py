"""The `sdlab` command line. Bad input ends in one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from sdlab.errors import SdlabError


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, _, h = text.lower().partition("x")
        size = (int(w), int(h or w))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x768, got {text!r}") from None
    if min(size) <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def cmd_inspect(args: argparse.Namespace) -> int:
    from sdlab.analysis.params import build_on_meta, format_report, parameter_report
    from sdlab.config import preset

    if (args.model is None) == (args.preset is None):
        raise SdlabError("inspect needs a MODEL path/repo id or --preset NAME (one of them)")
    if args.preset:
        cfg = preset(args.preset)
        modules, name = build_on_meta(cfg), cfg.name
    else:
        from sdlab.checkpoints.load import load

        comps = load(args.model, dtype=None, config=args.config)
        cfg, modules, name = comps.config, comps.modules(), comps.source
    f = cfg.vae.downscale
    if args.size and any(s % f for s in args.size):
        raise SdlabError(f"size {args.size[0]}x{args.size[1]} is not a multiple of {f}, which this VAE needs")
    report = parameter_report(cfg, modules, name, args.size)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from sdlab.checkpoints.load import load
    from sdlab.checkpoints.save import save_diffusers, save_single_file

    dst = Path(args.dst)
    if dst.suffix in (".ckpt", ".pt", ".bin"):
        raise SdlabError(f"{dst}: sdlab writes .safetensors single files or diffusers folders, not pickles")
    single = dst.suffix == ".safetensors"
    if single and dst.exists() and not args.force:
        raise SdlabError(f"{dst}: exists; pass --force to replace it")
    comps = load(args.src, dtype=None, config=args.config, prediction_type=args.prediction_type)
    if single:
        save_single_file(comps, dst, dtype=args.dtype)
    else:
        save_diffusers(comps, dst, dtype=args.dtype)
    print(f"wrote {dst} ({comps.config.family}, {'single file' if single else 'diffusers folder'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlab", description="Stable Diffusion from scratch in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="parameter counts per component and U-Net block, memory, latent shape")
    p.add_argument("model", nargs="?", help="diffusers folder, single file, or Hugging Face repo id")
    p.add_argument("--preset", help="a named config instead of a model (sd15, sd21, sdxl, …)")
    p.add_argument("--config", help="preset to read a single file with, when detection is not enough")
    p.add_argument("--size", type=_parse_size, help="image size WxH for the latent shape (default: the model's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="diffusers folder <-> original single .safetensors file")
    p.add_argument("src", help="diffusers folder, single file (.safetensors/.ckpt), or Hugging Face repo id")
    p.add_argument("dst", help="a .safetensors path (single file) or a new folder (diffusers layout)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="store weights in this dtype (default: as read)")
    p.add_argument("--config", help="preset for reading a single file, when detection is not enough")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="override the detected one")
    p.add_argument("--force", action="store_true", help="replace an existing single file")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SdlabError as e:
        print(f"sdlab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sdlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
