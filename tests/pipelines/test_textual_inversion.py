"""Textual inversion in use: an embedding's vectors stand exactly where its name stands in the prompt,
nothing before it changes, and the conditioning and images match diffusers' `load_textual_inversion`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdlab
from sdlab.checkpoints.embeddings import Embedding, write_embedding
from sdlab.config import preset
from sdlab.prompts import encode_prompt, tokenize_prompt
from tests.reference import diffusers_pipeline

NAME = "inkstyle"
PROMPT = f"a photo of {NAME}, a red circle"
STEPS, GUIDANCE, SEED = 4, 6.0, 2


@pytest.fixture(scope="module", params=["tiny-sd1", "tiny-sdxl"])
def model(request, tmp_path_factory):
    cfg = preset(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    pipe = diffusers_pipeline(cfg, seed=41)
    pipe.save_pretrained(folder / "model")
    g = torch.Generator().manual_seed(7)
    vectors = tuple(torch.randn(2, spec.encoder.hidden_size, generator=g) for spec in cfg.text)  # two vectors each
    path = write_embedding(folder / f"{NAME}.safetensors", Embedding(NAME, vectors))
    return cfg, folder / "model", path, vectors


def _encode(pipe, prompt):
    comps = pipe.runner.components
    return encode_prompt(prompt, comps.text_encoders, comps.tokenizers, pipe.config.text)


def test_vectors_stand_exactly_where_the_name_stands(model):
    cfg, folder, path, vectors = model
    pipe = sdlab.load(folder)
    plain, _ = _encode(pipe, PROMPT)
    pipe.load_embeddings([path])
    with_embedding, _ = _encode(pipe, PROMPT)

    # the reference: the same encoder with the vectors appended as real rows of its token table
    comps = pipe.runner.components
    hidden, at = [], None
    for encoder, tokenizer, spec, v in zip(comps.text_encoders, comps.tokenizers, cfg.text, vectors):
        table = encoder.text_model.embeddings.token_embedding
        vocab, tok = table.num_embeddings, tokenizer.cfg
        content, name = tokenizer.encode(PROMPT), tokenizer.encode(NAME)
        at = next(i for i in range(len(content)) if content[i : i + len(name)] == name)
        content = content[:at] + [vocab, vocab + 1] + content[at + len(name):]  # the name's tokens -> two rows
        ids = [tok.bos_token_id, *content, tok.eos_token_id]
        ids += [tok.pad_token_id] * (tok.max_length - len(ids))
        grown = torch.nn.Embedding(vocab + 2, table.embedding_dim)
        grown.weight.data = torch.cat([table.weight.data, v])
        extra = encoder.text_model.embeddings.extra
        encoder.text_model.embeddings.extra, encoder.text_model.embeddings.token_embedding = None, grown
        try:
            with torch.no_grad():
                h, _ = encoder.encode(torch.tensor([ids]), spec.hidden_layer, spec.final_layer_norm, pooled=False)
        finally:
            encoder.text_model.embeddings.token_embedding, encoder.text_model.embeddings.extra = table, extra
        hidden.append(h)
    at += 1  # after BOS
    assert torch.equal(with_embedding, torch.cat(hidden, dim=-1))  # exactly the vectors, where the name stood
    torch.testing.assert_close(with_embedding[:, :at], plain[:, :at], rtol=0, atol=1e-6)  # nothing before it moves
    assert (with_embedding[:, at] - plain[:, at]).abs().max() > 0.1


def _diffusers_with_embedding(cfg, folder, path, vectors):
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    if cfg.family == "sdxl":
        for v, encoder, tokenizer in zip(vectors, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]):
            pipe.load_textual_inversion({NAME: v}, token=NAME, text_encoder=encoder, tokenizer=tokenizer)
    else:
        pipe.load_textual_inversion(str(path), token=NAME)
    return pipe


def test_images_match_diffusers_load_textual_inversion(model):
    cfg, folder, path, vectors = model
    reference = _diffusers_with_embedding(cfg, folder, path, vectors)
    theirs = reference(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=cfg.default_size,
                       width=cfg.default_size, generator=torch.Generator().manual_seed(SEED)).images[0]
    pipe = sdlab.load(folder, embeddings=[path])
    ours = pipe.generate(PROMPT, steps=STEPS, guidance=GUIDANCE, sampler="euler", schedule="default", seed=SEED)[0]
    assert np.abs(np.asarray(ours).astype(int) - np.asarray(theirs).astype(int)).max() <= 2
    assert f'TI hashes: "{NAME}: ' in ours.info["parameters"]
    without = sdlab.load(folder).generate(PROMPT, steps=STEPS, guidance=GUIDANCE, sampler="euler", schedule="default",
                                          seed=SEED)[0]
    assert np.abs(np.asarray(ours).astype(int) - np.asarray(without).astype(int)).max() > 10


def test_embeddings_dir_is_searched_by_name(model, tmp_path):
    cfg, folder, path, _ = model
    (tmp_path / "emb" / "deep").mkdir(parents=True)
    (tmp_path / "emb" / "deep" / path.name).write_bytes(path.read_bytes())
    pipe = sdlab.load(folder, embeddings_dirs=[tmp_path / "emb"])
    assert list(pipe.embeddings) == [NAME]
