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


class _Progress:
    """One bar per image with step count, rate and ETA (tqdm's own format)."""

    def __init__(self, images: int):
        self.images, self.image, self.bar = images, 0, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None or done <= self.bar.n:
            self.close()
            self.image += 1
            self.bar = tqdm(total=total, unit="step", desc=f"image {self.image}/{self.images}", file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_generate(args: argparse.Namespace) -> int:
    from sdlab import api
    from sdlab.pipelines.settings import Settings

    options = {
        k: getattr(args, k)
        for k in ("negative", "steps", "guidance", "sampler", "schedule", "width", "height", "seed", "batch",
                  "clip_skip", "guidance_rescale", "eta", "refiner_switch")
        if getattr(args, k) is not None
    }
    model, dtype, device, refiner = args.model, args.dtype, args.device, args.refiner
    if args.replay:
        record = api.read_record(args.replay)
        settings = Settings.from_dict(record["settings"])
        if args.prompt is not None or options:
            raise SdlabError("--replay takes no prompt or generation options: it makes the recorded image again")
        model = model or record["model"]["path"]
        refiner = refiner or (record.get("refiner") or {}).get("path")
        dtype, device = dtype or record["dtype"], device or record["device"]
    elif args.prompt is None:
        raise SdlabError("generate needs a PROMPT (or --replay IMAGE.png)")
    else:
        settings = Settings(prompt=args.prompt, **options)
    pipe = api.load(
        model, device=device or "cpu", dtype=dtype, config=args.config, prediction_type=args.prediction_type,
        refiner=refiner,
    )
    settings = settings.resolved(pipe.config)
    if args.replay and pipe.info.sha256 != record["model"]["sha256"]:
        print(f"sdlab: warning: {pipe.info.path} is not the model the image was made with", file=sys.stderr)
    progress = _Progress(settings.batch)
    images = pipe.run(settings, progress)
    progress.close()
    for path in api.save(images, args.out):
        print(path)
    return 0


def cmd_png_info(args: argparse.Namespace) -> int:
    from sdlab.pipelines.images import read_png_text
    from sdlab.pipelines.metadata import PARAMETERS_KEY

    text = read_png_text(args.image)
    if PARAMETERS_KEY not in text:
        raise SdlabError(f"{args.image}: has no 'parameters' text (no generation data)")
    print(text[PARAMETERS_KEY])
    return 0


def cmd_eval_adherence(args: argparse.Namespace) -> int:
    """Generate held-out prompts at each guidance scale and score every image programmatically."""
    from tqdm import tqdm

    from sdlab import api
    from sdlab.analysis.adherence import format_report, run_adherence
    from sdlab.train.shapes import heldout_prompts

    if args.prompts < 1 or args.steps < 1:
        raise SdlabError("--prompts and --steps must be at least 1")
    pipe = api.load(args.model, device=args.device, dtype=args.dtype)
    if args.vae_roundtrip:
        table = format_report({0.0: _vae_roundtrip_report(pipe, args.prompts, args.seed)})
        print(table.replace("| guidance |", "| (VAE round trip) |"))
        return 0
    prompts = heldout_prompts(args.prompts, seed=args.seed)
    reports = {}
    with tqdm(total=len(prompts) * len(args.guidance), unit="image", file=sys.stderr) as bar:
        for guidance in args.guidance:

            def generate(prompt: str, seed: int, guidance: float = guidance):
                bar.update(1)
                options = {"sampler": args.sampler} if args.sampler else {}
                return pipe.generate(prompt, steps=args.steps, guidance=guidance, seed=seed, **options)[0]

            reports[guidance] = run_adherence(generate, prompts, seeds=[args.seed])
    table = format_report(reports)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


def _vae_roundtrip_report(pipe, count: int, seed: int):
    """The evaluator on held-out renders passed through the model's VAE: the ceiling any sampler can reach."""
    import torch

    from sdlab.analysis.adherence import evaluate
    from sdlab.pipelines.images import to_pil
    from sdlab.train.shapes import ShapesDataset

    vae = pipe.runner.components.vae
    data = ShapesDataset("heldout", count, seed=seed, size=pipe.config.default_size)
    pairs = []
    with torch.no_grad():
        for i in range(len(data)):
            image, _ = data[i]
            dtype = next(vae.parameters()).dtype
            round_trip = vae.decode(vae.encode(image[None].to(pipe.runner.device, dtype)).mode())  # (1, 3, H, W)
            pairs.append((to_pil(round_trip)[0], data.spec(i)))
    return evaluate(pairs)


def cmd_grid(args: argparse.Namespace) -> int:
    """Prompts x seeds in one captioned PNG."""
    from sdlab import api
    from sdlab.analysis.grids import prompt_grid
    from sdlab.pipelines.images import save_png

    pipe = api.load(args.model, device=args.device)
    options = {k: getattr(args, k) for k in ("steps", "guidance", "sampler") if getattr(args, k) is not None}
    pipe.generate(args.prompts[0], seed=args.seeds[0], **options)  # options are checked before any work
    grid = prompt_grid(lambda p, s: pipe.generate(p, seed=s, **options)[0], args.prompts, args.seeds, args.scale)
    print(save_png(grid, args.out, {"prompts": "\n".join(args.prompts)}))
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

    p = sub.add_parser("generate", help="text to image")
    p.add_argument("prompt", nargs="?", help="what to draw (A1111 syntax: (word:1.3), [word], BREAK)")
    p.add_argument("--model", help="diffusers folder, single file, or repo id (default: sdlab's own model)")
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--steps", type=int, help="sampling steps (default 20)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 7)")
    p.add_argument("--guidance-rescale", type=float, help="guidance rescale phi in [0, 1] (default 0)")
    p.add_argument("--sampler", help="ddim, euler_a, dpmpp_2m, … or an A1111 name such as 'DPM++ 2M Karras'")
    p.add_argument("--schedule", choices=["default", "karras", "exponential"], help="sigma schedule (default karras)")
    p.add_argument("--eta", type=float, help="noise amount of DDIM / ancestral samplers")
    p.add_argument("--width", type=int, help="pixels (default: the model's size)")
    p.add_argument("--height", type=int, help="pixels (default: the model's size)")
    p.add_argument("--seed", type=int, help="seed; image i of a batch uses seed + i (default: random)")
    p.add_argument("--batch", type=int, help="number of images (default 1)")
    p.add_argument("--clip-skip", type=int, help="use the text encoder's N-th last layer (default 1)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="compute dtype (default fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default cpu)")
    p.add_argument("--config", help="preset for reading a single file, when detection is not enough")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="override the detected one")
    p.add_argument("--refiner", metavar="MODEL", help="an SDXL refiner that finishes the base model's latents")
    p.add_argument("--refiner-switch", type=float, help="fraction of the schedule the base denoises (default 0.8)")
    p.add_argument("--out", default="outputs", help="a .png path or a folder (default: outputs/)")
    p.add_argument("--replay", metavar="IMAGE", help="make an image sdlab wrote again, from its record")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("png-info", help="print the generation parameters stored in an image")
    p.add_argument("image")
    p.set_defaults(func=cmd_png_info)


    p = sub.add_parser("eval", help="measure a model: `sdlab eval adherence`")
    evals = p.add_subparsers(dest="what", required=True)
    p = evals.add_parser("adherence", help="generate held-out shape prompts and check colour, shape, position, count")
    p.add_argument("--model", help="model to measure (default: sdlab's own model)")
    p.add_argument("--prompts", type=int, default=200, help="held-out prompts (default 200)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0, 7.5], help="scales to compare")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--sampler", help="sampler (default: generate's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and of every image (default 0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--vae-roundtrip", action="store_true",
                   help="score held-out renders after the VAE's encode/decode instead (the ceiling for samplers)")
    p.add_argument("--out", help="also write the Markdown table here")
    p.set_defaults(func=cmd_eval_adherence)

    p = sub.add_parser("grid", help="a captioned grid: one row per prompt, one column per seed")
    p.add_argument("prompts", nargs="+")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--model", help="default: sdlab's own model")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--sampler")
    p.add_argument("--scale", type=int, default=2, help="enlarge tiles this many times (default 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="grid.png")
    p.set_defaults(func=cmd_grid)

    from sdlab.train.cli import add_train_parser
    add_train_parser(sub)
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
