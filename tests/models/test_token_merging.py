"""Token merging (ToMe for SD): off it changes nothing, bit for bit; on, the highest-resolution
self-attention runs on N - r tokens, merge/unmerge is exact where merged tokens were equal, and the
U-Net output stays close to the unmerged one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdlab.config import PRESETS
from sdlab.errors import SdlabError
from sdlab.models.layers import BasicTransformerBlock
from sdlab.models.token_merging import (
    TokenMerging,
    destinations,
    highest_resolution_blocks,
    match,
    merged_count,
    token_merging,
)
from sdlab.models.unet import UNet
from tests.reference import perturb_

CFG = PRESETS["tiny-sd1"].unet  # attention on levels 0 and 1


def _unet() -> UNet:
    torch.manual_seed(0)
    return perturb_(UNet(CFG).eval(), 1)


def _inputs(size: tuple[int, int] = (16, 16), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, CFG.in_channels, *size, generator=g)
    context = torch.randn(2, 7, CFG.cross_attention_dim, generator=g)
    return x, torch.tensor([500.0, 200.0]), context


def _smooth(size: int, seed: int) -> torch.Tensor:
    """(2, 4, size, size) latents with no detail finer than a quarter of the image."""
    coarse = torch.randn(2, CFG.in_channels, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- the matching on its own -----------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(4, 4), (8, 6), (5, 7)])
def test_one_destination_per_whole_cell_same_every_call(h: int, w: int) -> None:
    rng = torch.get_rng_state()
    dst = destinations(h, w, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)  # diffusers' noise draws stay where they were
    assert torch.equal(dst, destinations(h, w, torch.device("cpu")))
    cells = sorted((int(i) // w // 2, int(i) % w // 2) for i in dst)
    assert cells == [(y, x) for y in range(h // 2) for x in range(w // 2)]
    assert len({int(i) % w % 2 + 2 * (int(i) // w % 2) for i in dst}) > 1  # not always the same corner


@pytest.mark.parametrize("h,w,ratio", [(8, 8, 0.5), (5, 7, 0.5), (8, 6, 0.3), (6, 6, 0.9)])
def test_merged_length_is_n_minus_r(h: int, w: int, ratio: float) -> None:
    n = h * w
    r = merged_count((h, w), ratio)
    assert r == min(int(n * ratio), n - (h // 2) * (w // 2))
    x = torch.randn(3, n, 8, generator=torch.Generator().manual_seed(0))
    merged, unmerge = TokenMerging(ratio)(x, (h, w))
    assert merged.shape == (3, n - r, 8)
    assert unmerge(merged).shape == x.shape


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_merge_unmerge_is_exact_when_each_cell_holds_one_token(ratio: float) -> None:
    g = torch.Generator().manual_seed(0)
    cells = torch.randint(-8, 9, (2, 16, 6, 5), generator=g).float()  # (B, C, h/2, w/2), exact sums
    grid = cells.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (B, C, h, w): 2x2 equal tokens
    x = grid.flatten(2).transpose(1, 2)  # (B, h*w, C)
    merged, unmerge = TokenMerging(ratio)(x, (12, 10))
    assert merged.shape[1] == 120 - merged_count((12, 10), ratio)
    assert torch.equal(unmerge(merged), x)


def test_merge_averages_the_most_similar_sources_into_their_closest_destinations() -> None:
    h, w, r = 6, 8, 20
    n = h * w
    x = torch.randn(2, n, 5, generator=torch.Generator().manual_seed(3))
    m = match(x, (h, w), r)
    merged = m.merge(x)  # (2, n - r, 5)
    unmerged = m.unmerge(merged)  # (2, n, 5)
    dst = destinations(h, w, torch.device("cpu")).tolist()
    unit = F.normalize(x, dim=-1)
    for b in range(2):
        rows = m.back.view(2, n)[b] - b * (n - r)  # (n,) the merged row each token reads back
        assert torch.equal(unmerged[b], merged[b, rows])
        best, closest = (unit[b] @ unit[b, dst].T).max(dim=-1)  # (n,) brute force, over all destinations
        merged_away = []
        for j in range(n - r):
            group = (rows == j).nonzero().flatten().tolist()  # the tokens merged row j stands for
            torch.testing.assert_close(merged[b, j], x[b, group].mean(dim=0))
            if len(group) > 1:
                (d,) = [i for i in group if i in dst]  # one destination, with the sources it took in
                sources = [i for i in group if i != d]
                assert all(dst[closest[i]] == d for i in sources)
                merged_away += sources
        assert len(merged_away) == r
        kept = [i for i in range(n) if i not in dst and i not in merged_away]
        assert best[merged_away].min() >= best[kept].max()


# --- inside the U-Net ------------------------------------------------------------------------


def test_off_is_bit_identical() -> None:
    unet = _unet()
    x, t, context = _inputs()
    with torch.no_grad():
        expected = unet(x, t, context)
        with token_merging(unet, 0.5, enabled=False):
            assert torch.equal(unet(x, t, context), expected)
        with token_merging(unet, 0.0):
            assert torch.equal(unet(x, t, context), expected)
        with token_merging(unet, 0.5):
            assert not torch.equal(unet(x, t, context), expected)
        assert torch.equal(unet(x, t, context), expected)


def test_only_the_highest_resolution_self_attention_sees_fewer_tokens() -> None:
    unet = _unet()
    x, t, context = _inputs(size=(16, 16))  # level 0: 256 tokens, level 1: 64
    seen: dict[str, list[int]] = {}
    for name, m in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            m.register_forward_pre_hook(lambda _, args, name=name: seen.setdefault(name, []).append(args[0].shape[1]))
    with torch.no_grad(), token_merging(unet, 0.5):
        unet(x, t, context)
    level0 = ["input_blocks.1.1", "input_blocks.2.1", "output_blocks.6.1", "output_blocks.7.1", "output_blocks.8.1"]
    level1 = ["input_blocks.4.1", "input_blocks.5.1", "output_blocks.3.1", "output_blocks.4.1", "output_blocks.5.1"]
    for block in level0:
        assert seen[f"{block}.transformer_blocks.0.attn1"] == [256 - 128]
        assert seen[f"{block}.transformer_blocks.0.attn2"] == [256]
    for block in level1:
        assert seen[f"{block}.transformer_blocks.0.attn1"] == [64]
    assert seen["middle_block.1.transformer_blocks.0.attn1"] == [16]
    assert len(seen) == 2 * (len(level0) + len(level1) + 1)


def test_blocks_chosen_for_the_full_size_models() -> None:
    expected = {
        "sd15": ["input_blocks.1.1", "input_blocks.2.1", *(f"output_blocks.{i}.1" for i in (9, 10, 11))],
        # SDXL has no attention at level 0: its highest-resolution transformers are on level 1, 2 blocks deep
        "sdxl": ["input_blocks.4.1", "input_blocks.5.1", "output_blocks.3.1", "output_blocks.4.1", "output_blocks.5.1"],
    }
    for name, owners in expected.items():
        with torch.device("meta"):
            unet = UNet(PRESETS[name].unet)
        chosen = {id(b) for b in highest_resolution_blocks(unet)}
        names = [n for n, m in unet.named_modules() if id(m) in chosen]
        depth = PRESETS[name].unet.transformer_depth[1 if name == "sdxl" else 0]
        assert names == [f"{o}.transformer_blocks.{i}" for o in owners for i in range(depth)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_output_stays_close_on_smooth_latents(seed: int) -> None:
    """Measured (random weights, 32x32 latents, 1024 tokens at level 0, ratio 0.5): relative L2 error
    0.030, 0.032, 0.035 for seeds 0, 1, 2; skipping the level-0 self-attention altogether gives 0.17."""
    unet = _unet()
    _, t, context = _inputs(seed=seed)
    x = _smooth(32, seed)
    blocks = highest_resolution_blocks(unet)
    with torch.no_grad():
        expected = unet(x, t, context)
        with token_merging(unet, 0.5):
            merged = unet(x, t, context)
        for b in blocks:
            b.merge = lambda tokens, size: (tokens, torch.zeros_like)  # self-attention adds nothing
        skipped = unet(x, t, context)
    assert _relative_error(merged, expected) <= 0.045
    assert _relative_error(skipped, expected) >= 3 * _relative_error(merged, expected)


def test_odd_latent_size_runs() -> None:
    unet = _unet()
    x, t, context = _inputs(size=(18, 22))  # 18 x 22 -> 9 x 11 -> 5 x 6: odd rows hold only sources
    with torch.no_grad():
        expected = unet(x, t, context)
        with token_merging(unet, 0.5):
            merged = unet(x, t, context)
    assert merged.shape == expected.shape
    assert _relative_error(merged, expected) <= 0.06  # measured 0.042 (random, not smooth, latents)


def test_restored_after_exit_and_after_an_exception() -> None:
    unet = _unet()
    blocks = highest_resolution_blocks(unet)
    assert len(blocks) == 5
    with token_merging(unet, 0.5):
        assert all(isinstance(b.merge, TokenMerging) and b.merge.ratio == 0.5 for b in blocks)
        with token_merging(unet, 0.25):
            assert all(b.merge.ratio == 0.25 for b in blocks)
        assert all(b.merge.ratio == 0.5 for b in blocks)
    with pytest.raises(RuntimeError, match="boom"), token_merging(unet, 0.5):
        raise RuntimeError("boom")
    assert all(m.merge is None for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    assert "merge" not in "".join(unet.state_dict())


@pytest.mark.parametrize("ratio", [-0.1, 1.0])
def test_bad_ratio_is_refused(ratio: float) -> None:
    with pytest.raises(SdlabError, match=r"ratio must be in \[0, 1\)"), token_merging(_unet(), ratio):
        pass


def test_bf16_merges_like_fp32() -> None:
    unet = _unet()
    x, t, context = _inputs(size=(32, 32))
    with torch.no_grad(), token_merging(unet, 0.5):
        full = unet(x, t, context)
        half = unet.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16())
    assert half.dtype == torch.bfloat16
    assert _relative_error(half.float(), full) <= 0.03  # measured 0.020; unmerged, bf16 is 0.018 off fp32
