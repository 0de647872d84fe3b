"""Weight updates (sdlab.models.lora) against LyCORIS's own modules: the ΔW each file layout describes,
and the layer outputs with the update patched in or fused, for Linear and strided/padded Conv2d layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdlab.checkpoints.lora import make_update
from sdlab.models import lora
from sdlab.models.tiling import circular_padding


def _layers():
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(24, 40), torch.randn(2, 5, 24)),
        "conv3x3": (nn.Conv2d(8, 12, 3, stride=2, padding=1), torch.randn(2, 8, 9, 9)),
        "conv1x1": (nn.Conv2d(16, 8, 1), torch.randn(2, 16, 4, 4)),
    }


def _lycoris(kind: str, layer: nn.Module, **options):
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    cls = {"locon": LoConModule, "loha": LohaModule, "lokr": LokrModule}[kind]
    module = cls("test", layer, multiplier=1.0, lora_dim=4, alpha=2, **options)
    with torch.no_grad():  # LyCORIS zero-initialises one factor; make every one count
        for p in module.parameters():
            if p is not layer.weight and p is not layer.bias:
                p.copy_(torch.randn_like(p) * 0.3)
    leaves = {k: v.detach().clone() for k, v in module.state_dict().items() if not k.startswith("org_")}
    return module, leaves


CASES = [
    ("locon", {}),
    ("locon", {"use_tucker": True}),
    ("loha", {}),
    ("loha", {"use_tucker": True}),
    ("lokr", {"factor": 4}),
    ("lokr", {"factor": 4, "decompose_both": True}),
    ("lokr", {"factor": 4, "full_matrix": True}),
]


@pytest.mark.parametrize("name", ["linear", "conv3x3", "conv1x1"])
@pytest.mark.parametrize("kind, options", CASES, ids=[f"{k}-{'-'.join(o) or 'plain'}" for k, o in CASES])
def test_update_matches_lycoris(name, kind, options):
    layer, x = _layers()[name]
    module, leaves = _lycoris(kind, layer, **options)
    update, used = make_update(leaves, name)
    assert set(leaves) <= used  # every tensor of the layout is read
    with torch.no_grad():
        plain = layer(x)
        expected = module(x)  # LyCORIS's own forward: the layer plus its update
    assert (expected - plain).abs().max() > 0.1  # the update matters
    ours = update.scale * update.delta(layer.weight.shape)  # ΔW, checked through the layer's own op
    delta = nn.functional.linear(x, ours) if name == "linear" else layer._conv_forward(x, ours, None)
    torch.testing.assert_close(plain + delta, expected, rtol=1e-5, atol=1e-5)

    root = nn.Sequential(layer)
    handles = lora.patch(root, {"0": update})
    with torch.no_grad():
        torch.testing.assert_close(root(x), expected, rtol=1e-5, atol=1e-5)
    lora.remove(handles)
    before = layer.weight.detach().clone()
    fused = lora.fuse(root, {"0": update})
    with torch.no_grad():
        torch.testing.assert_close(root(x), expected, rtol=1e-5, atol=1e-5)
    lora.restore(root, fused)
    assert torch.equal(layer.weight, before)


def test_patched_convolution_pads_like_its_layer_when_tiling():
    conv, x = _layers()["conv3x3"]
    root = nn.Sequential(conv)
    update = lora.LowRank(1.5, torch.randn(4, 8, 3, 3), torch.randn(12, 4, 1, 1))
    with circular_padding(root):
        handles = lora.patch(root, {"0": update})
        patched = root(x)
        lora.remove(handles)
        fused = lora.fuse(root, {"0": update})
        torch.testing.assert_close(patched, root(x), rtol=1e-5, atol=1e-5)
        lora.restore(root, fused)


def test_linear_update_fits_a_one_by_one_convolution():
    """SD1's proj_in is a 1x1 convolution, SD2's a Linear: one LoRA file serves both."""
    conv, x = _layers()["conv1x1"]
    root = nn.Sequential(conv)
    update = lora.LowRank(0.5, torch.randn(3, 16), torch.randn(8, 3))
    expected = conv(x) + 0.5 * nn.functional.conv2d(x, (update.up @ update.down)[..., None, None])
    handles = lora.patch(root, {"0": update})
    torch.testing.assert_close(root(x), expected, rtol=1e-5, atol=1e-5)
    lora.remove(handles)
    assert torch.equal(root(x), conv(x))


def test_update_that_does_not_fit_is_refused():
    linear, _ = _layers()["linear"]
    with pytest.raises(ValueError, match="does not fit|shape"):
        lora.LowRank(1.0, torch.randn(4, 23), torch.randn(40, 4)).delta(linear.weight.shape)
