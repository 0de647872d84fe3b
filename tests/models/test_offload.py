"""Sequential offload. Without a GPU, "meta" stands in for the device: a layer whose weights did not
reach it, or an input left on the host, fails the forward with a device mismatch, as CUDA would. On the
CPU itself the outputs are bit for bit the plain ones, and the host weights are never changed."""

from __future__ import annotations

import pytest
import torch

from sdlab.config import PRESETS
from sdlab.models.clip import CLIPTextModel
from sdlab.models.offload import offloaded, sequential_offload
from sdlab.models.unet import UNet, added_condition
from sdlab.models.vae import AutoencoderKL
from sdlab.models.vae_tiling import decode_tiled
from sdlab.prompts import Chunk, encode_chunks
from tests.reference import perturb_

XL = PRESETS["tiny-sdxl"]


def _unet_inputs(device="cpu"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, XL.unet.in_channels, 16, 16, generator=g)
    context = torch.randn(2, 7, XL.unet.cross_attention_dim, generator=g)
    pooled = torch.randn(2, XL.text[-1].encoder.projection_dim, generator=g)
    ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
    added = added_condition(pooled, ids, XL.unet)
    return x, torch.tensor([500.0, 200.0]), context, added


def _unet() -> UNet:
    torch.manual_seed(0)
    return perturb_(UNet(XL.unet).eval(), 1)


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return perturb_(AutoencoderKL(XL.vae).eval(), 1)


def _clip() -> CLIPTextModel:
    torch.manual_seed(0)
    return perturb_(CLIPTextModel(XL.text[1].encoder).eval(), 1)


def _host_copy(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged_on_host(module, before) -> bool:
    after = module.state_dict()
    return all(t.device.type == "cpu" for t in after.values()) and all(torch.equal(after[k], v) for k, v in before.items())


@torch.no_grad()
def test_offloaded_unet_is_the_plain_unet_bit_for_bit():
    unet, inputs = _unet(), _unet_inputs()
    x, t, context, added = inputs
    plain = unet(x, t, context, added)
    with offloaded(unet, "cpu"):
        assert torch.equal(unet(x, t, context, added), plain)
    assert torch.equal(unet(x, t, context, added), plain)  # hooks removed: the module as it was


@torch.no_grad()
def test_every_layer_reaches_the_device_and_the_host_weights_stay():
    unet = _unet()
    before = _host_copy(unet)
    x, t, context, added = _unet_inputs()  # on the host: the hooks carry them over
    with offloaded(unet, "meta"):
        out = unet(x, t, context, added)
    assert out.device.type == "meta" and out.shape == x.shape
    assert _unchanged_on_host(unet, before)


@torch.no_grad()
def test_one_layer_at_a_time_on_the_device():
    unet = _unet()
    handles = sequential_offload(unet, "meta")
    on_device = []

    def count(m, args):  # registered after the offload hooks, so it sees each layer's weights moved in
        on_device.append(sum(p.numel() for p in unet.parameters() if p.device.type == "meta"))

    counters = [m.register_forward_pre_hook(count) for m in unet.modules()]
    unet(*_unet_inputs())
    for h in handles + counters:
        h.remove()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in unet.modules())
    assert max(on_device) == largest  # never two layers' weights on the device together
    assert sum(p.numel() for p in unet.parameters() if p.device.type == "meta") == 0


@torch.no_grad()
def test_vae_encode_decode_and_tiled_decode_run_offloaded():
    vae = _vae()
    before = _host_copy(vae)
    f = vae.cfg.downscale
    image = torch.rand(1, 3, 16 * f, 16 * f) * 2 - 1
    z = torch.randn(1, XL.vae.latent_channels, 16, 16)
    with offloaded(vae, "cpu"):
        assert torch.equal(vae.decode(z), _vae().decode(z))
    with offloaded(vae, "meta"):
        assert vae.encode(image).mean.device.type == "meta"
        assert vae.decode(z).shape == image.shape
        # tiled decoding reads the GroupNorm weights itself, outside any norm's forward; the latents
        # are already on the device, as a pipeline's are
        assert decode_tiled(vae, z.to("meta"), window=8, overlap=2, margin=2).shape == image.shape
    assert _unchanged_on_host(vae, before)


@pytest.mark.parametrize("weight", [1.0, 1.3])
@torch.no_grad()
def test_prompt_encoding_with_emphasis_runs_offloaded(weight):
    clip = _clip()
    ids = tuple([0] + [5, 6, 7] + [1] * 73)
    chunk = Chunk(ids, (1.0,) + (weight,) * 3 + (1.0,) * 73)
    plain = encode_chunks([chunk], clip, pooled=True)
    with offloaded(clip, "cpu"):
        assert all(torch.equal(a, b) for a, b in zip(encode_chunks([chunk], clip, pooled=True), plain))
    with offloaded(clip, "meta"):  # ids and weights are built on the host, beside the host weights
        hidden, pooled = encode_chunks([chunk], clip, pooled=True)
    assert hidden.device.type == "meta" and hidden.shape == plain[0].shape and pooled.shape == plain[1].shape
