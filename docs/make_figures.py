"""Regenerate every figure and table of docs/lab.md from the default model (and two presets, without weights).

    .venv/bin/python docs/make_figures.py            # about five minutes on two CPU cores

Pictures go to docs/images/lab/; each table is written into docs/lab.md between the markers
`<!-- made: NAME -->` and `<!-- /made: NAME -->`, so the text around them stays as written.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import sdlab
from sdlab.analysis import sweeps
from sdlab.analysis.attention import trace_attention, write_attention
from sdlab.analysis.frames import denoise_frames, write_frames
from sdlab.analysis.trace import format_flops, format_trace, trace_generation, trace_unet
from sdlab.config import preset

DOCS = Path(__file__).resolve().parent
FIGURES = DOCS / "images" / "lab"
GUIDE = DOCS / "lab.md"
PROMPTS = 8  # held-out prompts of the default model behind the guidance and sampler curves
SCALES = (1.0, 3.0, 5.0, 7.5, 12.0, 20.0)
SAMPLERS = ("euler", "euler_a", "dpmpp_2m_karras", "ddim")
STEPS = (5, 10, 20, 50)
ATTENTION = (  # (prompt, words): two objects, each word's map should sit on its own object
    ("a blue circle below a red triangle on a yellow background", ("blue", "circle", "red", "triangle")),
    ("a red circle above a blue square on a black background", ("red", "circle", "blue", "square")),
)
RESOLUTIONS = (("sd15", 256), ("sd15", 512), ("sd15", 768), ("sd15", 1024), ("sdxl", 1024))


def _made(tables: dict[str, str]) -> None:
    """Write each table between its markers in the guide; a marker missing from the guide is an error."""
    text = GUIDE.read_text()
    for name, table in tables.items():
        pattern = re.compile(rf"(<!-- made: {name} -->\n).*?(<!-- /made: {name} -->)", re.S)
        if not pattern.search(text):
            sys.exit(f"{GUIDE}: no markers for {name!r}")
        text = pattern.sub(lambda m: m.group(1) + table.rstrip() + "\n" + m.group(2), text)
    GUIDE.write_text(text)


def _code(text: str) -> str:
    return f"```text\n{text.rstrip()}\n```"


def attention_by_resolution() -> str:
    rows = ["| model | image | latent | U-Net GFLOP per guided step | self-attention | cross-attention |",
            "|---|---|---|---:|---:|---:|"]
    for name, side in RESOLUTIONS:
        r = trace_unet(preset(name), (side, side))
        self_flops = sum(a.self_flops for a in r.attention)
        cross_flops = sum(a.cross_flops for a in r.attention)
        f = preset(name).vae.downscale
        rows.append(f"| {name} | {side}² | {side // f}² | {r.unet_flops / 1e9:,.0f} | "
                    f"{self_flops / r.unet_flops:.1%} | {cross_flops / r.unet_flops:.1%} |")
    return "\n".join(rows)


def main() -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    pipe = sdlab.load(backend="torch")
    tables = {}

    trace = trace_generation(pipe.runner, "a red circle on a blue background", name=pipe.info.name)
    tables["trace"] = _code(format_trace(trace))
    tables["flops"] = _code(format_flops(trace))
    head, _blocks, *stages_and_attention = format_flops(trace_unet(preset("sd15"), (512, 512))).split("\n\n")
    tables["sd15-flops"] = _code("\n\n".join([head, *stages_and_attention]))  # the per-block rows left out
    tables["resolutions"] = attention_by_resolution()

    prompts = sweeps.default_prompts(PROMPTS)
    generate = sweeps.pipeline_generate(pipe)
    guidance = sweeps.guidance_sweep(generate, prompts, SCALES, progress=True)
    files = sweeps.write_sweep(guidance, FIGURES / "guidance")
    tables["guidance"] = files.markdown.read_text().split("Every prompt pooled:", 1)[-1].strip()

    samplers = sweeps.sampler_sweep(generate, SAMPLERS, STEPS, prompts, progress=True)
    files = sweeps.write_sweep(samplers, FIGURES / "samplers")
    tables["samplers"] = "\n".join(files.markdown.read_text().splitlines()[2:])

    for i, (prompt, words) in enumerate(ATTENTION):
        traced = trace_attention(pipe, prompt, words, pixel=(32, 16), seed=0)
        write_attention(traced, words, FIGURES / f"attention-{i}")
        if i == 0:  # the animation at half the size: its frames add up
            steps = write_attention(traced, words[:2], FIGURES / "attention-steps", animate=True, scale=2).steps
            for other in (FIGURES / "attention-steps").iterdir():
                if other != steps:
                    other.unlink()

    frames = denoise_frames(pipe, "a yellow heart on a purple background", seed=3)
    write_frames(frames, FIGURES / "denoise", every=2)
    shutil.rmtree(FIGURES / "denoise" / "frames")  # the strip and the GIF hold them
    for folder in ("guidance", "samplers"):  # the grid holds the tiles and the guide the table
        shutil.rmtree(FIGURES / folder / "images")
        for name in ("cells.csv", "cells.md"):
            (FIGURES / folder / name).unlink()
    _made(tables)
    print(f"figures in {FIGURES}, tables in {GUIDE}")


if __name__ == "__main__":
    main()
