"""Options and helpers every model-loading command shares (sdlab.cli and sdlab.analysis.cli)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, _, h = text.lower().partition("x")
        size = (int(w), int(h or w))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x768, got {text!r}") from None
    if min(size) <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


class Progress:
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


def load_pipeline(args: argparse.Namespace, model=None, refiner=None, dtype=None, device=None, backend=None):
    """`api.load` with the model options of `add_model_options`; the keywords override them."""
    from sdlab import api

    return api.load(
        model or args.model, device=device or args.device or "cpu", dtype=dtype or args.dtype, config=args.config,
        prediction_type=args.prediction_type, refiner=refiner or getattr(args, "refiner", None),
        backend=backend or args.backend, low_memory=args.low_memory, lora_dirs=getattr(args, "lora_dir", None) or (),
        fuse_lora=getattr(args, "fuse_lora", False), embeddings=getattr(args, "embedding", None) or (),
        embeddings_dirs=getattr(args, "embeddings_dir", None) or (),
    )


def parse_lora(text: str) -> tuple[str, float]:
    """--lora PATH[:WEIGHT] -> (path, weight); a path may itself hold colons (C:\\loras\\x.safetensors)."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def add_network_options(p: argparse.ArgumentParser) -> None:
    """LoRA and textual-inversion options of the commands that generate."""
    g = p.add_argument_group("LoRA and textual inversion")
    g.add_argument("--lora", action="append", type=parse_lora, metavar="PATH[:W]",
                   help="a LoRA / LyCORIS file and its weight (default 1); repeat for several")
    g.add_argument("--lora-dir", action="append", metavar="DIR",
                   help="where <lora:name:weight> tags in the prompt find their files (searched recursively)")
    g.add_argument("--fuse-lora", action="store_true",
                   help="add LoRAs into the weights (faster steps, slower to switch) instead of patching layers")
    g.add_argument("--embedding", action="append", metavar="PATH",
                   help="a textual-inversion embedding, used by its file name in the prompt; repeatable")
    g.add_argument("--embeddings-dir", action="append", metavar="DIR", help="a folder of embeddings, used by name")


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="diffusers folder, single file, or repo id (default: sdlab's own model)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="compute dtype (default fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default cpu)")
    p.add_argument("--config", help="preset for reading a single file, when detection is not enough")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="override the detected one")
    p.add_argument("--backend", choices=["auto", "torch", "openvino"], default="auto",
                   help="run the U-Net and VAE decoder in PyTorch, or through OpenVINO on the CPU; auto (the default) "
                        "takes OpenVINO for large models on the CPU when it is installed")
    p.add_argument("--low-memory", action="store_true",
                   help="decode images larger than 512x512 in tiles and attend in slices; on CUDA also keep the weights "
                        "in host memory and move them to the GPU a layer at a time: less memory, slower")


def add_sampling_options(p: argparse.ArgumentParser, swept: tuple[str, ...] = (),
                         size_default: str = "the model's size") -> None:
    """The prompt-side generation options, less those a sweep sets itself (`swept`)."""
    p.add_argument("--negative", help="negative prompt")
    if "steps" not in swept:
        p.add_argument("--steps", type=int, help="sampling steps (default: the model's; 20, or 15 for sdlab's own)")
    if "guidance" not in swept:
        p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 7)")
    if "sampler" not in swept:
        p.add_argument("--sampler", help="ddim, euler_a, dpmpp_2m, … or an A1111 name such as 'DPM++ 2M Karras'")
    schedule = ("for samplers whose name gives none (default: the sampler's own)" if "sampler" in swept
                else "(default karras)")
    p.add_argument("--schedule", choices=["default", "karras", "exponential"], help=f"sigma schedule {schedule}")
    p.add_argument("--width", type=int, help=f"pixels (default: {size_default})")
    p.add_argument("--height", type=int, help=f"pixels (default: {size_default})")


def given_options(args: argparse.Namespace, names: Sequence[str]) -> dict:
    """The options among `names` given on the command line (argparse leaves the others None)."""
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
