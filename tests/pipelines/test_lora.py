"""LoRA files made by diffusers/PEFT on small random models, saved in diffusers' and in kohya's layout:
sdlab's images with them match diffusers' `load_lora_weights` within 2/255; unloading gives back the
exact images of before; fused and patched LoRAs agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdlab
from sdlab.checkpoints.keymaps.unet import unet_key_pairs
from sdlab.config import preset
from sdlab.errors import SdlabError
from tests.reference import diffusers_pipeline

MAX_PIXEL_DIFF = 2  # out of 255
PROMPT, STEPS, GUIDANCE, SEED = "a red circle on a blue background", 4, 6.0, 1
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"]  # attention, feed-forward and convolutions
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
UNET_RANK, UNET_ALPHA, TEXT_RANK, TEXT_ALPHA = 4, 8.0, 2, 4.0  # scales 2: alpha is honoured, not assumed = rank


def _make_lora(cfg, folder):
    """A diffusers pipeline with random PEFT adapters on its U-Net and text encoder(s); the model is saved
    without them, the adapters in diffusers' layout (with metadata) and in kohya's (with alphas)."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = diffusers_pipeline(cfg, seed=31)
    pipe.save_pretrained(folder / "model")
    torch.manual_seed(5)
    unet_config = LoraConfig(r=UNET_RANK, lora_alpha=UNET_ALPHA, init_lora_weights=False, target_modules=UNET_TARGETS)
    text_config = LoraConfig(r=TEXT_RANK, lora_alpha=TEXT_ALPHA, init_lora_weights=False, target_modules=TEXT_TARGETS)
    pipe.unet.add_adapter(unet_config)
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
    metadata = {"unet_lora_adapter_metadata": unet_config.to_dict()}
    names = ["text_encoder", "text_encoder_2"] if cfg.family == "sdxl" else ["text_encoder"]
    for name in names:
        getattr(pipe, name).add_adapter(text_config)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(getattr(pipe, name))
        metadata[f"{name}_lora_adapter_metadata"] = text_config.to_dict()
    type(pipe).save_lora_weights(folder / "peft", **layers, **metadata)

    prefixed = {f"{name}.{k}": v for name in ["unet", *names] for k, v in layers[f"{name}_lora_layers"].items()}
    kohya = {}
    ldm = {theirs.removesuffix(".weight").replace(".", "_"): ours.removesuffix(".weight").replace(".", "_")
           for ours, theirs in unet_key_pairs(cfg.unet)}
    for key, value in convert_state_dict_to_kohya(prefixed).items():
        base, leaf = key.split(".", 1)
        # as kohya-ss writes them: CLIP layers under text_model_, SDXL's U-Net in the original ldm names
        if "_text_model_" not in base:
            base = base.replace("_encoder_layers_", "_text_model_encoder_layers_")
        if cfg.family == "sdxl" and base.startswith("lora_unet_"):
            base = "lora_unet_" + ldm[base.removeprefix("lora_unet_")]
        if leaf == "alpha":
            value = torch.tensor(UNET_ALPHA if base.startswith("lora_unet_") else TEXT_ALPHA)
        kohya[f"{base}.{leaf}"] = value
    save_file(kohya, folder / "kohya.safetensors")
    return folder / "model", {"diffusers": folder / "peft" / "pytorch_lora_weights.safetensors",
                              "kohya": folder / "kohya.safetensors"}


@pytest.fixture(scope="module", params=["tiny-sd1", "tiny-sdxl"])
def model(request, tmp_path_factory):
    cfg = preset(request.param)
    folder, files = _make_lora(cfg, tmp_path_factory.mktemp(request.param))
    return cfg, folder, files


def _reference(cfg, folder, lora_file) -> np.ndarray:
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    if lora_file is not None:
        pipe.load_lora_weights(lora_file)
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED),
               height=cfg.default_size, width=cfg.default_size)
    return np.asarray(out.images[0]).astype(int)


def _ours(pipe, lora=()) -> np.ndarray:
    image = pipe.generate(PROMPT, steps=STEPS, guidance=GUIDANCE, sampler="euler", schedule="default", seed=SEED,
                          lora=lora)[0]
    return np.asarray(image).astype(int)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_lora_matches_diffusers_and_unloads_exactly(model, layout):
    cfg, folder, files = model
    pipe = sdlab.load(folder)
    before = _ours(pipe)
    with_lora = _ours(pipe, [(files[layout], 1.0)])
    reference = _reference(cfg, folder, files[layout])
    assert np.abs(with_lora - reference).max() <= MAX_PIXEL_DIFF
    assert np.abs(with_lora - before).max() > 20  # the LoRA changes the picture a lot: the comparison means something
    network = pipe.load_lora(files[layout])
    assert network.unmatched == []
    assert set(network.updates) == {"unet", *[n for n in ("text_encoder", "text_encoder_2") if n in network.updates]}
    assert len(network.updates) == len(cfg.text) + 1  # every text encoder and the U-Net
    assert np.array_equal(_ours(pipe), before)  # unloaded: bit for bit the model as loaded


def test_fused_and_patched_agree_and_fusing_restores_weights_exactly(model):
    cfg, folder, files = model
    patched = sdlab.load(folder)
    fused = sdlab.load(folder, fuse_lora=True)
    weights = {k: v.clone() for k, v in fused.runner.components.unet.state_dict().items()}
    lora = [(files["kohya"], 0.7), (files["diffusers"], -0.3)]  # two at once, one negative
    a, b = _ours(patched, lora), _ours(fused, lora)
    assert np.abs(a - b).max() <= 1
    assert any(not torch.equal(v, weights[k]) for k, v in fused.runner.components.unet.state_dict().items())
    _ours(fused)
    assert all(torch.equal(v, weights[k]) for k, v in fused.runner.components.unet.state_dict().items())


def test_prompt_tags_resolve_in_lora_dirs_and_are_recorded(model, tmp_path):
    cfg, folder, files = model
    (tmp_path / "loras" / "sub").mkdir(parents=True)
    (tmp_path / "loras" / "sub" / "ink.safetensors").write_bytes(files["kohya"].read_bytes())
    pipe = sdlab.load(folder, lora_dirs=[tmp_path / "loras"])
    tagged = pipe.generate(f"{PROMPT} <lora:ink:0.6>", steps=STEPS, guidance=GUIDANCE, sampler="euler",
                           schedule="default", seed=SEED)[0]
    direct = _ours(pipe, [(files["kohya"], 0.6)])
    assert np.array_equal(np.asarray(tagged).astype(int), direct)  # the tag is the same LoRA, and it leaves the text
    assert "Lora hashes: \"ink: " in tagged.info["parameters"]
    assert "<lora:ink:0.6>" in tagged.info["parameters"]  # the prompt is recorded as written
    with pytest.raises(SdlabError, match="'nope' not found"):
        pipe.generate(f"{PROMPT} <lora:nope:1>", steps=1)


def test_separate_text_encoder_and_unet_weights(model, tmp_path):
    cfg, folder, files = model
    (tmp_path / "ink.safetensors").write_bytes(files["kohya"].read_bytes())
    pipe = sdlab.load(folder, lora_dirs=[tmp_path])
    run = dict(steps=STEPS, guidance=GUIDANCE, sampler="euler", schedule="default", seed=SEED)
    plain = np.asarray(pipe.generate(PROMPT, **run)[0]).astype(int)
    unet_only = np.asarray(pipe.generate(f"{PROMPT}<lora:ink:0:1>", **run)[0]).astype(int)
    te_only = np.asarray(pipe.generate(f"{PROMPT}<lora:ink:te=1:unet=0>", **run)[0]).astype(int)
    both = _ours(pipe, [(files["kohya"], 1.0)])
    for image in (unet_only, te_only):
        assert not np.array_equal(image, plain) and not np.array_equal(image, both)


def test_cli_lora_option_warns_of_unmatched_keys_and_refuses_bad_files(model, tmp_path, capsys):
    from safetensors.torch import load_file

    from sdlab.cli import main

    cfg, folder, files = model
    state = load_file(files["kohya"])
    state["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(2, 3)
    save_file(state, tmp_path / "extra.safetensors")
    out = tmp_path / "out.png"
    argv = ["generate", PROMPT, "--model", str(folder), "--steps", str(STEPS), "--guidance", str(GUIDANCE),
            "--sampler", "euler", "--schedule", "default", "--seed", str(SEED), "--out", str(out)]
    assert main([*argv, "--lora", f"{tmp_path / 'extra.safetensors'}:0.5"]) == 0
    err = capsys.readouterr().err
    assert "sdlab: warning:" in err and "1 keys match no layer" in err and "lora_unet_not_a_layer" in err
    api = _ours(sdlab.load(folder), [(files["kohya"], 0.5)])
    from PIL import Image

    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")).astype(int), api)

    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    assert main([*argv, "--lora", str(tmp_path / "bad.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sdlab: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out-1.png").exists()
