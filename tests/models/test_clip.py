"""sdlab's CLIP text encoders against transformers, and the CLIP weight/config key maps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sdlab.checkpoints.keymaps.clip import (
    clip_from_open_clip,
    clip_from_transformers,
    clip_to_open_clip,
    expected_shapes,
    open_clip_shapes,
    text_encoder_config_from_diffusers,
    text_encoder_config_to_diffusers,
)
from sdlab.config import CLIP_L, OPENCLIP_BIGG, OPENCLIP_H, PAD_WITH_EOS, PAD_WITH_ZERO, TINY_PRESETS, TextEncoderConfig
from sdlab.errors import CheckpointError
from sdlab.models.clip import CLIPTextModel
from sdlab.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max abs difference, fp32
TINY_L = TINY_PRESETS["tiny-sd1"].text[0].encoder  # quick_gelu
TINY_H = TINY_PRESETS["tiny-sd2"].text[0].encoder  # gelu
TINY_G = TINY_PRESETS["tiny-sdxl"].text[1].encoder  # gelu + projection
RANDOM = TextEncoderConfig(  # odd sizes everywhere, 3 heads of 16, another eps
    hidden_size=48, intermediate_size=100, num_layers=3, num_heads=3, layer_norm_eps=1e-6, projection_dim=24
)
PROMPTS = [
    "a photo of a cat",
    "",
    "(masterpiece:1.2), a castle on a hill at sunset!!, 8k, highly detailed",
    "Über-café 東京 🌸 it's 3.5 o'clock " + "very " * 90 + "long",  # truncated at 77
]


# --- helpers ----------------------------------------------------------------------------------------


def hf_model(cfg: TextEncoderConfig, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """transformers' model for `cfg`, every parameter drawn from a seeded generator (not its tiny init)."""
    config = transformers.CLIPTextConfig.from_dict(text_encoder_config_to_diffusers(cfg))
    cls = transformers.CLIPTextModelWithProjection if cfg.projection_dim else transformers.CLIPTextModel
    with torch.device(device):
        model = cls(config)
    if device != "meta":
        randomize(model, seed)
    return model.eval()


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def ours_from(model: torch.nn.Module, cfg: TextEncoderConfig) -> CLIPTextModel:
    ours = CLIPTextModel(cfg)
    ours.load_state_dict(clip_from_transformers(model.state_dict(), cfg), strict=True)
    return ours.eval()


def token_ids(cfg: TextEncoderConfig) -> torch.Tensor:
    pad = PAD_WITH_ZERO if cfg.activation == "gelu" else PAD_WITH_EOS  # OpenCLIP pads with 0, OpenAI with EOS
    return Tokenizer(pad)(PROMPTS)  # (B, 77)


def reference_run(cfg: TextEncoderConfig, seed: int, batch: int | None = None):
    """(transformers model, sdlab model loaded from it, token ids, transformers output with hidden states)."""
    theirs = hf_model(cfg, seed)
    ours = ours_from(theirs, cfg)
    ids = token_ids(cfg)[:batch]
    with torch.no_grad():
        ref = theirs(ids, output_hidden_states=True)
    return theirs, ours, ids, ref


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- sizes ------------------------------------------------------------------------------------------


def test_clip_l_has_the_sd15_parameter_count():
    with torch.device("meta"):
        assert param_count(CLIPTextModel(CLIP_L)) == 123_060_480


@pytest.mark.parametrize("cfg", [CLIP_L, OPENCLIP_H, OPENCLIP_BIGG], ids=["L", "H-23", "bigG"])
def test_parameter_count_and_shapes_match_transformers(cfg):
    theirs = hf_model(cfg, device="meta")
    with torch.device("meta"):
        ours = CLIPTextModel(cfg)
    assert param_count(ours) == param_count(theirs)
    # theirs may use the flattened names of transformers >= 5.6; the key map takes both
    assert {k: tuple(v.shape) for k, v in clip_from_transformers(theirs.state_dict(), cfg).items()} == {
        k: tuple(v.shape) for k, v in ours.state_dict().items()
    }


def test_state_dict_keys_are_the_transformers_file_names():
    keys = set(CLIPTextModel(TINY_G).state_dict())
    assert "text_model.embeddings.token_embedding.weight" in keys
    assert "text_model.embeddings.position_embedding.weight" in keys
    assert "text_model.encoder.layers.3.self_attn.q_proj.bias" in keys
    assert "text_model.encoder.layers.0.mlp.fc2.weight" in keys
    assert "text_model.final_layer_norm.weight" in keys
    assert "text_projection.weight" in keys
    assert not any("position_ids" in k for k in keys)
    assert "text_projection.weight" not in CLIPTextModel(TINY_L).state_dict()


# --- parity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY_L, TINY_H, TINY_G, RANDOM], ids=["tiny-L", "tiny-H", "tiny-G", "random"])
def test_forward_matches_transformers(cfg):
    theirs, ours, ids, ref = reference_run(cfg, seed=1)
    with torch.no_grad():
        out = ours(ids)
        pooled_ref = theirs.text_model(ids).pooler_output if cfg.projection_dim else ref.pooler_output
    assert diff(out.last_hidden_state, ref.last_hidden_state) <= TOL
    assert len(out.hidden_states) == len(ref.hidden_states) == cfg.num_layers + 1
    for mine, theirs_h in zip(out.hidden_states, ref.hidden_states):
        assert diff(mine, theirs_h) <= TOL
    assert diff(out.pooled, pooled_ref) <= TOL
    if cfg.projection_dim:
        assert diff(out.text_embeds, ref.text_embeds) <= TOL
    else:
        assert out.text_embeds is None


@pytest.mark.parametrize("cfg", [TINY_L, TINY_G], ids=["tiny-L", "tiny-G"])
def test_encode_matches_the_pipelines_choices(cfg):
    theirs, ours, ids, ref = reference_run(cfg, seed=2)
    with torch.no_grad():
        feature = ref.text_embeds if cfg.projection_dim else ref.pooler_output
        final_ln = (theirs.text_model if cfg.projection_dim else theirs).final_layer_norm
        sdxl_hidden, sdxl_feature = ours.encode(ids, hidden_layer=-2, final_layer_norm=False)  # SDXL
        skip_hidden, _ = ours.encode(ids, hidden_layer=-2, final_layer_norm=True)  # SD1 "clip skip 2"
        sd_hidden, sd_feature = ours.encode(ids)  # SD1 / SD2
        early, none = ours.encode(ids, hidden_layer=-2, final_layer_norm=False, pooled=False)
        embeddings, _ = ours.encode(ids, hidden_layer=0, final_layer_norm=False)
        expected_skip = final_ln(ref.hidden_states[-2])
    assert diff(sdxl_hidden, ref.hidden_states[-2]) <= TOL
    assert diff(sdxl_feature, feature) <= TOL
    assert diff(skip_hidden, expected_skip) <= TOL
    assert diff(sd_hidden, ref.last_hidden_state) <= TOL and diff(sd_feature, feature) <= TOL
    assert none is None and torch.equal(early, sdxl_hidden)
    assert diff(embeddings, ref.hidden_states[0]) <= TOL


def test_encode_stops_after_the_layer_it_needs():
    ours = CLIPTextModel(TINY_L).eval()
    calls = []
    for layer in ours.text_model.encoder.layers:
        layer.register_forward_hook(lambda *_: calls.append(1))
    ours.encode(token_ids(TINY_L), hidden_layer=-2, pooled=False)
    assert len(calls) == TINY_L.num_layers - 1
    with pytest.raises(ValueError, match="hidden_layer"):
        ours.encode(token_ids(TINY_L), hidden_layer=TINY_L.num_layers + 1)


def test_full_size_clip_l_matches_transformers():
    _, ours, ids, ref = reference_run(CLIP_L, seed=3, batch=2)
    with torch.no_grad():
        out = ours(ids)
    assert diff(out.last_hidden_state, ref.last_hidden_state) <= TOL
    assert diff(out.hidden_states[-2], ref.hidden_states[-2]) <= TOL
    assert diff(out.pooled, ref.pooler_output) <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(dtype):
    model = ours_from(hf_model(TINY_G, seed=4), TINY_G)
    ids = token_ids(TINY_G)
    with torch.no_grad():
        full = model(ids)
        half = model.to(dtype)(ids)
    assert half.last_hidden_state.dtype == half.text_embeds.dtype == dtype
    assert diff(half.last_hidden_state, full.last_hidden_state) < 0.1
    assert diff(half.text_embeds, full.text_embeds) < 0.1


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="at most 77 tokens"):
        CLIPTextModel(TINY_L)(torch.zeros(1, 78, dtype=torch.long))


# --- key maps: transformers ---------------------------------------------------------------------------


def test_from_transformers_takes_both_name_styles_and_drops_position_ids():
    state = CLIPTextModel(TINY_L).state_dict()
    flat = {k.removeprefix("text_model."): v for k, v in state.items()}
    flat["embeddings.position_ids"] = torch.arange(77)[None]
    saved = {**state, "text_model.embeddings.position_ids": torch.arange(77)[None]}
    assert clip_from_transformers(flat, TINY_L).keys() == state.keys()
    assert clip_from_transformers(saved, TINY_L).keys() == state.keys()


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda s: s.pop("text_model.encoder.layers.2.mlp.fc1.bias"), "text_model.encoder.layers.2.mlp.fc1.bias"),
        (lambda s: s.update({"text_model.encoder.layers.9.ln.weight": torch.ones(32)}), "layers.9.ln.weight"),
        (lambda s: s.update({"text_projection.weight": torch.ones(32, 32)}), "text_projection.weight"),
        (lambda s: s.update({"text_model.final_layer_norm.bias": torch.ones(33)}), "final_layer_norm.bias (33,)"),
    ],
    ids=["missing", "extra", "projection-without-config", "wrong-shape"],
)
def test_from_transformers_names_the_bad_key(edit, needle):
    state = dict(CLIPTextModel(TINY_L).state_dict())
    edit(state)
    with pytest.raises(CheckpointError, match="transformers CLIP") as err:
        clip_from_transformers(state, TINY_L)
    assert needle in str(err.value)


# --- key maps: OpenCLIP -------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY_H, TINY_G], ids=["H", "G"])
def test_open_clip_round_trip_is_identity(cfg):
    state = hf_model(cfg, seed=5).state_dict()
    ours = clip_from_transformers(state, cfg)
    theirs = clip_to_open_clip(ours, cfg)
    assert theirs.keys() == open_clip_shapes(cfg).keys()
    assert "logit_scale" not in theirs and ("text_projection" in theirs) == (cfg.projection_dim is not None)
    back = clip_from_open_clip(theirs, cfg)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_open_clip_projection_is_used_as_x_at_p():
    model = ours_from(hf_model(TINY_G, seed=6), TINY_G)
    P = clip_to_open_clip(model.state_dict(), TINY_G)["text_projection"]  # (D, P)
    x = torch.randn(2, TINY_G.hidden_size)
    assert diff(x @ P, model.project(x)) <= TOL


def test_sd2_file_drops_the_last_resblock_projection_and_logit_scale():
    """SD2 ships all 24 OpenCLIP-H blocks and text_projection; the 23-layer model keeps 23."""
    cfg = TINY_H
    ours = clip_from_transformers(hf_model(cfg, seed=7).state_dict(), cfg)
    full = replace(cfg, num_layers=cfg.num_layers + 1, projection_dim=cfg.hidden_size)
    sd2 = clip_to_open_clip(clip_from_transformers(hf_model(full, seed=8).state_dict(), full), full)
    sd2.update(clip_to_open_clip(ours, cfg))  # the shared blocks carry our weights
    sd2["logit_scale"] = torch.tensor(4.6052)
    assert f"transformer.resblocks.{cfg.num_layers}.attn.in_proj_weight" in sd2 and "text_projection" in sd2
    back = clip_from_open_clip(sd2, cfg)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_real_sd2_and_sdxl_open_clip_shapes_load():
    """The full-size layouts, on the meta device: SD2 (24 blocks in the file, 23 used) and bigG."""
    for cfg, blocks, proj in ((OPENCLIP_H, 24, 1024), (OPENCLIP_BIGG, 32, 1280)):
        file_cfg = replace(cfg, num_layers=blocks, projection_dim=proj)
        state = {k: torch.empty(s, device="meta") for k, s in open_clip_shapes(file_cfg).items()}
        state["logit_scale"] = torch.empty((), device="meta")
        ours = clip_from_open_clip(state, cfg)
        assert {k: tuple(v.shape) for k, v in ours.items()} == expected_shapes(cfg)


@pytest.mark.parametrize(
    "cfg, prefix",
    [(TINY_H, "cond_stage_model.model."), (TINY_G, "conditioner.embedders.1.model.")],
    ids=["sd2", "sdxl-bigG"],
)
def test_diffusers_reads_our_open_clip_export(cfg, prefix):
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    theirs = hf_model(cfg, seed=9)
    reference = theirs.state_dict()
    exported = clip_to_open_clip(clip_from_transformers(reference, cfg), cfg)
    converted = single_file_utils.convert_open_clip_checkpoint(
        theirs, {prefix + k: v for k, v in exported.items()}, prefix=prefix
    )
    if not hasattr(theirs, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel, as diffusers handles it
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda s: s.pop("transformer.resblocks.1.attn.in_proj_bias"), "transformer.resblocks.1.attn.in_proj_bias"),
        (lambda s: s.update({"transformer.resblocks.0.attn.extra": torch.ones(1)}), "resblocks.0.attn.extra"),
        (lambda s: s.update({"positional_embedding": torch.ones(76, 32)}), "positional_embedding (76, 32)"),
        (lambda s: s.update({"text_projection": torch.ones(32, 16)}), "text_projection (32, 16)"),
    ],
    ids=["missing", "extra", "wrong-shape", "wrong-projection"],
)
def test_from_open_clip_names_the_bad_key(edit, needle):
    state = clip_to_open_clip(CLIPTextModel(TINY_G).state_dict(), TINY_G)
    edit(state)
    with pytest.raises(CheckpointError, match="OpenCLIP") as err:
        clip_from_open_clip(state, TINY_G)
    assert needle in str(err.value)


def test_to_open_clip_checks_its_input():
    state = dict(CLIPTextModel(TINY_H).state_dict())
    del state["text_model.encoder.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointError, match="layers.0.self_attn.k_proj.weight"):
        clip_to_open_clip(state, TINY_H)


# --- config.json ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [CLIP_L, OPENCLIP_H, OPENCLIP_BIGG, TINY_L, TINY_H, TINY_G, RANDOM])
def test_config_round_trips(cfg):
    d = text_encoder_config_to_diffusers(cfg)
    assert d["architectures"] == ["CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"]
    assert text_encoder_config_from_diffusers(d) == cfg
    transformers.CLIPTextConfig.from_dict(d)  # a valid transformers config


# the fields the released text_encoder/config.json files share (placeholder token ids included)
SD_CONFIG_COMMON = {
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "layer_norm_eps": 1e-5,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "model_type": "clip_text_model",
}


def released_config(architecture: str, hidden: int, layers: int, heads: int, act: str, proj: int) -> dict:
    return {
        **SD_CONFIG_COMMON,
        "architectures": [architecture],
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_act": act,
        "projection_dim": proj,
    }


@pytest.mark.parametrize(
    "d, cfg",
    [
        (released_config("CLIPTextModel", 768, 12, 12, "quick_gelu", 768), CLIP_L),
        (released_config("CLIPTextModel", 1024, 23, 16, "gelu", 512), OPENCLIP_H),  # projection_dim unused
        (released_config("CLIPTextModelWithProjection", 1280, 32, 20, "gelu", 1280), OPENCLIP_BIGG),
    ],
    ids=["sd15", "sd21", "sdxl-2"],
)
def test_released_configs_read_as_the_presets(d, cfg):
    assert text_encoder_config_from_diffusers(d) == cfg


def test_unsupported_activation_is_refused():
    with pytest.raises(CheckpointError, match="gelu_new"):
        text_encoder_config_from_diffusers({"hidden_act": "gelu_new"})
