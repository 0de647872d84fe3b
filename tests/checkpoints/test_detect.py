"""Detection of family, inpainting, prediction type and EMA from single-file keys and shapes."""

from __future__ import annotations

import pytest
import torch

from sdlab.checkpoints import detect as det
from sdlab.errors import CheckpointError

U = det.UNET_PREFIX


def _state(text_prefix: str | None, *, in_channels: int = 4, adm: bool = False, width: int = 768) -> dict:
    s = {
        U + "input_blocks.0.0.weight": torch.zeros(8, in_channels, 3, 3),
        U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, width),
    }
    if adm:
        s[U + "label_emb.0.0.weight"] = torch.zeros(8, 16)
    if text_prefix:
        s[text_prefix + "w"] = torch.zeros(1)
    return s


@pytest.mark.parametrize(
    "prefix, adm, family",
    [
        ("cond_stage_model.transformer.", False, "sd1"),
        ("cond_stage_model.model.", False, "sd2"),
        ("conditioner.embedders.1.model.", True, "sdxl"),
        ("conditioner.embedders.0.model.", True, "sdxl-refiner"),
        ("conditioner.embedders.0.model.", False, "sd2"),  # SD2 saved by sgm
    ],
)
def test_family_from_text_encoder_keys(prefix, adm, family):
    found, _ = det.detect_family(_state(prefix, adm=adm), "f")
    assert found == family


@pytest.mark.parametrize("width, family", [(768, "sd1"), (1024, "sd2"), (2048, "sdxl"), (1280, "sdxl-refiner")])
def test_family_from_cross_attention_width_without_text_encoder(width, family):
    assert det.detect_family(_state(None, width=width), "f")[0] == family


def test_not_a_unet_is_refused():
    with pytest.raises(CheckpointError, match="no Stable Diffusion U-Net"):
        det.detect_family({"lora_unet_down.weight": torch.zeros(1)}, "lora.safetensors")


def test_inpainting_from_conv_in_channels():
    assert det.detect_inpainting(_state("cond_stage_model.transformer.", in_channels=9))
    assert not det.detect_inpainting(_state("cond_stage_model.transformer.", in_channels=4))


def test_prediction_rules(tmp_path):
    sd2 = _state("cond_stage_model.model.", width=1024)
    assert det.detect(sd2, source="f").prediction_type == "v_prediction"  # SD 2.1 default
    assert det.detect(sd2, source="f", extras={"global_step": 875000}).prediction_type == "epsilon"
    inpaint = _state("cond_stage_model.model.", width=1024, in_channels=9)
    assert det.detect(inpaint, source="f").prediction_type == "epsilon"
    assert det.detect({**_state("cond_stage_model.transformer."), "v_pred": torch.zeros(())}, source="f").prediction_type == "v_prediction"
    assert det.detect(_state("cond_stage_model.transformer."), source="f").prediction_type == "epsilon"
    # the norm1.bias spread that tells SD 2.1-v from 2.1-base at full size
    g = torch.Generator().manual_seed(0)
    wide = {**sd2, det.V_STD_KEY: torch.randn(320, generator=g) * 0.2}
    narrow = {**sd2, det.V_STD_KEY: torch.randn(320, generator=g) * 0.01}
    assert det.detect(wide, source="f").prediction_type == "v_prediction"
    assert det.detect(narrow, source="f").prediction_type == "epsilon"
    # an original config beside the file wins
    path = tmp_path / "m.safetensors"
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert det.detect(narrow, source="f", path=path).prediction_type == "v_prediction"
    path.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert det.detect(wide, source="f", path=path).prediction_type == "epsilon"


def test_ema_preferred_only_when_complete():
    s = {U + "a.b": torch.zeros(1), U + "c": torch.zeros(1)}
    full = {**s, det.ema_key(U + "a.b"): torch.ones(1), det.ema_key(U + "c"): torch.ones(1), "model_ema.decay": torch.tensor(0.9)}
    assert det.ema_key(U + "input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    assert det.prefer_ema(full) and torch.equal(full[U + "a.b"], torch.ones(1))
    assert not any(k.startswith("model_ema.") for k in full)
    partial = {**s, det.ema_key(U + "a.b"): torch.ones(1)}
    assert not det.prefer_ema(partial) and torch.equal(partial[U + "a.b"], torch.zeros(1))
