"""Loading and saving ControlNets in every layout, against diffusers' ControlNetModel.

- a folder written by diffusers' `save_pretrained` loads to diffusers' residuals;
- sdlab's original-layout export is read by diffusers' `from_single_file` to the same tensors;
- single files in diffusers layout, and in original layout with or without `control_model.`,
  inside a whole cldm checkpoint or as a .pth, load with their config read off the shapes;
- files that are no ControlNet, or whose tensors do not fit, fail with one line naming why.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import save_file

from sdlab.checkpoints.controlnet import config_from_shapes, load_controlnet, original_names, save_controlnet
from sdlab.checkpoints.keymaps.controlnet import controlnet_shapes, controlnet_to_diffusers
from sdlab.config import ControlNetConfig, controlnet_preset
from sdlab.errors import CheckpointError
from tests.models.test_controlnet import ATOL, controlnet_inputs, diffusers_controlnet, ours_from, residual_diff
from tests.reference import max_diff

TINY = ["tiny-controlnet-sd1", "tiny-controlnet-sd2", "tiny-controlnet-sdxl"]
FULL = ["controlnet-sd15", "controlnet-sd21", "controlnet-sdxl"]


def conventional(cfg: ControlNetConfig) -> ControlNetConfig:
    """`cfg` with the heads a file without metadata is read with (SD1 8 per level, else head dim 64)."""
    heads = tuple(8 if cfg.family == "sd1" else max(1, c // 64) for c in cfg.unet.block_out_channels)
    return replace(cfg, unet=replace(cfg.unet, num_heads=heads, upcast_attention=cfg.family == "sd2"))


def read_off_shapes(cfg: ControlNetConfig) -> ControlNetConfig:
    """What a file without metadata yields: no weight shows SDXL's time-id sinusoid width (256 released)."""
    return replace(cfg, unet=replace(cfg.unet, addition_time_embed_dim=256))


def assert_same_weights(net, state: dict) -> None:
    mine = net.state_dict()
    assert mine.keys() == state.keys()
    unequal = [k for k in state if not torch.equal(mine[k], state[k])]
    assert not unequal, unequal[:5]


@pytest.fixture(scope="module", params=TINY)
def reference(request):
    cfg = conventional(controlnet_preset(request.param))
    ref = diffusers_controlnet(cfg, seed=TINY.index(request.param))
    return cfg, ref, ours_from(ref, cfg)


def test_diffusers_folder_gives_diffusers_residuals(reference, tmp_path) -> None:
    cfg, ref, _ = reference
    ref.save_pretrained(tmp_path / "cn")
    net = load_controlnet(tmp_path / "cn")
    assert net.cfg == cfg
    x, t, context, hint, kwargs, y = controlnet_inputs(cfg)
    with torch.no_grad():
        expected = ref(x, t, context, hint, conditioning_scale=0.7, **kwargs)
        # the same tolerance as the module's own parity test: loading must not add to it
        assert residual_diff(net(x, t, context, hint, y, scale=0.7), expected) <= ATOL


def test_fp16_variant_folder(tmp_path) -> None:
    cfg = controlnet_preset("tiny-controlnet-sd1")
    ref = diffusers_controlnet(cfg).half()
    ref.save_pretrained(tmp_path / "cn", variant="fp16")
    net = load_controlnet(tmp_path / "cn", dtype="fp16")
    assert next(net.parameters()).dtype == torch.float16
    assert max_diff(net.middle_block_out[0].weight, ref.controlnet_mid_block.weight) == 0.0


def test_diffusers_layout_single_file(reference, tmp_path) -> None:
    cfg, ref, ours = reference
    save_file(ref.state_dict(), tmp_path / "cn.safetensors")
    net = load_controlnet(tmp_path / "cn.safetensors")
    assert net.cfg == read_off_shapes(cfg)
    assert_same_weights(net, ours.state_dict())


@pytest.mark.parametrize("prefix", ["control_model.", ""], ids=["control_model", "bare"])
def test_original_single_file_without_metadata(reference, tmp_path, prefix: str) -> None:
    cfg, _, ours = reference
    state = {prefix + k: v for k, v in ours.state_dict().items()}
    save_file(state, tmp_path / "cn.safetensors")
    net = load_controlnet(tmp_path / "cn.safetensors")
    assert net.cfg == read_off_shapes(cfg)
    assert_same_weights(net, ours.state_dict())


def test_original_pickle_inside_a_whole_cldm_checkpoint(tmp_path) -> None:
    cfg = conventional(controlnet_preset("tiny-controlnet-sd1"))
    ours = ours_from(diffusers_controlnet(cfg), cfg)
    state = {"control_model." + k: v for k, v in ours.state_dict().items()}
    state |= {"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3), "first_stage_model.x": torch.zeros(1)}
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "control_sd15_canny.pth")
    net = load_controlnet(tmp_path / "control_sd15_canny.pth", dtype=None)
    assert net.cfg == cfg
    assert_same_weights(net, ours.state_dict())


def test_export_round_trips_and_diffusers_reads_it(tmp_path) -> None:
    # diffusers' converter expects the released hint encoder (input_hint_block.14 is its last conv)
    cfg = replace(controlnet_preset("tiny-controlnet-sd2"), hint_embedding_channels=(16, 32, 96, 256))
    ref = diffusers_controlnet(cfg)
    ours = ours_from(ref, cfg)
    save_controlnet(ours, tmp_path / "cn.safetensors")
    save_controlnet(ours, tmp_path / "folder")
    for source in ("cn.safetensors", "folder"):
        net = load_controlnet(tmp_path / source)
        assert net.cfg == cfg  # the file's metadata keeps the heads
        assert_same_weights(net, ours.state_dict())
    theirs = ControlNetModel.from_single_file(
        str(tmp_path / "cn.safetensors"), config=str(tmp_path / "folder"), local_files_only=True
    )
    assert_same_weights(theirs, ref.state_dict())
    assert_same_weights(ControlNetModel.from_pretrained(tmp_path / "folder"), ref.state_dict())


@pytest.mark.parametrize("name", FULL)
def test_full_size_configs_read_off_shapes(name: str) -> None:
    cfg = controlnet_preset(name)
    state = {k: torch.empty(s, device="meta") for k, s in controlnet_shapes(cfg).items()}
    assert config_from_shapes(state) == cfg
    assert config_from_shapes(original_names(controlnet_to_diffusers(state, cfg))) == cfg
    assert config_from_shapes(state, family="sd2").unet.num_heads[0] == 5  # the family decides the heads


# --- errors ----------------------------------------------------------------------------------


def _one_line_error(source, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as err:
        load_controlnet(source)
    assert "\n" not in str(err.value)


def test_not_a_controlnet(tmp_path) -> None:
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, lora)
    _one_line_error(lora, r"not a ControlNet \(it holds LoRA weights; .*\); expected 'input_hint_block\.0\.weight'")
    whole = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, whole)
    _one_line_error(whole, r"not a ControlNet \(it is a whole Stable Diffusion checkpoint")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    _one_line_error(tmp_path / "pipe", "a whole diffusers pipeline, not a ControlNet")
    _one_line_error(tmp_path / "nothing.safetensors", "no such file or folder")


def test_tensors_that_do_not_fit_name_the_key(tmp_path) -> None:
    cfg = conventional(controlnet_preset("tiny-controlnet-sd1"))
    state = dict(ours_from(diffusers_controlnet(cfg), cfg).state_dict())
    state["zero_convs.2.0.weight"] = torch.zeros(64, 32, 1, 1)
    save_file(state, tmp_path / "bad.safetensors")
    _one_line_error(tmp_path / "bad.safetensors", r"zero_convs\.2\.0\.weight \(64, 32, 1, 1\) != \(32, 32, 1, 1\)")
    del state["middle_block.1.proj_in.weight"]
    save_file(state, tmp_path / "cut.safetensors")
    _one_line_error(tmp_path / "cut.safetensors", r"key 'middle_block\.1\.proj_in\.weight' is missing")
