"""Pieces shared by the U-Net and the ControlNet, named as in the original (ldm) checkpoints.

Timestep sinusoid -> ResBlock (conv, + time embedding, conv, skip) and SpatialTransformer
(self-attention, cross-attention to the text, GEGLU feed-forward), with 2x down/upsampling
between resolutions. Every layer is a plain `nn` layer, so the whole network can be built on
`torch.device("meta")` and filled later.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

HALF_DTYPES = (torch.float16, torch.bfloat16)
TRANSFORMER_NORM_EPS = 1e-6  # the GroupNorm in front of every SpatialTransformer
MAX_PERIOD = 10000.0  # longest wavelength of the timestep sinusoid
# tokens (B, N, C) of an (h, w) grid -> fewer tokens (B, N - r, C) and the map back to N (models/token_merging.py)
TokenMerge = Callable[[Tensor, tuple[int, int]], tuple[Tensor, Callable[[Tensor], Tensor]]]


def timestep_embedding(
    t: Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: float = MAX_PERIOD
) -> Tensor:
    """Sinusoidal features of (possibly fractional) timesteps: (N,) -> (N, dim), always float32.

    Frequency k (of dim/2) is max_period ** (-k / (dim/2 - freq_shift)); the halves are
    [cos, sin] when `flip_sin_to_cos`, else [sin, cos]; an odd `dim` gets one zero column.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    angles = t.float()[:, None] * freqs[None, :]  # (N, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (N, 2 * half)
    return F.pad(emb, (0, dim % 2))


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)  # (B, heads, N, head_dim)


def _merge_heads(x: Tensor) -> Tensor:
    b, heads, n, head_dim = x.shape
    return x.transpose(1, 2).reshape(b, n, heads * head_dim)  # (B, N, heads * head_dim)


class Attention(nn.Module):
    """Multi-head softmax(q k^T / sqrt(d)) v; self-attention when `context` is None.

    `upcast` runs the product in float32 when the inputs are fp16/bf16 (SD2.1-v needs it).
    `slice_size` (set by `attention_slicing`) attends that many queries at a time: the same result, since
    each query's softmax is its own, with the scores of a slice only held at once where the attention
    kernel would otherwise build all N x L of them (PyTorch's flash kernels on CPU and CUDA never do).
    """

    slice_size: int | None = None

    def __init__(self, dim: int, heads: int, inner_dim: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        self.heads = heads
        self.upcast = upcast
        context_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim))  # ldm: Sequential(Linear, Dropout)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context  # (B, L, context_dim)
        q = split_heads(self.to_q(x), self.heads)  # (B, heads, N, head_dim)
        k = split_heads(self.to_k(context), self.heads)  # (B, heads, L, head_dim)
        v = split_heads(self.to_v(context), self.heads)
        if self.slice_size is None or self.slice_size >= q.shape[2]:
            out = self._attend(q, k, v)
        else:
            out = torch.cat([self._attend(part, k, v) for part in q.split(self.slice_size, dim=2)], dim=2)
        return self.to_out(_merge_heads(out))  # (B, N, dim)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # (B, heads, n, head_dim) for n queries
        if self.upcast and q.dtype in HALF_DTYPES:
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v)


@contextmanager
def attention_slicing(module: nn.Module, size: int | None, enabled: bool = True) -> Iterator[None]:
    """Within the block, every Attention of `module` attends `size` queries at a time; restored afterwards."""
    layers = [m for m in module.modules() if isinstance(m, Attention)]
    before = [m.slice_size for m in layers]
    if enabled:
        for m in layers:
            m.slice_size = size
    try:
        yield
    finally:
        for m, old in zip(layers, before):
            m.slice_size = old


class GEGLU(nn.Module):
    """x -> a * gelu(b), where [a, b] = proj(x) split in halves."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.proj(x).chunk(2, dim=-1)  # 2 x (B, N, inner_dim)
        return a * F.gelu(b)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # index 1 is ldm's dropout; kept so the last Linear is `net.2` as in the checkpoints
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm residual: x + self-attn, + cross-attn to the context, + feed-forward.

    `merge`, when set (by models/token_merging.py), shortens the sequence the self-attention sees.
    """

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.merge: TokenMerge | None = None

    def forward(self, x: Tensor, context: Tensor, size: tuple[int, int]) -> Tensor:
        """x (B, H*W, dim) of an image of `size` (H, W), context (B, L, context_dim) -> (B, H*W, dim)."""
        if self.merge is None:
            x = x + self.attn1(self.norm1(x))
        else:
            merged, unmerge = self.merge(self.norm1(x), size)  # (B, H*W - r, dim)
            x = x + unmerge(self.attn1(merged))  # (B, H*W, dim)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features as a token sequence through `depth` transformer blocks, added back residually.

    proj_in/proj_out are 1x1 convolutions (SD1) or Linear layers on the tokens (SD2, SDXL).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        depth: int,
        context_dim: int,
        linear: bool,
        groups: int,
        upcast: bool = False,
    ):
        super().__init__()
        inner = heads * (channels // heads)
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, context_dim, upcast) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        tokens = self.norm(x)
        if self.linear:
            tokens = self.proj_in(_to_tokens(tokens))  # (B, H*W, inner)
        else:
            tokens = _to_tokens(self.proj_in(tokens))
        for block in self.transformer_blocks:
            tokens = block(tokens, context, (h, w))
        if self.linear:
            out = _to_image(self.proj_out(tokens), h, w)  # (B, C, H, W)
        else:
            out = self.proj_out(_to_image(tokens, h, w))
        return x + out


def _to_tokens(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, H*W, C)


def _to_image(tokens: Tensor, h: int, w: int) -> Tensor:
    b, _, c = tokens.shape
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


class ResBlock(nn.Module):
    """x -> skip(x) + conv(silu(norm(conv(silu(norm(x))) + proj(silu(emb)))))."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int, eps: float):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, in_channels, eps=eps), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels, eps=eps),
            nn.SiLU(),
            nn.Identity(),  # ldm's dropout slot; keeps the conv at `out_layers.3`
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x (or to `size`, for sides that were odd on the way down), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=size, mode="nearest")  # (B, C, *size)
        return self.conv(x)


class ConditionedSequential(nn.Sequential):
    """One ldm `input_blocks`/`middle_block`/`output_blocks` entry: its layers in order, each
    given what it uses (ResBlock the time embedding, SpatialTransformer the context,
    Upsample the target size). With `checkpointing` set (`gradient_checkpointing`), a training
    forward keeps only the block's input and recomputes its activations in the backward pass."""

    checkpointing: bool = False

    def forward(  # type: ignore[override]
        self, x: Tensor, emb: Tensor, context: Tensor, size: tuple[int, int] | None = None
    ) -> Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._run, x, emb, context, size, use_reentrant=False)
        return self._run(x, emb, context, size)

    def _run(self, x: Tensor, emb: Tensor, context: Tensor, size: tuple[int, int] | None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


def gradient_checkpointing(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Recompute every U-Net block's activations in the backward pass instead of keeping them: much less
    memory for about a third more compute. The gradients are the same."""
    for m in module.modules():
        if isinstance(m, ConditionedSequential):
            m.checkpointing = enabled
    return module
