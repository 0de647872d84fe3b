"""Loading and saving whole models against diffusers, for every family, on tiny random weights.

For each family a diffusers pipeline with random weights is saved with `save_pretrained`; then
- sdlab loads that folder and its networks give diffusers' outputs;
- sdlab's single-file export is read by diffusers (`from_single_file` and the `convert_ldm_*`
  converters) to exactly the original tensors, and by sdlab to exactly the same model;
- `sdlab convert` turns that file back into a folder diffusers loads to the same tensors.
"""

from __future__ import annotations

import pytest
import torch

from sdlab.checkpoints import load as loading
from sdlab.checkpoints.formats import read_weights
from sdlab.checkpoints.save import save_single_file
from sdlab.cli import main
from sdlab.models.unet import added_condition
from tests.reference import diffusers_pipeline, max_diff, text_encoders_of

FAMILIES = ["tiny-sd1", "tiny-sd2", "tiny-sdxl", "tiny-sdxl-refiner", "tiny-sd1-inpainting"]
TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    from sdlab.config import preset

    cfg = preset(request.param)
    pipe = diffusers_pipeline(cfg, seed=FAMILIES.index(request.param))
    root = tmp_path_factory.mktemp(request.param)
    folder = root / "folder"
    pipe.save_pretrained(folder)
    comps = loading.load(folder)
    single = save_single_file(comps, root / "model.safetensors")
    return cfg, pipe, folder, comps, single


def _normal(state: dict) -> dict:
    """transformers 5 drops `text_model.` from CLIPTextModel.state_dict(); files keep it."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def _state_equal(a: dict, b: dict) -> None:
    a, b = _normal(a), _normal(b)
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, unequal[:5]


def _unet_inputs(cfg, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    h = w = cfg.default_size // cfg.vae.downscale
    x = torch.randn(batch, cfg.unet.in_channels, h, w, generator=g)
    t = torch.tensor([10.0, 981.0][:batch])
    ctx = torch.randn(batch, 77, cfg.unet.cross_attention_dim, generator=g)
    extra = None
    if cfg.unet.addition_embed_dim:
        n_ids = 5 if cfg.requires_aesthetics_score else 6
        pooled_dim = cfg.unet.addition_embed_dim - n_ids * cfg.unet.addition_time_embed_dim
        pooled = torch.randn(batch, pooled_dim, generator=g)
        ids = torch.tensor([[64.0, 48.0, 0.0, 8.0, 64.0, 48.0][:n_ids]] * batch)
        extra = (pooled, ids)
    return x, t, ctx, extra


def test_folder_loads_to_reference_outputs(saved):
    cfg, pipe, folder, comps, _ = saved
    assert comps.config.family == cfg.family
    assert comps.config.unet == cfg.unet and comps.config.vae == cfg.vae
    assert comps.config.text == cfg.text
    assert comps.config.prediction_type == cfg.prediction_type
    x, t, ctx, extra = _unet_inputs(cfg)
    with torch.no_grad():
        kwargs = {"added_cond_kwargs": {"text_embeds": extra[0], "time_ids": extra[1]}} if extra else {}
        ref = pipe.unet(x, t, ctx, **kwargs).sample
        ours = comps.unet(x, t, ctx, y=added_condition(*extra, cfg.unet) if extra else None)
        assert max_diff(ours, ref) <= TOL

        image = torch.rand(1, 3, cfg.default_size, cfg.default_size, generator=torch.Generator().manual_seed(2)) * 2 - 1
        assert max_diff(comps.vae.encode(image).mean, pipe.vae.encode(image).latent_dist.mean) <= TOL
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        assert max_diff(comps.vae.decode(z), pipe.vae.decode(z).sample) <= TOL

        for tok, ours_enc, ref_enc in zip(comps.tokenizers, comps.text_encoders, text_encoders_of(pipe)):
            ids = tok(["a photo of a cat", "an astronaut riding a horse, (masterpiece:1.2)"])
            out = ours_enc(ids)
            ref_out = ref_enc(ids, output_hidden_states=True)
            assert max_diff(out.last_hidden_state, ref_out.last_hidden_state) <= TOL
            assert max_diff(out.hidden_states[-2], ref_out.hidden_states[-2]) <= TOL
            if getattr(ref_out, "text_embeds", None) is not None:
                assert max_diff(out.text_embeds, ref_out.text_embeds) <= TOL


def test_single_file_loads_identically(saved, tmp_path):
    cfg, _, folder, comps, single = saved
    again = loading.load(single)
    assert again.config == comps.config
    for name, module in comps.modules().items():
        _state_equal(again.modules()[name].state_dict(), module.state_dict())
    x, t, ctx, extra = _unet_inputs(cfg, batch=1)
    y = added_condition(*extra, cfg.unet) if extra else None
    with torch.no_grad():
        # Same bits in, but safetensors hands out memory-mapped tensors at file-dependent alignment,
        # which can change the CPU kernels' summation order in the last bits.
        assert max_diff(again.unet(x, t, ctx, y=y), comps.unet(x, t, ctx, y=y)) <= 1e-5
    # the CLI writes the same file as the API
    assert main(["convert", str(folder), str(tmp_path / "cli.safetensors")]) == 0
    _state_equal(read_weights(tmp_path / "cli.safetensors")[0], read_weights(single)[0])


def test_diffusers_from_single_file_reads_our_export(saved):
    cfg, pipe, folder, _, single = saved
    theirs = type(pipe).from_single_file(str(single), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ref = getattr(pipe, name, None)
        if ref is not None:
            _state_equal(getattr(theirs, name).state_dict(), ref.state_dict())


def test_diffusers_converters_map_export_back(saved):
    from diffusers.loaders import single_file_utils as su

    cfg, pipe, _, _, single = saved
    ckpt, _ = read_weights(single)
    _state_equal(su.convert_ldm_unet_checkpoint(ckpt, dict(pipe.unet.config)), pipe.unet.state_dict())
    _state_equal(su.convert_ldm_vae_checkpoint(ckpt, dict(pipe.vae.config)), pipe.vae.state_dict())
    if cfg.family == "sd1":
        _state_equal(su.convert_ldm_clip_checkpoint(ckpt), pipe.text_encoder.state_dict())
    elif cfg.family == "sd2":
        _state_equal(su.convert_open_clip_checkpoint(pipe.text_encoder, ckpt), pipe.text_encoder.state_dict())
    elif cfg.family == "sdxl":
        assert any(k.startswith("conditioner.embedders.0.transformer.") for k in ckpt)
        _state_equal(su.convert_ldm_clip_checkpoint(ckpt), pipe.text_encoder.state_dict())
        g = su.convert_open_clip_checkpoint(pipe.text_encoder_2, ckpt, prefix="conditioner.embedders.1.model.")
        _state_equal(g, pipe.text_encoder_2.state_dict())
    else:
        g = su.convert_open_clip_checkpoint(pipe.text_encoder_2, ckpt, prefix="conditioner.embedders.0.model.")
        _state_equal(g, pipe.text_encoder_2.state_dict())


def test_convert_cli_back_to_a_diffusers_folder(saved, tmp_path):
    cfg, pipe, _, _, single = saved
    out = tmp_path / "converted"
    assert main(["convert", str(single), str(out)]) == 0
    theirs = type(pipe).from_pretrained(out, local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ref = getattr(pipe, name, None)
        if ref is not None:
            _state_equal(getattr(theirs, name).state_dict(), ref.state_dict())
    assert theirs.scheduler.config.prediction_type == cfg.prediction_type


def test_fp16_variant_folder(tmp_path):
    from sdlab.config import preset

    pipe = diffusers_pipeline(preset("tiny-sd1"), seed=7).to(torch.float16)
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    comps = loading.load(tmp_path / "fp16", dtype="fp32")
    assert comps.unet.out[2].weight.dtype == torch.float32
    assert torch.equal(comps.unet.out[2].weight, pipe.unet.conv_out.weight.float())


def test_pickled_bin_folder(tmp_path):
    from sdlab.config import preset

    pipe = diffusers_pipeline(preset("tiny-sd1"), seed=8)
    pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "unet" / "diffusion_pytorch_model.bin").is_file()
    comps = loading.load(tmp_path / "bin")
    _state_equal(loading.unet_from_diffusers(pipe.unet.state_dict(), comps.config.unet), comps.unet.state_dict())


def test_ckpt_with_ema_prefers_ema(tmp_path):
    from sdlab.checkpoints.detect import UNET_PREFIX, ema_key
    from sdlab.config import preset

    pipe = diffusers_pipeline(preset("tiny-sd1"), seed=5)
    pipe.save_pretrained(tmp_path / "folder")
    comps = loading.load(tmp_path / "folder")
    state, _ = read_weights(save_single_file(comps, tmp_path / "model.safetensors"))
    unet_keys = [k for k in state if k.startswith(UNET_PREFIX)]
    for k in unet_keys:
        state[ema_key(k)] = state[k] + 1.0
    torch.save({"state_dict": state, "global_step": 123}, tmp_path / "model.ckpt")
    loaded = loading.load(tmp_path / "model.ckpt", config="tiny-sd1")
    for k in unet_keys:
        assert torch.equal(loaded.unet.state_dict()[k[len(UNET_PREFIX):]], state[k] + 1.0)
    _state_equal(loaded.vae.state_dict(), comps.vae.state_dict())
