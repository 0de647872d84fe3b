"""The `sdlab` command line. Bad input ends in one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from sdlab.cli_options import (
    Progress, add_model_options, add_network_options, add_sampling_options, given_options, load_pipeline, parse_size,
)
from sdlab.errors import SdlabError, SdlabWarning


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


GENERATION_OPTIONS = ("negative", "steps", "guidance", "sampler", "schedule", "width", "height", "seed", "batch",
                      "clip_skip", "guidance_rescale", "eta", "refiner_switch", "tiling", "vae_tiling", "cfg_end",
                      "token_merging", "lora")
EDIT_OPTIONS = ("strength", "mask_blur", "fill", "only_masked", "padding", "composite")


def _controls(args: argparse.Namespace) -> list:
    """The repeatable --controlnet/--control-* options as api.Control; a single value of an option applies to all."""
    from sdlab.api import Control

    nets, images = args.controlnet or [], args.control_image or []
    if len(nets) != len(images):
        raise SdlabError(f"{len(nets)} --controlnet but {len(images)} --control-image: give one image per ControlNet")
    per_unit = {}
    for name in ("strength", "start", "end", "preprocess"):
        values = getattr(args, f"control_{name}") or []
        if len(values) not in (0, 1, len(nets)):
            raise SdlabError(f"--control-{name} given {len(values)} times for {len(nets)} ControlNets (give 1 or {len(nets)})")
        per_unit[name] = values * len(nets) if len(values) == 1 else values
    controls = []
    for i, (net, image) in enumerate(zip(nets, images)):
        chosen = {k: v[i] for k, v in per_unit.items() if v}
        controls.append(Control(net, image, guess_mode=args.guess_mode, **chosen))
    return controls


def _run(args: argparse.Namespace, make) -> int:
    """Run `make(on_step)` with a progress bar, then write the images (atomically) and print their paths."""
    from sdlab import api

    batch = getattr(args, "batch", None) or 1
    progress = Progress(batch)
    try:
        images = make(progress)
    finally:
        progress.close()
    for path in api.save(images, args.out):
        print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sdlab import api
    from sdlab.pipelines.settings import Settings

    options = given_options(args, GENERATION_OPTIONS)
    if args.replay:
        record = api.read_record(args.replay)
        settings = Settings.from_dict(record["settings"])
        if args.prompt is not None or options or args.controlnet:
            raise SdlabError("--replay takes no prompt or generation options: it makes the recorded image again")
        if settings.strength is not None or settings.control:
            raise SdlabError(f"{args.replay}: was made from input images (img2img, inpainting or ControlNet), "
                             "which the record does not hold; run that command again with them")
        pipe = load_pipeline(args, args.model or record["model"]["path"],
                     args.refiner or (record.get("refiner") or {}).get("path"),
                     args.dtype or record["dtype"], args.device or record["device"])
        if pipe.info.sha256 != record["model"]["sha256"]:
            print(f"sdlab: warning: {pipe.info.path} is not the model the image was made with", file=sys.stderr)
        return _run(args, lambda progress: pipe.run(settings.resolved(pipe.config), progress))
    if args.prompt is None:
        raise SdlabError("generate needs a PROMPT (or --replay IMAGE.png)")
    controls = _controls(args)
    pipe = load_pipeline(args)
    return _run(args, lambda progress: pipe.generate(args.prompt, control=controls, on_step=progress, **options))


def cmd_img2img(args: argparse.Namespace) -> int:
    from sdlab.pipelines.images import load_image

    image, controls = load_image(args.image), _controls(args)
    options = given_options(args, GENERATION_OPTIONS + ("strength",))
    pipe = load_pipeline(args)
    return _run(args, lambda progress: pipe.img2img(image, args.prompt, control=controls, on_step=progress, **options))


def cmd_inpaint(args: argparse.Namespace) -> int:
    from sdlab.pipelines.images import load_image

    image, mask, controls = load_image(args.image), load_image(args.mask), _controls(args)
    options = given_options(args, GENERATION_OPTIONS + EDIT_OPTIONS)
    pipe = load_pipeline(args)
    return _run(args, lambda progress: pipe.inpaint(image, mask, args.prompt, control=controls, on_step=progress,
                                                     **options))


def cmd_outpaint(args: argparse.Namespace) -> int:
    from sdlab.pipelines.images import load_image

    image, controls = load_image(args.image), _controls(args)
    options = given_options(args, GENERATION_OPTIONS + EDIT_OPTIONS)
    pipe = load_pipeline(args)
    return _run(args, lambda progress: pipe.outpaint(image, args.prompt, extend=args.extend, fill=args.outpaint_fill,
                                                      control=controls, on_step=progress, **options))


def _parse_extend(text: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"--extend needs LEFT,TOP,RIGHT,BOTTOM pixels >= 0, got {text!r}")
    return values  # type: ignore[return-value]


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_sampling_options(p, size_default="the model's size, or the input image's")
    p.add_argument("--guidance-rescale", type=float, help="guidance rescale phi in [0, 1] (default 0)")
    p.add_argument("--eta", type=float, help="noise amount of DDIM / ancestral samplers")
    p.add_argument("--seed", type=int, help="seed; image i of a batch uses seed + i (default: random)")
    p.add_argument("--batch", type=int, help="number of images (default 1)")
    p.add_argument("--clip-skip", type=int, help="use the text encoder's N-th last layer (default 1)")
    p.add_argument("--tiling", action="store_true", default=None, help="seamless: the image wraps around at its edges")
    p.add_argument("--vae-tiling", action="store_true", default=None,
                   help="decode the image in overlapping windows: large images in little memory")
    g = p.add_argument_group("approximate speed-ups (they change the image)")
    g.add_argument("--cfg-end", type=float, metavar="F",
                   help="guide only the first fraction F of the steps; later steps skip the unconditional pass (default 1)")
    g.add_argument("--token-merging", type=float, metavar="R",
                   help="merge the fraction R of full-resolution tokens before self-attention, up to 0.75 (default 0)")
    p.add_argument("--out", default="outputs", help="a .png path or a folder (default: outputs/)")
    add_network_options(p)
    g = p.add_argument_group("ControlNet (repeat --controlnet and --control-image for several)")
    g.add_argument("--controlnet", action="append", metavar="PATH", help="a ControlNet: diffusers folder or single file")
    g.add_argument("--control-image", action="append", metavar="IMAGE", help="the image that steers it")
    g.add_argument("--control-strength", action="append", type=float, metavar="S", help="residual scale (default 1)")
    g.add_argument("--control-start", action="append", type=float, metavar="F", help="first fraction of steps (default 0)")
    g.add_argument("--control-end", action="append", type=float, metavar="F", help="last fraction of steps (default 1)")
    g.add_argument("--control-preprocess", action="append", choices=["none", "canny"],
                   help="canny: edges of the image; none: the image is the hint (depth, pose, scribble, lineart…)")
    g.add_argument("--guess-mode", action="store_true", help="ControlNet sees only the prompted half (no prompt needed)")


def _edit_parser(sub, name: str, help: str, func, strength: float, masked: bool) -> argparse.ArgumentParser:
    """A command that edits IMAGE [MASK] following PROMPT, with every generation option."""
    p = sub.add_parser(name, help=help)
    p.add_argument("image")
    if masked:
        p.add_argument("mask", help="an image of the same size: white = repaint, black = keep")
    p.add_argument("prompt")
    _add_generation_options(p)
    p.add_argument("--strength", type=float, help=f"denoising strength in [0, 1] (default {strength:g})")
    if masked:
        _add_mask_options(p)
    p.set_defaults(func=func)
    return p


def _add_mask_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mask-blur", type=int, help="pixels of blur on the mask's edge (default 4)")
    p.add_argument("--fill", choices=["original", "noise", "nothing", "fill"],
                   help="what the masked area starts from (default original)")
    p.add_argument("--only-masked", action="store_true", default=None,
                   help="inpaint a crop around the mask at full size and paste it back")
    p.add_argument("--padding", type=int, help="pixels of context around the mask with --only-masked (default 32)")
    p.add_argument("--no-composite", dest="composite", action="store_false", default=None,
                   help="keep the decoded pixels outside the mask too, instead of the original's")


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

    if args.prompts < 1 or (args.steps is not None and args.steps < 1):
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


def _parse_pixels(text: str) -> int:
    """--max-size: 1024x1024, 1024*1024 or a pixel count."""
    try:
        w, _, h = text.lower().replace("*", "x").partition("x")
        pixels = int(w) * int(h) if h else int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-size must look like 1024x1024 (width × height), got {text!r}") from None
    if pixels <= 0:
        raise argparse.ArgumentTypeError(f"--max-size must be positive, got {text!r}")
    return pixels


def cmd_serve(args: argparse.Namespace) -> int:
    """The HTTP server: AUTOMATIC1111's API, sdlab's job API and the web page (needs the `server` extra)."""
    try:
        from sdlab.server.app import ServerConfig, serve
        from sdlab.server.service import Limits
    except ImportError as e:
        raise SdlabError(f"sdlab serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'sdlab[server]'")
    for name in ("queue", "max_steps", "max_batch"):
        if getattr(args, name) < 1:
            raise SdlabError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.auth:
        print(f"sdlab: warning: serving on {args.host} without --auth: anyone who reaches it can use it",
              file=sys.stderr)
    limits = Limits(max_pixels=args.max_size, max_steps=args.max_steps, max_batch=args.max_batch)
    cfg = ServerConfig(model=args.model, models_dir=args.models_dir, device=args.device or "cpu", dtype=args.dtype,
                       config=args.config, prediction_type=args.prediction_type, backend=args.backend,
                       low_memory=args.low_memory, auth=args.auth, queue=args.queue, limits=limits,
                       lora_dirs=tuple(args.lora_dir or ()), embeddings_dirs=tuple(args.embeddings_dir or ()))
    serve(cfg, host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlab", description="Stable Diffusion from scratch in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="parameter counts per component and U-Net block, memory, latent shape")
    p.add_argument("model", nargs="?", help="diffusers folder, single file, or Hugging Face repo id")
    p.add_argument("--preset", help="a named config instead of a model (sd15, sd21, sdxl, …)")
    p.add_argument("--config", help="preset to read a single file with, when detection is not enough")
    p.add_argument("--size", type=parse_size, help="image size WxH for the latent shape (default: the model's)")
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
    _add_generation_options(p)
    p.add_argument("--refiner", metavar="MODEL", help="an SDXL refiner that finishes the base model's latents")
    p.add_argument("--refiner-switch", type=float, help="fraction of the schedule the base denoises (default 0.8)")
    p.add_argument("--replay", metavar="IMAGE", help="make an image sdlab wrote again, from its record")
    p.set_defaults(func=cmd_generate)

    _edit_parser(sub, "img2img", "redraw an image following a prompt", cmd_img2img, 0.75, masked=False)
    _edit_parser(sub, "inpaint", "repaint where a mask is white", cmd_inpaint, 1.0, masked=True)
    p = _edit_parser(sub, "outpaint", "extend an image's canvas and paint the new area", cmd_outpaint, 1.0, masked=False)
    p.add_argument("--extend", type=_parse_extend, required=True, metavar="LEFT,TOP,RIGHT,BOTTOM",
                   help="pixels to add on each side (sides rounded up to multiples of 8)")
    p.add_argument("--outpaint-fill", choices=["edge", "fill", "noise"], default="edge",
                   help="what the new area starts from (default edge: the edge colours, blurred)")
    _add_mask_options(p)

    p = sub.add_parser("png-info", help="print the generation parameters stored in an image")
    p.add_argument("image")
    p.set_defaults(func=cmd_png_info)

    p = sub.add_parser("serve", help="HTTP server: AUTOMATIC1111's API, sdlab's job API, a web page")
    add_model_options(p)
    p.add_argument("--models-dir", metavar="DIR", help="serve every model file and diffusers folder in DIR "
                   "(clients switch with sd_model_checkpoint); --model then names the first one")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="default 7860")
    p.add_argument("--auth", default=os.environ.get("SDLAB_AUTH"), metavar="TOKEN|USER:PASS",
                   help="credentials every route needs: a Bearer token, or HTTP Basic user:pass (default: $SDLAB_AUTH)")
    p.add_argument("--queue", type=int, default=8, metavar="N", help="jobs that may wait; more get 429 (default 8)")
    p.add_argument("--max-size", type=_parse_pixels, default=2048 * 2048, metavar="WxH",
                   help="largest width × height of an image (default 2048x2048)")
    p.add_argument("--max-steps", type=int, default=150, metavar="N", help="most sampling steps (default 150)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="most images per request, batch × iterations (default 16)")
    p.add_argument("--lora-dir", action="append", metavar="DIR",
                   help="LoRA files that prompts name with <lora:name:weight> (repeatable; clients give names, not paths)")
    p.add_argument("--embeddings-dir", action="append", metavar="DIR",
                   help="textual-inversion embeddings that prompts use by name (repeatable)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help="measure a model: `sdlab eval adherence`")
    evals = p.add_subparsers(dest="what", required=True)
    p = evals.add_parser("adherence", help="generate held-out shape prompts and check colour, shape, position, count")
    p.add_argument("--model", help="model to measure (default: sdlab's own model)")
    p.add_argument("--prompts", type=int, default=200, help="held-out prompts (default 200)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0, 7.5], help="scales to compare")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's; 20, or 15 for sdlab's own)")
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

    from sdlab.analysis.cli import add_lab_parsers
    from sdlab.train.cli import add_finetune_parser, add_train_parser

    add_lab_parsers(sub)
    add_train_parser(sub)
    add_finetune_parser(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, SdlabWarning):
        print(f"sdlab: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", SdlabWarning)
            warnings.showwarning = _show_warning
            return args.func(args)
    except SdlabError as e:
        print(f"sdlab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sdlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
