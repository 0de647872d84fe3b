"""Reading LoRA files: every layout names the same layers, unmatched keys are reported, and files that
cannot apply (DoRA, another model family, nothing matching) are refused with one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sdlab.checkpoints.lora import read_network
from sdlab.config import preset
from sdlab.errors import CheckpointError
from sdlab.models.clip import CLIPTextModel
from sdlab.models.unet import UNet

CFG = preset("tiny-sd1")
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # diffusers' name
Q_OURS = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # the same layer, ldm / sdlab name
FC1 = "text_model.encoder.layers.0.mlp.fc1"


@pytest.fixture(scope="module")
def modules():
    torch.manual_seed(0)
    return {"unet": UNet(CFG.unet), "text_encoder": CLIPTextModel(CFG.text[0].encoder)}


def _lowrank(out_features: int, in_features: int, rank: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, in_features, generator=g), torch.randn(out_features, rank, generator=g)


def _read(tmp_path, modules, state, name="x.safetensors", metadata=None):
    path = tmp_path / name
    save_file({k: v.clone() for k, v in state.items()}, path, metadata=metadata)
    return read_network(path, modules, CFG.unet)


def test_every_layout_names_the_same_layers_with_the_same_scale(tmp_path, modules):
    width = modules["unet"].get_submodule(Q_OURS).weight.shape
    te = modules["text_encoder"].get_submodule(FC1).weight.shape
    down, up = _lowrank(width[0], width[1])
    tdown, tup = _lowrank(te[0], te[1], seed=1)
    layouts = {
        "kohya, diffusers names": {
            f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": down, f"lora_unet_{Q.replace('.', '_')}.lora_up.weight": up,
            f"lora_unet_{Q.replace('.', '_')}.alpha": torch.tensor(1.0),
            f"lora_te_{FC1.replace('.', '_')}.lora_down.weight": tdown, f"lora_te_{FC1.replace('.', '_')}.lora_up.weight": tup,
            f"lora_te_{FC1.replace('.', '_')}.alpha": torch.tensor(1.0)},
        "kohya, ldm names": {
            f"lora_unet_{Q_OURS.replace('.', '_')}.lora_down.weight": down,
            f"lora_unet_{Q_OURS.replace('.', '_')}.lora_up.weight": up, f"lora_unet_{Q_OURS.replace('.', '_')}.alpha": torch.tensor(1.0),
            f"lora_te1_{FC1.replace('.', '_')}.lora_down.weight": tdown, f"lora_te1_{FC1.replace('.', '_')}.lora_up.weight": tup,
            f"lora_te1_{FC1.replace('.', '_')}.alpha": torch.tensor(1.0)},
        "peft": {f"unet.{Q}.lora_A.weight": down, f"unet.{Q}.lora_B.weight": up,
                 f"text_encoder.{FC1}.lora_A.weight": tdown, f"text_encoder.{FC1}.lora_B.weight": tup},
        "old diffusers": {
            f"unet.{Q.removesuffix('.to_q')}.processor.to_q_lora.down.weight": down,
            f"unet.{Q.removesuffix('.to_q')}.processor.to_q_lora.up.weight": up,
            f"text_encoder.{FC1}.lora_linear_layer.down.weight": tdown,
            f"text_encoder.{FC1}.lora_linear_layer.up.weight": tup},
        "oldest diffusers (no prefix)": {f"{Q.removesuffix('.to_q')}.processor.to_q_lora.down.weight": down,
                                         f"{Q.removesuffix('.to_q')}.processor.to_q_lora.up.weight": up},
    }
    metadata = {"peft": {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 1,
                                                              "text_encoder.r": 2, "text_encoder.lora_alpha": 1})}}
    for layout, state in layouts.items():
        net = _read(tmp_path, modules, state, metadata=metadata.get(layout))
        assert net.unmatched == [], layout
        update = net.updates["unet"][Q_OURS]
        assert update.scale == (0.5 if layout != "old diffusers" and not layout.startswith("oldest") else 1.0), layout
        torch.testing.assert_close(update.delta(torch.Size(width)), up @ down)
        if "text_encoder" in net.updates:
            torch.testing.assert_close(net.updates["text_encoder"][FC1].delta(torch.Size(te)), tup @ tdown)


def test_metadata_patterns_set_per_layer_rank_and_alpha(tmp_path, modules):
    width = modules["unet"].get_submodule(Q_OURS).weight.shape
    down, up = _lowrank(width[0], width[1], rank=4)
    meta = {"unet.r": 2, "unet.lora_alpha": 2, "unet.rank_pattern": {"attn1.to_q": 4}, "unet.alpha_pattern": {"to_q": 8}}
    net = _read(tmp_path, modules, {f"unet.{Q}.lora_A.weight": down, f"unet.{Q}.lora_B.weight": up},
                metadata={"lora_adapter_metadata": json.dumps(meta)})
    assert net.updates["unet"][Q_OURS].scale == 2.0  # 8 / 4


def test_unmatched_keys_are_reported(tmp_path, modules):
    width = modules["unet"].get_submodule(Q_OURS).weight.shape
    down, up = _lowrank(width[0], width[1])
    net = _read(tmp_path, modules, {
        f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": down, f"lora_unet_{Q.replace('.', '_')}.lora_up.weight": up,
        "lora_unet_no_such_layer.lora_down.weight": down, "lora_unet_no_such_layer.lora_up.weight": up,
        "bundle_emb.style.string_to_param.*": torch.zeros(1, 32),
    })
    assert net.count() == 1
    assert net.unmatched == ["bundle_emb.style.string_to_param.*", "lora_unet_no_such_layer.lora_down.weight",
                             "lora_unet_no_such_layer.lora_up.weight"]


@pytest.mark.parametrize("state, message", [
    ({"lora_unet_x.lora_down.weight": torch.zeros(2, 3)}, "none of its 1 keys names a layer"),
    ({f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": torch.zeros(2, 7),
      f"lora_unet_{Q.replace('.', '_')}.lora_up.weight": torch.zeros(5, 2)}, "does not fit unet layer"),
    ({f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": torch.zeros(2, 7),
      f"lora_unet_{Q.replace('.', '_')}.lora_up.weight": torch.zeros(5, 3)}, "does not follow lora_down"),
    ({f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": torch.zeros(2, 32),
      f"lora_unet_{Q.replace('.', '_')}.lora_up.weight": torch.zeros(32, 2),
      f"lora_unet_{Q.replace('.', '_')}.dora_scale": torch.zeros(32, 1)}, "DoRA"),
    ({f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": torch.zeros(2, 32),
      f"lora_unet_{Q.replace('.', '_')}.lora_up.weight": torch.zeros(32, 2),
      f"lora_unet_{Q_OURS.replace('.', '_')}.lora_down.weight": torch.zeros(2, 32),
      f"lora_unet_{Q_OURS.replace('.', '_')}.lora_up.weight": torch.zeros(32, 2)}, "a second update"),
])
def test_files_that_cannot_apply_are_refused_in_one_line(tmp_path, modules, state, message):
    with pytest.raises(CheckpointError, match=message) as e:
        _read(tmp_path, modules, state)
    assert "\n" not in str(e.value)


def test_sdxl_lora_on_an_sd1_model_is_refused(tmp_path, modules):
    """An SDXL LoRA's cross-attention keys name SD1 layers of other widths."""
    key = f"lora_unet_{Q.replace('.', '_').replace('attn1_to_q', 'attn2_to_k')}"
    with pytest.raises(CheckpointError, match="another model family"):
        _read(tmp_path, modules, {f"{key}.lora_down.weight": torch.zeros(4, 2048), f"{key}.lora_up.weight": torch.zeros(32, 4)})


@pytest.mark.parametrize("state, metadata, message", [
    ({f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": torch.zeros(2, 32),
      f"lora_unet_{Q.replace('.', '_')}.lora_up.weight": torch.zeros(32, 2),
      f"lora_unet_{Q.replace('.', '_')}.alpha": torch.ones(3)}, None, "alpha holds 3 values"),
    ({f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": torch.zeros(2),
      f"lora_unet_{Q.replace('.', '_')}.lora_up.weight": torch.zeros(32)}, None, "does not follow lora_down"),
    ({f"unet.{Q}.lora_A.weight": torch.zeros(2, 32), f"unet.{Q}.lora_B.weight": torch.zeros(32, 2)},
     {"lora_adapter_metadata": "[1, 2]"}, "not a JSON object"),
    ({f"unet.{Q}.lora_A.weight": torch.zeros(2, 32), f"unet.{Q}.lora_B.weight": torch.zeros(32, 2)},
     {"lora_adapter_metadata": json.dumps({"unet.r": "two", "unet.lora_alpha": 1})}, "not positive numbers"),
])
def test_malformed_structure_is_refused_in_one_line(tmp_path, modules, state, metadata, message):
    with pytest.raises(CheckpointError, match=message) as e:
        _read(tmp_path, modules, state, metadata=metadata)
    assert "\n" not in str(e.value)


def test_a_pattern_that_is_not_a_regular_expression_is_a_name(tmp_path, modules):
    width = modules["unet"].get_submodule(Q_OURS).weight.shape
    down, up = _lowrank(width[0], width[1], rank=4)
    meta = {"unet.r": 2, "unet.lora_alpha": 2, "unet.alpha_pattern": {"attn1.to_q(": 8, "attn1.to_q": 6}}
    net = _read(tmp_path, modules, {f"unet.{Q}.lora_A.weight": down, f"unet.{Q}.lora_B.weight": up},
                metadata={"lora_adapter_metadata": json.dumps(meta)})
    assert net.updates["unet"][Q_OURS].scale == 3.0  # the broken pattern matched nothing; 6 / 2
