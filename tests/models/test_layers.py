"""Attention slicing: the same attention, a slice of queries at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdlab.models import layers
from sdlab.models.layers import Attention, attention_slicing


@pytest.mark.parametrize("dtype, upcast", [(torch.float32, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("cross", [False, True])
def test_sliced_attention_gives_the_same_result(monkeypatch, dtype, upcast, cross):
    torch.manual_seed(0)
    attn = Attention(32, 4, 32, context_dim=24 if cross else None, upcast=upcast).to(dtype)
    x = torch.randn(2, 100, 32, dtype=dtype)
    context = torch.randn(2, 7, 24, dtype=dtype) if cross else None
    with torch.no_grad():
        whole = attn(x, context)
        queries = []
        real = F.scaled_dot_product_attention
        monkeypatch.setattr(layers.F, "scaled_dot_product_attention", lambda q, k, v: queries.append(q.shape[2]) or real(q, k, v))
        with attention_slicing(attn, 32):
            sliced = attn(x, context)
    assert queries == [32, 32, 32, 4]  # 100 queries in slices of 32
    assert torch.equal(sliced, whole)  # each query attends alone in either case
    assert attn.slice_size is None  # restored


def test_slicing_is_restored_after_an_error():
    attn = Attention(8, 2, 8)
    with pytest.raises(RuntimeError), attention_slicing(attn, 4):
        assert attn.slice_size == 4
        raise RuntimeError("stop")
    assert attn.slice_size is None
