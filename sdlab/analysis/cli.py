"""The lab's commands: each makes a table or a picture of what a model does, and prints where it went.

    sdlab trace "a red circle" [--flops]                 shapes and dtypes stage by stage; FLOPs per block
    sdlab trace --preset sdxl --size 1024 --flops        a preset's U-Net on the meta device (no weights)
    sdlab attention "a red circle above a blue square" --words red,blue [--pixel 32,16] [--animate]
    sdlab sweep guidance --scales 1,3,5,7.5,12,20        one row per prompt, one column per scale
    sdlab sweep sampler --samplers euler,dpmpp_2m --steps 5,10,20,50
    sdlab denoise-video "a red circle" --out frames/     the predicted x0 at every step: frames, strip, GIF
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sdlab.atomic import atomic_write
from sdlab.cli_options import (
    Progress, add_model_options, add_sampling_options, given_options, load_pipeline, parse_size,
)
from sdlab.errors import SdlabError

DEFAULT_PROMPT = "a red circle above a blue square on a yellow background"  # the default model draws it
SWEEP_PROMPTS = 3  # held-out prompts of the default model a guidance sweep scores, when none are given
SAMPLER_PROMPTS = 1


def _torch_pipeline(args: argparse.Namespace, what: str):
    """These commands hook sdlab's own PyTorch modules: OpenVINO's compiled graphs have none."""
    if args.backend == "openvino":
        raise SdlabError(f"{what} hooks sdlab's PyTorch modules; it cannot run with --backend openvino")
    return load_pipeline(args, backend="torch")


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _generation_options(args: argparse.Namespace) -> dict:
    return given_options(args, ("negative", "steps", "guidance", "sampler", "schedule", "width", "height", "seed"))


# --- trace ------------------------------------------------------------------------------------------
def cmd_trace(args: argparse.Namespace) -> int:
    from sdlab.analysis.trace import format_flops, format_trace, trace_generation, trace_unet

    if args.preset is not None:
        from sdlab.config import preset

        if args.model is not None or args.prompt is not None:
            raise SdlabError("--preset traces a preset's U-Net without weights; give no model and no prompt with it")
        report = trace_unet(preset(args.preset), args.size)
    else:
        pipe = _torch_pipeline(args, "trace")
        report = trace_generation(pipe.runner, args.prompt or DEFAULT_PROMPT, size=args.size, negative=args.negative,
                                  guidance=args.guidance, seed=args.seed, name=pipe.info.name)
    if args.json:
        text = json.dumps(report.to_json(), indent=2) + "\n"
    else:
        parts = [] if args.preset is not None else [format_trace(report)]
        text = "\n\n".join(parts + ([format_flops(report)] if args.flops or args.preset else [])) + "\n"
    print(text, end="")
    out = Path(args.out or f"outputs/trace-{report.model}-{report.size[0]}x{report.size[1]}"
                            f"{'.json' if args.json else '.md'}")
    print(f"trace of {report.model} written to {_write_text(out, text)}")
    return 0


# --- attention ---------------------------------------------------------------------------------------
def _parse_pixel(text: str) -> tuple[int, int]:
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pixel must look like X,Y (image pixels), got {text!r}") from None
    return x, y


def _words(text: str | None) -> tuple[str, ...]:
    return () if text is None else tuple(w.strip() for w in text.split(",") if w.strip())


def cmd_attention(args: argparse.Namespace) -> int:
    from sdlab.analysis.attention import prompt_words, trace_attention, write_attention

    words = _words(args.words) or prompt_words(args.prompt)
    pipe = _torch_pipeline(args, "attention")
    trace = trace_attention(pipe, args.prompt, words, args.pixel, **_generation_options(args))
    files = write_attention(trace, words, args.out, animate=args.animate, scale=args.scale)
    for path in (files.image, files.words, files.pixel, files.steps):
        if path is not None:
            print(path)
    return 0


# --- sweeps -------------------------------------------------------------------------------------------
def _sweep_prompts(args: argparse.Namespace, count: int):
    from sdlab.analysis.sweeps import Prompt, default_prompts

    if args.prompt:
        return tuple(Prompt(text) for text in args.prompt)  # unscored: only the default model's own are
    if args.model is not None:
        raise SdlabError("give --prompt (repeatable): the held-out prompts that are scored are the default model's")
    return default_prompts(args.prompts or count)


def cmd_sweep(args: argparse.Namespace) -> int:
    from sdlab.analysis import sweeps

    if args.prompts is not None and args.prompts < 1:
        raise SdlabError(f"--prompts must be at least 1, got {args.prompts}")
    if args.what == "guidance":
        scales = sweeps.parse_scales(args.scales)
        prompts = _sweep_prompts(args, SWEEP_PROMPTS)
    else:
        samplers = sweeps.check_samplers(sweeps.parse_samplers(args.samplers), args.schedule or "default")
        steps = sweeps.parse_steps(args.step_counts)
        prompts = _sweep_prompts(args, SAMPLER_PROMPTS)
    pipe = load_pipeline(args)
    options = _generation_options(args)
    pipe.settings(prompts[0].text, **options)  # the options are checked before any work
    generate = sweeps.pipeline_generate(pipe, **options)
    if args.what == "guidance":
        sweep = sweeps.guidance_sweep(generate, prompts, scales, args.seeds, progress=True)
    else:
        sweep = sweeps.sampler_sweep(generate, samplers, steps, prompts, args.seeds,
                                     schedule=args.schedule or "default", progress=True)
    files = sweeps.write_sweep(sweep, args.out or f"outputs/sweep-{args.what}")
    print(sweeps.markdown_table(sweep), end="")
    for path in (files.grid, files.csv, files.markdown, files.plot):
        print(path)
    return 0


# --- denoising frames ----------------------------------------------------------------------------------
def cmd_denoise_video(args: argparse.Namespace) -> int:
    from sdlab.analysis.frames import check_output, denoise_frames, write_frames

    out = check_output(args.out, args.every, args.scale)  # refused before the run
    pipe = load_pipeline(args)  # no hooks: OpenVINO runs it too
    progress = Progress(1)
    try:
        made = denoise_frames(pipe, args.prompt, on_step=progress, **_generation_options(args))
    finally:
        progress.close()
    files = write_frames(made, out, gif=not args.no_gif, strip=not args.no_strip, every=args.every, scale=args.scale)
    print(f"{len(files.frames)} frames in {out / 'frames'}")
    for path in (files.final, files.strip, files.gif):
        if path is not None:
            print(path)
    return 0


# --- parsers ------------------------------------------------------------------------------------------
def add_lab_parsers(sub) -> None:
    p = sub.add_parser("trace", help="tensor shapes and dtypes at every stage; with --flops, FLOPs per U-Net block")
    p.add_argument("prompt", nargs="?", help=f"what to draw (default {DEFAULT_PROMPT!r})")
    add_model_options(p)
    p.add_argument("--preset", help="trace a preset's U-Net on the meta device instead (sd15, sd21, sdxl, …): no weights")
    p.add_argument("--size", type=parse_size, help="image size WxH (default: the model's)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale; <= 1: a U-Net batch of 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flops", action="store_true", help="add FLOPs and parameters per block and attention by resolution")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--out", help="file for the table (default outputs/trace-MODEL-WxH.md, or .json)")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("attention", help="cross-attention maps per prompt word over the image; self-attention of a pixel")
    p.add_argument("prompt")
    p.add_argument("--words", help="comma-separated words of the prompt (default: every word)")
    p.add_argument("--pixel", type=_parse_pixel, metavar="X,Y", help="also the self-attention of this image pixel")
    p.add_argument("--animate", action="store_true", help="also a GIF of the maps step by step")
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=4, help="enlarge the tiles this many times (default 4)")
    p.add_argument("--out", default="outputs/attention", help="folder (default outputs/attention)")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("sweep", help="image grids over guidance scales or samplers x steps, timed and scored")
    kinds = p.add_subparsers(dest="what", required=True)
    for what, help in (("guidance", "one row per prompt, one column per guidance scale, same seeds everywhere"),
                       ("sampler", "one row per sampler, one column per step count, same prompts and seeds")):
        p = kinds.add_parser(what, help=help)
        if what == "guidance":
            p.add_argument("--scales", default="1,3,5,7.5,12,20", help="comma-separated (default 1,3,5,7.5,12,20)")
        else:
            p.add_argument("--samplers", default="euler,euler_a,dpmpp_2m,ddim",
                           help="comma-separated sdlab or A1111 names (default euler,euler_a,dpmpp_2m,ddim)")
            p.add_argument("--steps", dest="step_counts", default="5,10,20,50",
                           help="comma-separated step counts (default 5,10,20,50)")
        p.add_argument("--prompt", action="append", help="a prompt (repeatable; default: the default model's "
                       "held-out prompts, whose images are scored)")
        count = SWEEP_PROMPTS if what == "guidance" else SAMPLER_PROMPTS
        p.add_argument("--prompts", type=int, help=f"how many held-out prompts (default {count})")
        p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every cell (default 0)")
        add_model_options(p)
        add_sampling_options(p, ("guidance",) if what == "guidance" else ("sampler", "steps"))
        p.add_argument("--out", help=f"folder (default outputs/sweep-{what})")
        p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("denoise-video", help="the predicted x0 at every step: frames, a captioned strip and a GIF")
    p.add_argument("prompt")
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=1, help="keep every Nth step, and always the last (default 1)")
    p.add_argument("--scale", type=int, help="enlarge strip and GIF tiles this many times (default: tiles >= 128 px)")
    p.add_argument("--no-gif", action="store_true", help="no denoise.gif")
    p.add_argument("--no-strip", action="store_true", help="no strip.png")
    p.add_argument("--out", default="outputs/denoise-video", help="folder (default outputs/denoise-video)")
    p.set_defaults(func=cmd_denoise_video)
