"""Token merging for Stable Diffusion (ToMe for SD; Bolya & Hoffman 2023, "Token Merging for Fast Stable
Diffusion"): fewer tokens through the self-attention of the highest-resolution transformer blocks.

Neighbouring tokens of a latent image are much alike, and self-attention costs O(N²) in N = h*w.
Bipartite soft matching, for one (B, N, C) sequence on an h x w grid:

1. destinations: one token per 2x2 cell of the grid; sources: every other token;
2. every source's match: its most similar destination, by the cosine similarity of the tokens the
   self-attention receives (the block's normed input);
3. merge: the r best-matched sources are averaged into their destinations, N - r tokens remain;
4. the self-attention runs on those N - r tokens;
5. unmerge: every merged source takes its destination's output, so the sequence is N long again.

Only the self-attention is merged (the paper's recommended setting); the cross-attention and the
feed-forward still see every token. The result is approximate; with merging off nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.errors import SdlabError
from sdlab.models.layers import BasicTransformerBlock, Downsample, SpatialTransformer, Upsample

CELL = 2  # destinations: one per CELL x CELL block of tokens (ToMe's sx = sy = 2)
DESTINATION_SEED = 0  # where in its cell each destination lies: seeded, the same every call


def destinations(h: int, w: int, device: torch.device) -> Tensor:
    """(h//2 * w//2,) token indices: one position per whole 2x2 cell of the (h, w) grid (row-major tokens).

    The position inside each cell is drawn from a local generator with a fixed seed: the grid pattern is
    broken up, every call gets the same one, and the global RNG is left alone. An odd last row or column
    holds only sources.
    """
    rows, cols = h // CELL, w // CELL
    g = torch.Generator().manual_seed(DESTINATION_SEED)
    offset = torch.randint(CELL * CELL, (rows, cols), generator=g)  # (rows, cols) place in the cell
    y = CELL * torch.arange(rows)[:, None] + offset // CELL  # (rows, cols)
    x = CELL * torch.arange(cols)[None, :] + offset % CELL
    return (y * w + x).flatten().to(device)  # (rows * cols,)


def _complement(dst: Tensor, n: int) -> Tensor:
    keep = torch.ones(n, dtype=torch.bool, device=dst.device)
    keep[dst] = False
    return keep.nonzero().squeeze(1)  # (n - len(dst),)


@dataclass(frozen=True)
class Matching:
    """Which tokens of a (B, N, C) sequence merge into which, as rows of the flattened batch: token i of
    batch entry b is row b*N + i of the tokens, row j of its merged sequence is row b*(N - r) + j. Merging
    and unmerging are then whole-row copies (index_select, index_add), which stay fast in bf16 on the CPU
    where per-element gather/scatter are tens of times slower."""

    take: Tensor  # (B * (N - r),) the token row each merged row starts from: kept sources, then destinations
    merged: Tensor  # (B * r,) the token rows of the sources merged away
    into: Tensor  # (B * r,) the merged row (its destination's) each of them is added to
    count: Tensor  # (B * (N - r), 1) how many tokens each merged row averages
    back: Tensor  # (B * N,) the merged row each token takes its value from when unmerging

    def merge(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, N - r, C): the kept sources, then each destination averaged with the sources
        merged into it."""
        b, _, c = x.shape
        rows = x.reshape(-1, c)  # (B * N, C)
        total = rows.index_select(0, self.take).index_add_(0, self.into, rows.index_select(0, self.merged))
        return (total / self.count).view(b, -1, c)  # (B, N - r, C)

    def unmerge(self, y: Tensor) -> Tensor:
        """(B, N - r, C) -> (B, N, C): every token back in its place, a merged source as its destination."""
        b, _, c = y.shape
        return y.reshape(-1, c).index_select(0, self.back).view(b, -1, c)  # (B, N, C)


def match(x: Tensor, size: tuple[int, int], r: int) -> Matching:
    """Bipartite soft matching of x (B, h*w, C): the r sources most similar to a destination merge into it."""
    h, w = size
    n = h * w
    dst = destinations(h, w, x.device)  # (N_d,)
    src = _complement(dst, n)  # (N_s,)
    unit = F.normalize(x, dim=-1)  # (B, N, C)
    similarity = unit[:, src] @ unit[:, dst].transpose(1, 2)  # (B, N_s, N_d) cosines
    best, closest = similarity.max(dim=-1)  # (B, N_s) each source's closest destination
    order = best.argsort(dim=-1, descending=True, stable=True)  # (B, N_s) most similar first
    kept, merged = src[order[:, r:]], src[order[:, :r]]  # (B, N_s - r), (B, r) token indices
    into = closest.gather(1, order[:, :r])  # (B, r) places in dst
    return _as_rows(kept, dst, merged, into, n, x.dtype)


def _as_rows(kept: Tensor, dst: Tensor, merged: Tensor, into: Tensor, n: int, dtype: torch.dtype) -> Matching:
    """Per-entry token indices (kept (B, N_s - r), dst (N_d,), merged (B, r); into (B, r) places in dst)
    -> the Matching's rows of the flattened batch."""
    b, r = merged.shape
    m = n - r  # merged length
    device = merged.device
    token_row = n * torch.arange(b, device=device)[:, None]  # (B, 1) each entry's first token row
    merged_row = m * torch.arange(b, device=device)[:, None]  # (B, 1) ... and first merged row
    take = (torch.cat([kept, dst.expand(b, -1)], dim=1) + token_row).flatten()  # (B * (N - r),)
    merged = (merged + token_row).flatten()  # (B * r,)
    into = (kept.shape[1] + into + merged_row).flatten()  # (B * r,) destinations follow the kept sources
    count = torch.bincount(into, minlength=b * m).add_(1).to(dtype)  # (B * (N - r),)
    back = torch.empty(b * n, dtype=torch.long, device=device)  # (B * N,)
    back[take] = torch.arange(b * m, device=device)
    back[merged] = into
    return Matching(take, merged, into, count[:, None], back)


def merged_count(size: tuple[int, int], ratio: float) -> int:
    """r = ratio * N tokens merged away, at most all the sources."""
    h, w = size
    return min(int(h * w * ratio), h * w - (h // CELL) * (w // CELL))


@dataclass(frozen=True)
class TokenMerging:
    """A BasicTransformerBlock's `merge` (layers.TokenMerge): tokens -> (merged tokens, unmerge)."""

    ratio: float  # r / N

    def __call__(self, x: Tensor, size: tuple[int, int]) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        r = merged_count(size, self.ratio)
        if r == 0:
            return x, _identity
        matching = match(x, size, r)
        return matching.merge(x), matching.unmerge


def _identity(y: Tensor) -> Tensor:
    return y


def highest_resolution_blocks(module: nn.Module) -> list[BasicTransformerBlock]:
    """The transformer blocks on the highest-resolution level that has attention (SD 1/2: level 0, the
    64x64 tokens of a 512² image; SDXL, without attention there: level 1).

    Levels are counted along the module order, which is the order the U-Net runs its layers in: every
    Downsample goes one level down, every Upsample one up.
    """
    level = 0
    found: dict[int, list[BasicTransformerBlock]] = {}  # level -> its blocks
    for m in module.modules():
        if isinstance(m, Downsample):
            level += 1
        elif isinstance(m, Upsample):
            level -= 1
        elif isinstance(m, SpatialTransformer):
            found.setdefault(level, []).extend(m.transformer_blocks)
    return found[min(found)] if found else []


@contextmanager
def token_merging(unet: nn.Module, ratio: float, enabled: bool = True) -> Iterator[None]:
    """Within the block, the self-attention of `unet`'s highest-resolution transformer blocks runs on
    N - r tokens, r = ratio * N; restored afterwards. Off (`enabled=False` or ratio 0), nothing changes."""
    if not 0.0 <= ratio < 1.0:
        raise SdlabError(f"token merging ratio must be in [0, 1), got {ratio}; 0.5 merges half the tokens")
    blocks = highest_resolution_blocks(unet)
    before = [b.merge for b in blocks]
    if enabled and ratio > 0:
        for b in blocks:
            b.merge = TokenMerging(ratio)
    try:
        yield
    finally:
        for b, merge in zip(blocks, before):
            b.merge = merge
