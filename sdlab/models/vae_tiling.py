"""Tiled VAE decoding: a large latent decoded in overlapping windows, so peak memory is that of one
window's decode whatever the image size (SD 1.5's VAE decoded 2048² within a 3.1 GiB peak of the whole
process, benchmarks/vae_tiling.py).

Decoding windows independently has two flaws. Their edges differ (each convolution sees a window
border instead of the neighbouring pixels), which linear ramps across the overlaps hide. And every
GroupNorm normalises by its window's own statistics, so a window holding only sky comes out in another
colour than its neighbour holding a face. Here GroupNorm instead uses the statistics of the whole
image, estimated once from an untiled decode of the latent shrunk to window size: per-group means and
variances of feature maps change little with resolution, and all windows then share them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# --- GroupNorm with statistics recorded once and reused --------------------------------------------------
def _group_stats(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """x (B, C, H, W) -> mean, var of each (sample, group): (B, groups) each."""
    g = x.float().reshape(x.shape[0], groups, -1)
    return g.mean(dim=-1), g.var(dim=-1, unbiased=False)


def _normalise(norm: nn.GroupNorm, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    g = x.float().reshape(x.shape[0], norm.num_groups, -1)
    y = ((g - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)).reshape(x.shape)
    if norm.affine:
        weight, bias = (t.to(y.device, torch.float32) for t in (norm.weight, norm.bias))  # offloaded: on the host
        y = y * weight[None, :, None, None] + bias[None, :, None, None]
    return y.to(x.dtype)


@contextmanager
def _patched_group_norms(module: nn.Module, forward) -> Iterator[None]:
    norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
    for m in norms:
        m.forward = (lambda m: lambda x: forward(m, x))(m)  # an instance attribute shadows the class method
    try:
        yield
    finally:
        for m in norms:
            del m.forward


def record_group_norm_stats(decode, module: nn.Module, z: Tensor) -> dict[nn.GroupNorm, tuple[Tensor, Tensor]]:
    """Run `decode(z)` once and keep every GroupNorm's per-group statistics of its input."""
    stats: dict[nn.GroupNorm, tuple[Tensor, Tensor]] = {}

    def record(norm: nn.GroupNorm, x: Tensor) -> Tensor:
        stats[norm] = _group_stats(x, norm.num_groups)
        return _normalise(norm, x, *stats[norm])

    with _patched_group_norms(module, record):
        decode(z)
    return stats


# --- windows and their blending weights --------------------------------------------------------------------
def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window origins along one axis: every `stride`, the last one moved back to end at `length`."""
    if length <= window:
        return [0]
    return list(range(0, length - window, stride)) + [length - window]


def _ramp(n: int, fade_in: int, fade_out: int) -> Tensor:
    """(n,) weights rising linearly over the first `fade_in` samples and falling over the last `fade_out`."""
    i = torch.arange(n, dtype=torch.float32) + 0.5
    w = torch.ones(n)
    if fade_in:
        w = torch.minimum(w, i / fade_in)
    if fade_out:
        w = torch.minimum(w, (n - i) / fade_out)
    return w


def _axis_weights(starts: list[int], k: int, size: int, factor: int) -> Tensor:
    """Pixel weights of window k along one axis: ramps across its overlaps with its neighbours only, so two
    overlapping windows' weights sum to 1 there."""
    fade_in = starts[k - 1] + size - starts[k] if k > 0 else 0
    fade_out = starts[k] + size - starts[k + 1] if k + 1 < len(starts) else 0
    return _ramp(factor * size, factor * fade_in, factor * fade_out)


@torch.no_grad()
def decode_tiled(vae: nn.Module, z: Tensor, window: int = 64, overlap: int = 8, margin: int = 16) -> Tensor:
    """`vae.decode` over window x window latent windows that overlap by `overlap`, each decoded with
    `margin` latent pixels of context around it (then cropped off) and blended across the overlaps,
    with whole-image GroupNorm statistics. z (B, C, h, w) -> (B, 3, f*h, f*w), f = vae.cfg.downscale."""
    if not 0 <= overlap < window or margin < 0:
        raise ValueError(f"need 0 <= overlap < window and margin >= 0, got {overlap=}, {window=}, {margin=}")
    b, _, h, w = z.shape
    if h <= window and w <= window:
        return vae.decode(z)
    f = vae.cfg.downscale
    shrink = max(h, w) / window
    small = F.interpolate(z.float(), size=(max(1, round(h / shrink)), max(1, round(w / shrink))), mode="area")
    stats = record_group_norm_stats(vae.decode, vae, small.to(z.dtype))

    th, tw = min(window, h), min(window, w)
    ch, cw = min(h, th + 2 * margin), min(w, tw + 2 * margin)  # a decode's size: window and context
    ys, xs = _window_starts(h, window, window - overlap), _window_starts(w, window, window - overlap)
    out = torch.zeros(b, 3, f * h, f * w, device=z.device)
    weight = torch.zeros(1, 1, f * h, f * w, device=z.device)
    with _patched_group_norms(vae, lambda norm, x: _normalise(norm, x, *stats[norm])):
        for i, y0 in enumerate(ys):
            for j, x0 in enumerate(xs):
                # the window with its context, shifted inward at the image's edges: every decode has one shape
                top, left = min(max(0, y0 - margin), h - ch), min(max(0, x0 - margin), w - cw)
                decoded = vae.decode(z[:, :, top : top + ch, left : left + cw]).float()  # (B, 3, f*ch, f*cw)
                piece = decoded[:, :, f * (y0 - top) : f * (y0 - top + th), f * (x0 - left) : f * (x0 - left + tw)]
                mask = (_axis_weights(ys, i, th, f)[:, None] * _axis_weights(xs, j, tw, f)[None, :]).to(z.device)
                rows, cols = slice(f * y0, f * (y0 + th)), slice(f * x0, f * (x0 + tw))
                out[:, :, rows, cols] += piece * mask
                weight[:, :, rows, cols] += mask
    return (out / weight).to(z.dtype)
