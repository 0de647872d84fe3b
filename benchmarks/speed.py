"""sdlab against diffusers and OpenVINO on this CPU, measured side by side in one run.

The OpenVINO numbers need a second Python environment: optimum-intel pulls in torchvision, whose import
breaks transformers next to torch 2.13, so it cannot live in sdlab's venv. Create it once:

    python -m venv /work/venv-ov
    /work/venv-ov/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu \
        torch==2.13.0 'optimum-intel[openvino]' diffusers transformers
    /work/venv-ov/bin/pip uninstall -y torchvision

Run (from the repository root, with sdlab's venv):

    python benchmarks/speed.py                      # every figure, SD 1.5 at full size: tens of minutes
    python benchmarks/speed.py --write              # ... and put the table into benchmarks/RESULTS.md
    python benchmarks/speed.py --quick              # tiny random models, in-process figures: a smoke test
    python benchmarks/speed.py --quick --only memory,import,first-step   # ... of the fresh-process figures
    python benchmarks/speed.py --only unet --sizes 512 --dtypes bf16 --repeats 5 --sdxl

What is measured (each figure is the median of --repeats runs, the single runs shown beside it; the
implementations take turns within every repetition, in a rotating order, after one untimed warm-up each):

- unet: one classifier-free-guidance U-Net step, batch 2 with a 77-token context, per --sizes and --dtypes.
  sdlab's U-Net is called as its pipeline calls it (`runner.components.unet(x, t, context)`), diffusers'
  as `unet(x, t, encoder_hidden_states=...)`, OpenVINO's exported U-Net through its own infer request,
  reshaped to the same static shapes. bf16 means weights cast to bf16 (torch) or
  INFERENCE_PRECISION_HINT=bf16 on the f32 IR (OpenVINO).
- vae: one VAE decode of a 1x4x64x64 latent (512² image), per dtype.
- txt2img: a whole 20-step 512² image in bf16: prompt encoding, Euler sampling with guidance 7.5 and the
  VAE decode, through each library's own pipeline.
- memory: the peak resident memory of that txt2img, each in a fresh process. It is the process's VmHWM
  from /proc/self/status: `getrusage(RUSAGE_SELF).ru_maxrss` would be wrong here, since Linux carries the
  parent's (this script's, with models loaded) peak across fork and exec into the child's ru_maxrss.
- import: wall time of a fresh `python -c "import sdlab"` against `import diffusers` (both import lazily),
  of importing the pipeline class (`from sdlab.api import Pipeline`, `from diffusers import
  StableDiffusionPipeline`, `from optimum.intel import OVStableDiffusionPipeline`), and of `sdlab --help`.
- first-step: from a cold process to the first U-Net step done: start Python, load the saved folder,
  encode the prompt, one CFG step (the txt2img dtype; OpenVINO loads its saved IR and compiles it).
- the ceiling: a 4096² torch matmul per dtype in GFLOP/s. The U-Net and VAE FLOPs are counted once with
  torch.utils.flop_counter.FlopCounterMode on sdlab's networks (on the meta device), so every U-Net and
  VAE figure is also given as achieved GFLOP/s and as a fraction of the ceiling of its dtype.
- --sdxl: the SDXL U-Net at full size (2.6 B parameters, random weights shared by sdlab's and diffusers'
  modules), one CFG step at 512², sdlab against diffusers.

The models are SD 1.5 at full size with random weights (sdlab's `sd15` preset, built by
tests/reference.py), saved once as a diffusers folder in benchmarks/.cache/ that sdlab
(`sdlab.load(folder)`) and diffusers (`from_pretrained(folder)`) both load; optimum-intel exports that
folder once to OpenVINO IR next to it. OpenVINO runs in a long-lived worker process (this file with the
hidden `--worker openvino`, under --ov-python) that answers JSON-line requests on stdin/stdout, so its
runs alternate with the others like any implementation. Its log: benchmarks/.cache/openvino.log.
Every implementation holds its model at once, one dtype at a time: the full-size fp32 round needs about
20 GB of memory (less without sdlab's own OpenVINO backend); `--dtypes bf16` about half of that.
"sdlab" is eager PyTorch (`backend="torch"`), "sdlab-openvino" sdlab on its OpenVINO backend.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
OV_LOG = CACHE / "openvino.log"
DEFAULT_OV_PYTHON = Path("/work/venv-ov/bin/python")

PROMPT = "a photograph of an astronaut riding a horse on the moon"
GUIDANCE = 7.5
TIMESTEP = 500.0
TOKENS = 77
FIGURES = ("unet", "vae", "txt2img", "memory", "import", "first-step")
SUBPROCESS_FIGURES = ("memory", "import", "first-step")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}
Timer = Callable[[], float]  # runs the measured work once, returns its seconds


@dataclass(frozen=True)
class Scale:
    """The models and sizes of a run: full size, or tiny ones for --quick."""

    preset: str  # the SD 1.x preset measured throughout
    sdxl_preset: str
    sizes: tuple[int, ...]  # U-Net step image sizes
    image_size: int  # VAE decode, txt2img, first step, SDXL step
    steps: int
    matmul: int  # side of the square matmul that measures the ceiling


FULL = Scale("sd15", "sdxl", (256, 512), 512, 20, 4096)
QUICK = Scale("tiny-sd1", "tiny-sdxl", (32, 64), 64, 20, 1024)


@dataclass(frozen=True)
class UNetSpec:
    """The inputs of one CFG U-Net step: latents (batch, channels, height, width) and the text context;
    pooled_dim/time_ids > 0 add SDXL's micro-conditioning."""

    batch: int
    channels: int
    height: int
    width: int
    context_dim: int
    tokens: int = TOKENS
    pooled_dim: int = 0
    time_ids: int = 0


@dataclass
class Row:
    """One figure: every implementation's single measurements; `flops` per run when counted."""

    figure: str
    unit: str  # "s" or "MB"
    values: dict[str, list[float]]
    flops: float | None = None
    dtype: str | None = None  # picks the ceiling

    def median(self, name: str) -> float | None:
        runs = self.values.get(name)
        return statistics.median(runs) if runs else None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    ceilings: dict[str, list[float]] = field(default_factory=dict)  # dtype -> GFLOP/s per run
    names: list[str] = field(default_factory=list)  # the implementations' columns, in order
    versions: dict[str, dict[str, str]] = field(default_factory=dict)  # environment -> package -> version

    def ceiling(self, dtype: str | None) -> float | None:
        runs = self.ceilings.get(dtype or "")
        return statistics.median(runs) if runs else None


# --- measuring ------------------------------------------------------------------------------------------
def timer(work: Callable[[], Any]) -> Timer:
    """A Timer running `work` under torch.inference_mode."""

    def run() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            work()
            return time.perf_counter() - start

    return run


def alternate(
    timers: dict[str, Timer], repeats: int, warmups: dict[str, Timer] | None = None
) -> dict[str, list[float]]:
    """One untimed warm-up each (`warmups` where given), then `repeats` rounds in which every
    implementation runs once, the order rotating so no one always goes first."""
    for name, run in timers.items():
        (warmups or timers).get(name, run)()
    names = list(timers)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            out[name].append(timers[name]())
    return out


def matmul_ceiling(n: int, dtype: torch.dtype, repeats: int) -> list[float]:
    """GFLOP/s of an n x n matmul, per run."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    runs = alternate({"matmul": timer(lambda: a @ b)}, repeats)["matmul"]
    return [2 * n**3 / s / 1e9 for s in runs]


def meta_flops(build: Callable[[], torch.nn.Module], call: Callable[[torch.nn.Module], Any]) -> float:
    """FLOPs of `call(module)`, counted on the meta device (shapes only, no arithmetic)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        module = build()
        with FlopCounterMode(display=False) as counter:
            call(module)
    return float(counter.get_total_flops())


@functools.cache
def unet_flops(model_cfg, spec: UNetSpec) -> float:
    from sdlab.models.unet import UNet

    def step(unet: UNet) -> None:
        unet(*sdlab_unet_args(unet, torch_unet_inputs(spec, torch.float32)))

    return meta_flops(lambda: UNet(model_cfg.unet), step)


@functools.cache
def vae_decode_flops(model_cfg, latent: tuple[int, ...]) -> float:
    from sdlab.models.vae import AutoencoderKL

    return meta_flops(lambda: AutoencoderKL(model_cfg.vae), lambda vae: vae.decode(torch.zeros(latent)))


# --- inputs ----------------------------------------------------------------------------------------------
def unet_spec(model_cfg, size: int, batch: int = 2) -> UNetSpec:
    """A CFG step's inputs for images of size x size pixels."""
    u, f = model_cfg.unet, model_cfg.vae.downscale
    pooled = 0 if u.addition_embed_dim is None else u.addition_embed_dim - 6 * u.addition_time_embed_dim
    return UNetSpec(batch, u.in_channels, size // f, size // f, u.cross_attention_dim,
                    pooled_dim=pooled, time_ids=6 if pooled else 0)


def latent_shape(model_cfg, size: int) -> tuple[int, int, int, int]:
    f = model_cfg.vae.downscale
    return (1, model_cfg.vae.latent_channels, size // f, size // f)


def seeded(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def torch_unet_inputs(spec: UNetSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """x, t, context (and pooled, time_ids for SDXL), on whatever device is the default."""
    def rand(*shape: int) -> torch.Tensor:
        return torch.tensor(seeded(shape)).to(dtype)

    out = {
        "x": rand(spec.batch, spec.channels, spec.height, spec.width),
        "t": torch.full((spec.batch,), TIMESTEP),
        "context": rand(spec.batch, spec.tokens, spec.context_dim),
    }
    if spec.pooled_dim:
        out["pooled"] = rand(spec.batch, spec.pooled_dim)
        out["time_ids"] = torch.full((spec.batch, spec.time_ids), 512.0)  # sizes and crop; values do not matter here
    return out


def sdlab_unet_args(unet, inputs: dict[str, torch.Tensor]) -> tuple:
    """(x, t, context, y) as sdlab's runner passes them; y is SDXL's added condition, made once per prompt."""
    y = None
    if "pooled" in inputs:
        from sdlab.models.unet import added_condition

        y = added_condition(inputs["pooled"].float(), inputs["time_ids"], unet.cfg).to(inputs["x"].dtype)
    return inputs["x"], inputs["t"], inputs["context"], y


def sdlab_unet_timer(unet, spec: UNetSpec, dtype: torch.dtype) -> Timer:
    x, t, context, y = sdlab_unet_args(unet, torch_unet_inputs(spec, dtype))
    return timer(lambda: unet(x, t, context, y=y))


def diffusers_unet_timer(unet, spec: UNetSpec, dtype: torch.dtype) -> Timer:
    inputs = torch_unet_inputs(spec, dtype)
    added = {"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]} if "pooled" in inputs else None
    return timer(lambda: unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"],
                              added_cond_kwargs=added, return_dict=False))


# --- implementations ---------------------------------------------------------------------------------------
class Implementation(Protocol):
    """What every implementation offers; the Timers are prepared once and run many times."""

    name: str

    def load(self, dtype: str) -> None: ...
    def unload(self) -> None: ...
    def unet_step(self, spec: UNetSpec) -> Timer: ...
    def vae_decode(self, latent: tuple[int, ...]) -> Timer: ...
    def txt2img(self, size: int, steps: int) -> Timer: ...
    def first_step(self, size: int) -> None: ...


class SdlabImpl:
    """sdlab, loaded with `sdlab.load(folder, dtype=..., **options)`."""

    def __init__(self, name: str, folder: Path, **options: Any):
        self.name, self.folder, self.options = name, folder, options
        self.pipe = None
        self.dtype = torch.float32

    def load(self, dtype: str) -> None:
        import sdlab

        self.dtype = DTYPES[dtype]
        self.pipe = sdlab.load(self.folder, dtype=self.dtype, **self.options)

    def unload(self) -> None:
        self.pipe = None

    def unet_step(self, spec: UNetSpec) -> Timer:
        return sdlab_unet_timer(self.pipe.runner.components.unet, spec, self.dtype)

    def vae_decode(self, latent: tuple[int, ...]) -> Timer:
        vae = self.pipe.runner.components.vae
        z = torch.tensor(seeded(latent)).to(self.dtype)
        return timer(lambda: vae.decode(z))

    def txt2img(self, size: int, steps: int) -> Timer:
        return timer(lambda: self.pipe.generate(PROMPT, steps=steps, guidance=GUIDANCE, sampler="euler",
                                                schedule="default", width=size, height=size, seed=0))

    def first_step(self, size: int) -> None:
        from sdlab.pipelines.settings import Settings

        runner = self.pipe.runner
        settings = Settings(PROMPT, width=size, height=size, guidance=GUIDANCE, seed=0).resolved(runner.config)
        with torch.inference_mode():
            cond = runner.condition(settings)
            x = torch.tensor(seeded(latent_shape(runner.config, size))).to(self.dtype).expand(2, -1, -1, -1)
            runner.components.unet(x, torch.full((2,), TIMESTEP), cond.context, y=cond.y)


class DiffusersImpl:
    """diffusers' StableDiffusionPipeline, loaded with `from_pretrained(folder, torch_dtype=...)`."""

    name = "diffusers"

    def __init__(self, folder: Path):
        self.folder = folder
        self.pipe = None
        self.dtype = torch.float32

    def load(self, dtype: str) -> None:
        from diffusers import StableDiffusionPipeline

        quiet_progress_bars()
        self.dtype = DTYPES[dtype]
        with warnings.catch_warnings():  # diffusers 0.42 renames torch_dtype; older ones know only that name
            warnings.filterwarnings("ignore", "`torch_dtype` is deprecated", FutureWarning)
            self.pipe = StableDiffusionPipeline.from_pretrained(self.folder, torch_dtype=self.dtype)
        if self.pipe.unet.dtype != self.dtype:
            raise RuntimeError(f"diffusers loaded the U-Net in {self.pipe.unet.dtype}, not {self.dtype}")
        self.pipe.scheduler = euler_scheduler(self.pipe.scheduler)
        self.pipe.set_progress_bar_config(disable=True)

    def unload(self) -> None:
        self.pipe = None

    def unet_step(self, spec: UNetSpec) -> Timer:
        return diffusers_unet_timer(self.pipe.unet, spec, self.dtype)

    def vae_decode(self, latent: tuple[int, ...]) -> Timer:
        z = torch.tensor(seeded(latent)).to(self.dtype)
        return timer(lambda: self.pipe.vae.decode(z, return_dict=False))

    def txt2img(self, size: int, steps: int) -> Timer:
        return timer(lambda: self.pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size,
                                       width=size, generator=torch.Generator().manual_seed(0)))

    def first_step(self, size: int) -> None:
        with torch.inference_mode():
            positive, negative = self.pipe.encode_prompt(PROMPT, "cpu", 1, True, "")
            x = torch.tensor(seeded(latent_shape_of(self.pipe, size))).to(self.dtype).expand(2, -1, -1, -1)
            self.pipe.unet(x, TIMESTEP, encoder_hidden_states=torch.cat([negative, positive]), return_dict=False)


def quiet_progress_bars() -> None:
    """No "Loading pipeline components" bars between the table's lines."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def euler_scheduler(scheduler):
    """Euler on the saved scheduler's own config (the same sampler as sdlab's "euler")."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(scheduler.config)


def latent_shape_of(pipe, size: int) -> tuple[int, int, int, int]:
    f = pipe.vae_scale_factor
    return (1, pipe.unet.config.in_channels, size // f, size // f)


class OpenVINOImpl:
    """optimum-intel's export of the folder (static shapes, compiled per shape); runs in the OpenVINO env."""

    name = "OpenVINO"

    def __init__(self, folder: Path, threads: int):
        import openvino

        self.folder, self.threads = folder, threads
        self.core = openvino.Core()
        self.precision = "f32"
        self.pipe, self.pipe_size = None, 0

    def config(self) -> dict[str, str]:
        return {"INFERENCE_PRECISION_HINT": self.precision, "INFERENCE_NUM_THREADS": str(self.threads),
                "PERFORMANCE_HINT": "LATENCY"}

    def load(self, dtype: str) -> None:
        self.precision = OV_PRECISION[dtype]

    def unload(self) -> None:
        self.pipe = None

    def _request(self, part: str, shapes: dict[str, list[int]]):
        """An infer request of one exported part, reshaped to static `shapes` (by input name)."""
        model = self.core.read_model(self.folder / part / "openvino_model.xml")
        names = {i.get_any_name() for i in model.inputs}
        if set(shapes) != names:
            raise RuntimeError(f"{part}: the exported inputs are {sorted(names)}, expected {sorted(shapes)}")
        model.reshape(shapes)
        return self.core.compile_model(model, "CPU", self.config()).create_infer_request()

    def unet_step(self, spec: UNetSpec) -> Timer:
        shapes = {"sample": [spec.batch, spec.channels, spec.height, spec.width],
                  "timestep": [1],  # as optimum's pipeline reshapes it: one timestep for the batch
                  "encoder_hidden_states": [spec.batch, spec.tokens, spec.context_dim]}
        if spec.pooled_dim:
            shapes |= {"text_embeds": [spec.batch, spec.pooled_dim], "time_ids": [spec.batch, spec.time_ids]}
        request = self._request("unet", shapes)
        inputs = {}
        for port in request.model_inputs:  # in the IR's own element types (the timestep is int64)
            name, kind = port.get_any_name(), port.get_element_type().to_dtype()
            values = np.full(shapes[name], TIMESTEP) if name == "timestep" else seeded(tuple(shapes[name]))
            inputs[name] = values.astype(kind)
        return ov_timer(request, inputs)

    def vae_decode(self, latent: tuple[int, ...]) -> Timer:
        request = self._request("vae_decoder", {"latent_sample": list(latent)})
        return ov_timer(request, {"latent_sample": seeded(latent)})

    def _pipeline(self, size: int):
        from optimum.intel import OVStableDiffusionPipeline

        quiet_progress_bars()
        pipe = OVStableDiffusionPipeline.from_pretrained(self.folder, ov_config=self.config(), compile=False)
        pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
        pipe.scheduler = euler_scheduler(pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def txt2img(self, size: int, steps: int) -> Timer:
        if self.pipe is None or self.pipe_size != size:
            self.pipe, self.pipe_size = self._pipeline(size), size
            self.pipe.compile()
        pipe = self.pipe
        return timer(lambda: pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size,
                                  width=size, generator=torch.Generator().manual_seed(0)))

    def first_step(self, size: int) -> None:
        pipe = self._pipeline(size)
        positive, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True, "")
        x = seeded(latent_shape_of(pipe, size))
        context = torch.cat([negative, positive]).numpy()
        pipe.unet(np.concatenate([x, x]), np.array([int(TIMESTEP)]), context)  # the IR takes an int64 timestep


def ov_timer(request, inputs: dict[str, np.ndarray]) -> Timer:
    def run() -> float:
        start = time.perf_counter()
        request.infer(inputs, share_inputs=True, share_outputs=True)
        return time.perf_counter() - start

    return run


def sdlab_variants() -> dict[str, dict[str, Any]]:
    """sdlab's implementations: name -> extra `sdlab.load` options (eager PyTorch, and its OpenVINO backend)."""
    return {"sdlab": {"backend": "torch"}, "sdlab-openvino": {"backend": "openvino"}}


IMPLS = ("sdlab", "sdlab-openvino", "diffusers", "OpenVINO")  # the columns, in order


def local_impl(name: str, folder: Path, threads: int) -> Implementation:
    """An implementation that runs in this process, by its column name."""
    if name == OpenVINOImpl.name:
        return OpenVINOImpl(folder, threads)
    if name == DiffusersImpl.name:
        return DiffusersImpl(folder)
    variants = sdlab_variants()
    if name not in variants:
        raise SystemExit(f"unknown implementation {name!r}")
    return SdlabImpl(name, folder, **variants[name])


# --- the OpenVINO worker: a long-lived process in the OpenVINO env, JSON lines on stdin/stdout -------------
def claim_stdout() -> IO[str]:
    """The real stdout for our own messages; whatever libraries print goes to stderr instead."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def serve(impl: Implementation, stream: IO[str]) -> None:
    """Answer requests: {"op": "load"|"unload"|"run"|"versions"|"quit", ...} -> {"ok": ..., "result": ...}.
    "run" prepares a Timer for {"task": "unet_step", "args": [...]} and runs it; only the latest Timer is
    kept, so no more than one compiled model of each part is held at a time (a full-size U-Net is GBs)."""
    prepared: tuple[str, Timer | None] = ("", None)
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "quit":
                return
            if op in ("load", "unload"):
                prepared = ("", None)
                result = impl.load(request["dtype"]) if op == "load" else impl.unload()
            elif op == "versions":
                result = versions()
            elif op == "run":
                key = json.dumps([request["task"], request["args"]])
                if prepared[0] != key:
                    prepared = ("", None)
                    gc.collect()
                    prepared = (key, getattr(impl, request["task"])(*decode_args(request["task"], request["args"])))
                result = prepared[1]()
            else:
                raise ValueError(f"unknown op {op!r}")
            stream.write(json.dumps({"ok": True, "result": result}) + "\n")
        except Exception as e:  # noqa: BLE001 — the parent shows it
            stream.write(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}) + "\n")


def decode_args(task: str, args: list) -> list:
    return [UNetSpec(**args[0])] if task == "unet_step" else [tuple(a) if isinstance(a, list) else a for a in args]


class RemoteImpl:
    """An implementation in the worker process, seen from here; its Timers return the worker's seconds."""

    def __init__(self, name: str, python: Path, folder: Path, threads: int):
        self.name = name
        command = [str(python), __file__, "--worker", "openvino", "--folder", str(folder), "--threads", str(threads)]
        with open(OV_LOG, "a") as log:  # the worker keeps its own copy of the descriptor
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                            text=True, bufsize=1)

    def call(self, op: str, **fields: Any) -> Any:
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker died (exit code {self.process.wait()}); see {OV_LOG}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise RuntimeError(f"{self.name} worker: {answer['error']} (details in {OV_LOG})")
        return answer["result"]

    def load(self, dtype: str) -> None:
        self.call("load", dtype=dtype)

    def unload(self) -> None:
        self.call("unload")

    def _timer(self, task: str, *args: Any) -> Timer:
        wire = [asdict(a) if isinstance(a, UNetSpec) else a for a in args]
        return lambda: self.call("run", task=task, args=wire)

    def unet_step(self, spec: UNetSpec) -> Timer:
        return self._timer("unet_step", spec)

    def vae_decode(self, latent: tuple[int, ...]) -> Timer:
        return self._timer("vae_decode", list(latent))

    def txt2img(self, size: int, steps: int) -> Timer:
        return self._timer("txt2img", size, steps)

    def first_step(self, size: int) -> None:
        raise NotImplementedError("the first step is measured in a fresh process")

    def close(self) -> None:
        """Ask the worker to quit; end it if it has not within a minute (or its pipe is gone)."""
        try:
            if self.process.poll() is None:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.close()
            self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()


# --- model folders -------------------------------------------------------------------------------------------
def random_folder(preset: str) -> Path:
    """The preset as a diffusers folder with random weights, saved once."""
    folder = CACHE / f"{preset}-random"
    if folder.is_dir():
        return folder
    sys.path.insert(0, str(ROOT))
    from sdlab.config import PRESETS
    from tests.reference import diffusers_pipeline

    print(f"saving a random-weight {preset} pipeline to {folder} (once)", flush=True)
    make_once(folder, lambda partial: diffusers_pipeline(PRESETS[preset], seed=0).save_pretrained(partial))
    return folder


def make_once(folder: Path, make: Callable[[Path], None]) -> None:
    """`make(partial)` fills a scratch folder that becomes `folder` only when complete."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    make(partial)
    partial.rename(folder)


def openvino_folder(source: Path, python: Path) -> Path:
    """The folder exported to OpenVINO IR by optimum-intel (f32 weights, no compression), once."""
    dest = source.with_name(source.name + "-openvino")
    if dest.is_dir():
        return dest
    print(f"exporting {source.name} to OpenVINO IR in {dest} (once; log in {OV_LOG})", flush=True)

    def run_export(partial: Path) -> None:
        with open(OV_LOG, "a") as log:
            command = [str(python), __file__, "--worker", "export", "--folder", str(source), "--dest", str(partial)]
            done = subprocess.run(command, stdout=log, stderr=log, check=False)
        if done.returncode:
            raise SystemExit(f"the OpenVINO export failed (exit code {done.returncode}); see {OV_LOG}")

    make_once(dest, run_export)
    return dest


def export(source: Path, dest: Path) -> None:
    from optimum.intel import OVStableDiffusionPipeline

    pipe = OVStableDiffusionPipeline.from_pretrained(source, export=True, load_in_8bit=False, compile=False)
    pipe.save_pretrained(dest)


# --- fresh processes: memory, first step, import time ----------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident memory (see the module docstring for why not ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """--worker child: one task in this fresh process; prints its number as JSON."""
    stream = claim_stdout()
    impl = local_impl(args.impl, args.folder, args.threads)
    impl.load(args.dtype)
    if args.task == "memory":
        impl.txt2img(args.size, args.steps)()
        value = peak_rss_mb()
    else:
        impl.first_step(args.size)
        value = time.time() - args.t0
    stream.write(json.dumps(value) + "\n")


def child_timer(python: Path, impl: str, folder: Path, task: str, dtype: str, scale: Scale, threads: int) -> Timer:
    """Runs `task` in a fresh process; its number (MB or seconds since the spawn) stands in for seconds."""

    def run() -> float:
        command = [str(python), __file__, "--worker", "child", "--impl", impl, "--folder", str(folder),
                   "--task", task, "--dtype", dtype, "--size", str(scale.image_size), "--steps", str(scale.steps),
                   "--threads", str(threads), "--t0", repr(time.time())]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"{impl} {task} in a fresh process failed:\n{done.stderr[-3000:]}")
        return float(done.stdout.strip().splitlines()[-1])

    return run


def wall_timer(command: list[str]) -> Timer:
    def run() -> float:
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
        return elapsed

    return run


# --- the run ----------------------------------------------------------------------------------------------------
@dataclass
class Run:
    args: argparse.Namespace
    scale: Scale
    folder: Path
    ov_folder: Path | None
    impls: dict[str, Implementation]
    report: Report

    @property
    def image_dtype(self) -> str:
        return "bf16" if "bf16" in self.args.dtypes else self.args.dtypes[0]

    def add(self, figure: str, unit: str, values: dict[str, list[float]], flops: float | None = None,
            dtype: str | None = None) -> None:
        row = Row(figure, unit, values, flops, dtype)
        self.report.rows.append(row)
        print(f"  {figure}: " + ", ".join(f"{n} {cell(row, n)}" for n in values), flush=True)


def measure_in_process(run: Run) -> None:
    """U-Net steps, VAE decodes and txt2img, one dtype at a time (every implementation loaded at it)."""
    from sdlab.config import PRESETS

    cfg, scale, repeats, only = PRESETS[run.scale.preset], run.scale, run.args.repeats, run.args.only
    for dtype in run.args.dtypes:
        unet, vae, txt2img = "unet" in only, "vae" in only, "txt2img" in only and dtype == run.image_dtype
        if not (unet or vae or txt2img):
            continue
        for impl in run.impls.values():
            impl.load(dtype)
        if unet:
            for size in run.args.sizes:
                spec = unet_spec(cfg, size)
                values = alternate({n: i.unet_step(spec) for n, i in run.impls.items()}, repeats)
                run.add(f"U-Net CFG step {size}² {dtype}", "s", values, unet_flops(cfg, spec), dtype)
        if vae:
            latent = latent_shape(cfg, scale.image_size)
            values = alternate({n: i.vae_decode(latent) for n, i in run.impls.items()}, repeats)
            run.add(f"VAE decode {scale.image_size}² {dtype}", "s", values, vae_decode_flops(cfg, latent), dtype)
        if txt2img:
            timers = {n: i.txt2img(scale.image_size, scale.steps) for n, i in run.impls.items()}
            warmups = {n: i.txt2img(scale.image_size, 1) for n, i in run.impls.items()}
            values = alternate(timers, repeats, warmups)
            run.add(f"txt2img {scale.image_size}² {scale.steps} steps {dtype}", "s", values)
        for impl in run.impls.values():
            impl.unload()
        gc.collect()


def measure_processes(run: Run) -> None:
    """Figures that each need a fresh process: import time, peak memory, time to the first step."""
    args, repeats, python = run.args, run.args.repeats, Path(sys.executable)
    pythons = {name: python for name in run.impls}
    folders = {name: run.folder for name in run.impls}
    if OpenVINOImpl.name in run.impls:
        pythons[OpenVINOImpl.name], folders[OpenVINOImpl.name] = args.ov_python, run.ov_folder
    if "import" in args.only:
        statements = {
            "import package": {"sdlab": "import sdlab", DiffusersImpl.name: "import diffusers"},
            "import pipeline class": {"sdlab": "from sdlab.api import Pipeline",
                                      DiffusersImpl.name: "from diffusers import StableDiffusionPipeline",
                                      OpenVINOImpl.name: "from optimum.intel import OVStableDiffusionPipeline"},
        }
        for figure, by_impl in statements.items():
            timers = {n: wall_timer([str(pythons[n]), "-c", code]) for n, code in by_impl.items() if n in run.impls}
            run.add(figure, "s", alternate(timers, repeats))
        cli = wall_timer([str(python.with_name("sdlab")), "--help"])
        run.add("sdlab --help", "s", alternate({"sdlab": cli}, repeats))
    for task, figure, unit in (("memory", f"txt2img peak RSS {run.image_dtype}", "MB"),
                               ("first-step", f"cold start to first U-Net step {run.image_dtype}", "s")):
        if task in args.only:
            timers = {n: child_timer(pythons[n], n, folders[n], task, run.image_dtype, run.scale, args.threads)
                      for n in run.impls}
            run.add(figure, unit, alternate(timers, repeats))


def measure_sdxl(run: Run) -> None:
    """The SDXL U-Net (random weights shared by both modules): one CFG step, sdlab against diffusers."""
    sys.path.insert(0, str(ROOT))
    import diffusers

    from sdlab.checkpoints.keymaps.unet import unet_config_to_diffusers, unet_from_diffusers
    from sdlab.config import PRESETS
    from sdlab.models.unet import UNet
    from tests.reference import ours_from

    cfg = PRESETS[run.scale.sdxl_preset]
    spec = unet_spec(cfg, run.scale.image_size)
    for dtype in run.args.dtypes:
        with default_dtype(DTYPES[dtype]):  # built straight in the dtype: no fp32 copy of 2.6 B parameters
            theirs = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(cfg.unet)).eval()
        ours = ours_from(UNet, unet_from_diffusers, theirs, cfg.unet)
        timers = {"sdlab": sdlab_unet_timer(ours, spec, DTYPES[dtype]),
                  DiffusersImpl.name: diffusers_unet_timer(theirs, spec, DTYPES[dtype])}
        values = alternate(timers, run.args.repeats)
        run.add(f"SDXL U-Net CFG step {run.scale.image_size}² {dtype}", "s", values, unet_flops(cfg, spec), dtype)
        del ours, theirs, timers
        gc.collect()


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


# --- the report --------------------------------------------------------------------------------------------------
def fmt(value: float, unit: str) -> str:
    if unit == "MB":
        return f"{value:.0f}"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def cell(row: Row, name: str) -> str:
    runs = row.values.get(name)
    if not runs:
        return "—"
    text = f"{fmt(statistics.median(runs), row.unit)} {row.unit}"
    return text + f" ({' '.join(fmt(v, row.unit) for v in runs)})" if len(runs) > 1 else text


def ratio(row: Row, a: str, b: str) -> str:
    x, y = row.median(a), row.median(b)
    return "—" if x is None or y is None else f"{x / y:.2f}"


def percent_of_ceiling(row: Row, name: str, report: Report) -> str:
    median, ceiling = row.median(name), report.ceiling(row.dtype)
    if row.flops is None or median is None or ceiling is None:
        return "—"
    return f"{row.flops / median / 1e9 / ceiling:.0%}"


def markdown(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def one(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([one(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(one, lines)])


def main_table(report: Report) -> str:
    rest = [n for n in report.names if n != "sdlab"]
    header = ["figure", *report.names, *(f"sdlab/{n}" for n in rest), "sdlab % of ceiling"]
    lines = [[r.figure, *(cell(r, n) for n in report.names), *(ratio(r, "sdlab", n) for n in rest),
              percent_of_ceiling(r, "sdlab", report)] for r in report.rows]
    return markdown(header, lines)


def throughput_table(report: Report) -> str:
    """Achieved GFLOP/s and % of the ceiling of the row's dtype, for every row with counted FLOPs."""
    header = ["figure", "GFLOP per run", *report.names]
    lines = [[r.figure, f"{r.flops / 1e9:.1f}", *(achieved(r, n, report) for n in report.names)]
             for r in report.rows if r.flops is not None]
    return markdown(header, lines)


def achieved(row: Row, name: str, report: Report) -> str:
    median = row.median(name)
    if median is None:
        return "—"
    return f"{row.flops / median / 1e9:.0f} GFLOP/s = {percent_of_ceiling(row, name, report)}"


def ceiling_text(report: Report, n: int) -> str:
    parts = [f"{dtype} {statistics.median(runs):.0f} GFLOP/s ({' '.join(f'{v:.0f}' for v in runs)})"
             for dtype, runs in report.ceilings.items()]
    return f"Matmul ceiling ({n}×{n} torch matmul, median of runs): " + "; ".join(parts) if parts else ""


def render(report: Report, scale: Scale) -> str:
    parts = [main_table(report)]
    if any(r.flops for r in report.rows):
        parts.append(throughput_table(report))
    parts.append(ceiling_text(report, scale.matmul))
    parts.append("Medians of the runs, the single runs in brackets; a ratio below 1 means sdlab takes less "
                 "time (or memory).")
    return "\n\n".join(p for p in parts if p)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    memory = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
        memory = f", {kb / 1024**2:.0f} GiB memory"
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores{memory}"


def git_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def versions() -> dict[str, str]:
    """Versions of what is importable in this environment."""
    from importlib import metadata

    out = {}
    for package in ("torch", "diffusers", "transformers", "openvino", "optimum-intel"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def section(report: Report, scale: Scale, args: argparse.Namespace) -> tuple[str, str]:
    heading = (f"## Speed: sdlab, diffusers and OpenVINO side by side ({', '.join(args.dtypes)})"
               + (" (--quick smoke test)" if args.quick else ""))
    versions_text = "; ".join(f"{env}: " + ", ".join(f"{k} {v}" for k, v in found.items())
                              for env, found in report.versions.items())
    command = shlex.join(["python", "benchmarks/speed.py", *sys.argv[1:]])
    body = (f"{heading}\n\n"
            f"- machine: {machine()}; torch threads and OpenVINO threads: {args.threads}\n"
            f"- date: {datetime.date.today().isoformat()}\n"
            f"- sdlab: commit {git_commit()}\n"
            f"- versions: {versions_text}\n"
            f"- models: `{scale.preset}` random weights (diffusers folder; OpenVINO IR exported by optimum-intel)\n"
            f"- command: `{command}`\n\n"
            f"{render(report, scale)}\n")
    return heading, body


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace the section under `heading` (up to the next `## `), or append it."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    if heading + "\n" in lines:
        start = lines.index(heading + "\n")
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + body + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    else:
        new = text.rstrip("\n") + "\n\n" + body
    path.write_text(new)


# --- main -----------------------------------------------------------------------------------------------------------
def csv(kind: Callable[[str], Any], choices: tuple[str, ...] | None = None) -> Callable[[str], list]:
    def parse(text: str) -> list:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        bad = [v for v in values if choices and v not in choices]
        if bad or not values:
            expected = ", ".join(choices or ("numbers",))
            raise argparse.ArgumentTypeError(f"{text!r}: use a comma-separated list of {expected}")
        return values

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny random models and sizes: a smoke test of the script")
    p.add_argument("--only", type=csv(str, FIGURES),
                   help=f"figures: {','.join(FIGURES)} (default all; --quick: those without fresh processes)")
    p.add_argument("--sizes", type=csv(int), help="U-Net step image sizes (default 256,512; --quick 32,64)")
    p.add_argument("--dtypes", type=csv(str, tuple(DTYPES)), default=list(DTYPES), help="fp32,bf16")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure and implementation (default 3)")
    p.add_argument("--threads", type=int, help="torch and OpenVINO threads (default: all cores; --quick: 1)")
    p.add_argument("--ov-python", type=Path, default=DEFAULT_OV_PYTHON if DEFAULT_OV_PYTHON.exists() else None,
                   help=f"python of the OpenVINO environment (default {DEFAULT_OV_PYTHON}, if it exists)")
    p.add_argument("--no-openvino", action="store_true", help="measure sdlab and diffusers only")
    p.add_argument("--impls", type=csv(str, IMPLS), help=f"only these implementations (default all: {','.join(IMPLS)})")
    p.add_argument("--sdxl", action="store_true", help="also one SDXL U-Net CFG step at 512² (about 10 GB in fp32)")
    p.add_argument("--write", action="store_true", help="put the results into benchmarks/RESULTS.md")
    p.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    # internal: this file run as the OpenVINO worker, the exporter, or a one-task fresh process
    p.add_argument("--worker", choices=["openvino", "export", "child"], help=argparse.SUPPRESS)
    for name, kind in (("--folder", Path), ("--dest", Path), ("--impl", str), ("--task", str), ("--dtype", str),
                       ("--size", int), ("--steps", int), ("--t0", float)):
        p.add_argument(name, type=kind, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    # --quick: one thread, since tiny networks are thousands of small ops, and on a busy machine two
    # threads spin at every barrier while the other one waits for a core (10x slower at random)
    args.threads = args.threads or (1 if args.quick else os.cpu_count())
    args.only = args.only or [f for f in FIGURES if not (args.quick and f in SUBPROCESS_FIGURES)]
    return args


def start_openvino(args: argparse.Namespace, folder: Path) -> tuple[Path | None, RemoteImpl | None]:
    if args.no_openvino:
        return None, None
    if args.ov_python is None or not args.ov_python.exists():
        print(f"note: no OpenVINO environment ({args.ov_python or DEFAULT_OV_PYTHON} missing; see the docstring "
              "for how to make one, or pass --ov-python): OpenVINO is skipped", flush=True)
        return None, None
    ov_folder = openvino_folder(folder, args.ov_python)
    return ov_folder, RemoteImpl(OpenVINOImpl.name, args.ov_python, ov_folder, args.threads)


def benchmark(args: argparse.Namespace) -> None:
    scale = QUICK if args.quick else FULL
    args.sizes = tuple(args.sizes or scale.sizes)
    torch.set_num_threads(args.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    folder = random_folder(scale.preset)
    wanted = set(args.impls or IMPLS)
    impls: dict[str, Implementation] = {
        n: SdlabImpl(n, folder, **options) for n, options in sdlab_variants().items() if n in wanted
    }
    if DiffusersImpl.name in wanted:
        impls[DiffusersImpl.name] = DiffusersImpl(folder)
    ov_folder, remote = start_openvino(args, folder) if OpenVINOImpl.name in wanted else (None, None)
    if remote is not None:
        impls[remote.name] = remote
    report = Report(names=list(impls), versions={"sdlab's environment": versions()})
    run = Run(args, scale, folder, ov_folder, impls, report)
    try:
        if remote is not None:
            report.versions["OpenVINO environment"] = remote.call("versions")
        print(f"{', '.join(impls)}; {scale.preset}; {args.threads} threads; {args.repeats} repeats", flush=True)
        measure_processes(run)  # first: no model is loaded here yet to crowd the fresh processes' memory
        if {"unet", "vae"} & set(args.only) or args.sdxl:
            report.ceilings = {d: matmul_ceiling(scale.matmul, DTYPES[d], args.repeats) for d in args.dtypes}
        measure_in_process(run)
        if args.sdxl:
            measure_sdxl(run)
    finally:
        if remote is not None:
            remote.close()
    print("\n" + render(report, scale))
    if args.write:
        heading, body = section(report, scale, args)
        write_section(args.results, heading, body)
        print(f"\nwritten to {args.results}")


def main() -> None:
    args = parse_args()
    if args.worker is None:
        benchmark(args)
        return
    if args.worker == "export":
        export(args.folder, args.dest)
        return
    torch.set_num_threads(args.threads)
    if args.worker == "openvino":
        serve(OpenVINOImpl(args.folder, args.threads), claim_stdout())
    else:
        child(args)


if __name__ == "__main__":
    main()
