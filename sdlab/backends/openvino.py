"""OpenVINO as an optional CPU runtime for sdlab's own networks.

PyTorch's CPU attention kernel does not use the bf16 dot-product instructions of CPUs without AMX
(its bf16 self-attention at 4096 tokens runs no faster than its fp32 one), while OpenVINO's does; on a
2-core AVX-512-bf16 CPU the SD 1.5 U-Net step at 512² in bf16 took 2.13 s through OpenVINO against
3.98 s in eager PyTorch (benchmarks/RESULTS.md).

`OpenVINOUNet` / `OpenVINODecoder` wrap a loaded module: the wrapper keeps the module (its
parameters, dtype, and the eager fallback) and runs the same computation through an OpenVINO model
converted from it with `openvino.convert_model`. The conversion (tracing) is slow for a full-size U-Net,
so the converted model is cached on disk, keyed by a hash of the weights and the config:

    $SDLAB_CACHE or ~/.cache/sdlab / openvino / <key> / model.xml, model.bin

Each input shape is compiled once (static shapes run fastest on the CPU plugin). Calls the converted
graph cannot express fall back to eager PyTorch: ControlNet residuals, seamless tiling (the circular
padding is switched on the module's convolutions at run time), token merging and patched-in LoRAs.

Given a `reload` function, a wrapper lets go of the module's weights once OpenVINO holds its own
compiled copy (the module stays, on the meta device: its structure, config and dtype), and reads them
back only if an eager call needs them: the SD 1.5 pipeline then holds one copy of the U-Net, not two.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from sdlab.config import to_dict
from sdlab.errors import SdlabError

# OpenVINO's names for the compute precision; weights keep their stored dtype in the converted model.
PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
FORMAT_VERSION = "1"  # bump when the wrappers' traced signatures change: old cache entries are then ignored


def require_openvino():
    """The openvino module, or a one-line error saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise SdlabError("the openvino backend needs the openvino package: pip install 'sdlab[openvino]'") from None
    return openvino


def cache_dir() -> Path:
    root = os.environ.get("SDLAB_CACHE") or Path.home() / ".cache" / "sdlab"
    return Path(root) / "openvino"


def weights_key(module: nn.Module, *parts: str) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, and `parts` (the config, the wrapper)."""
    h = hashlib.sha256(FORMAT_VERSION.encode())
    for part in parts:
        h.update(part.encode())
    for name, t in module.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def _patched(module: nn.Module) -> bool:
    """Switched at run time to something the converted graph does not have: circular padding, token merging,
    LoRA layers (forward hooks on Linear / Conv2d layers)."""
    return any(
        (isinstance(m, nn.Conv2d) and m.padding_mode == "circular") or getattr(m, "merge", None) is not None
        or (isinstance(m, (nn.Linear, nn.Conv2d)) and bool(m._forward_hooks))
        for m in module.modules()
    )


# --- what gets traced: fp32 tensors in and out, the module's own dtype inside ---------------------------
class _UNetGraph(nn.Module):
    def __init__(self, unet: nn.Module, with_y: bool):
        super().__init__()
        self.unet, self.with_y = unet, with_y

    def forward(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        dtype = next(self.unet.parameters()).dtype
        y = y.to(dtype) if self.with_y else None
        return self.unet(x.to(dtype), t, context.to(dtype), y=y).float()


class _DecoderGraph(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor) -> Tensor:
        return self.vae.decode(z.to(next(self.vae.parameters()).dtype)).float()


class _Compiled:
    """A converted model (read from the cache or converted now), compiled once per input shape."""

    def __init__(self, graph: nn.Module, example: tuple[Tensor, ...], key: str, precision: str, threads: int | None):
        ov = require_openvino()
        self.core = ov.Core()
        self.config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        folder = cache_dir() / key
        if not (folder / "model.xml").is_file():
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # tracing notes about shape-dependent code
                model = ov.convert_model(graph, example_input=example)
            # saved beside, then renamed in: the .bin first, so an .xml is never found without its .bin
            staging = folder.with_name(f"{key}.{os.getpid()}.staging")
            ov.save_model(model, staging / "model.xml", compress_to_fp16=False)
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(staging / "model.bin", folder / "model.bin")
            os.replace(staging / "model.xml", folder / "model.xml")
            staging.rmdir()
        self.path = folder / "model.xml"
        self.requests: dict[tuple, object] = {}

    def __call__(self, *inputs: Tensor) -> Tensor:
        arrays = [np.ascontiguousarray(x.detach().float().cpu().numpy()) for x in inputs]
        shapes = tuple(a.shape for a in arrays)
        request = self.requests.get(shapes)
        if request is None:
            # read for each new shape and let go after compiling: the compiled model holds what it needs,
            # and keeping the read model would keep its weights (memory-mapped from model.bin) resident too
            model = self.core.read_model(self.path)
            model.reshape({port.any_name: list(a.shape) for port, a in zip(model.inputs, arrays)})
            request = self.core.compile_model(model, "CPU", self.config).create_infer_request()
            self.requests[shapes] = request
        result = request.infer(arrays)
        return torch.from_numpy(np.array(result[request.model_outputs[0]]))


Reload = Callable[[], dict[str, Tensor]]  # the module's state dict, read again from its file


class _Wrapped(nn.Module):
    """A loaded module, run through OpenVINO where the converted graph can; every other attribute
    (parameters, cfg, other methods) is the module's own."""

    released_part = ""  # the submodule whose weights the compiled graph replaces ("" = the whole module)

    def __init__(self, module: nn.Module, threads: int | None = None, reload: Reload | None = None):
        super().__init__()
        self.module = module
        self.threads = threads
        self.reload = reload
        self.released = False
        self._compiled: _Compiled | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def _run(self, role: str, graph: Callable[[], nn.Module], inputs: tuple[Tensor, ...]) -> Tensor:
        """Run `inputs` through the compiled model; on the first call, `graph()` is what gets converted."""
        if self._compiled is None:
            dtype = next(self.module.parameters()).dtype
            key = weights_key(self.module, role, json.dumps(to_dict(self.module.cfg)), str(len(inputs)))
            example = tuple(x.float() for x in inputs)
            self._compiled = _Compiled(graph(), example, key, PRECISION[dtype], self.threads)
            if self.reload is not None:  # converted and on disk: OpenVINO compiles from there, not from these
                self.module.get_submodule(self.released_part).to("meta")
                self.released = True
        return self._compiled(*inputs)

    @property
    def eager_module(self) -> nn.Module:
        """The module with its weights, read back from the file if they were let go."""
        if self.released:
            state = self.reload()
            self.module.load_state_dict(state, strict=True, assign=True)
            self.module.requires_grad_(False)
            self.released = False
        return self.module


class OpenVINOUNet(_Wrapped):
    """Plain U-Net calls run through OpenVINO; calls with ControlNet residuals or tiling run eagerly."""

    def forward(self, x: Tensor, timesteps: Tensor | float, context: Tensor, y: Tensor | None = None, control=None) -> Tensor:
        if control is not None or _patched(self.module):
            return self.eager_module(x, timesteps, context, y=y, control=control)
        t = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1).expand(x.shape[0])  # (B,)
        inputs = (x, t, context) + (() if y is None else (y,))
        return self._run("unet", lambda: _UNetGraph(self.module, y is not None), inputs).to(x.dtype)


class OpenVINODecoder(_Wrapped):
    """A VAE whose `decode` runs through OpenVINO (tiling: eagerly); encode and the rest are the module's."""

    released_part = "decoder"  # the encoder stays: img2img and inpainting encode eagerly

    def decode(self, z: Tensor) -> Tensor:
        if _patched(self.module):
            return self.eager_module.decode(z)
        return self._run("vae-decoder", lambda: _DecoderGraph(self.module), (z,)).to(z.dtype)
