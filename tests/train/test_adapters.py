"""LoRA and textual-inversion training modules: which layers a LoRA adapts, that an untrained LoRA is
the base model exactly, that only the adapters train, and gradient checkpointing's equal gradients."""

from __future__ import annotations

import torch

from sdlab.config import preset
from sdlab.models.clip import CLIPTextModel
from sdlab.models.layers import gradient_checkpointing
from sdlab.models.unet import UNet
from sdlab.tokenizer import Tokenizer
from sdlab.train.adapters import LoraTraining, TextualInversionTraining, text_layers, unet_layers
from sdlab.train.diffusion import LatentDiffusion

CFG = preset("tiny-sd1")


def _model(seed: int = 0) -> LatentDiffusion:
    torch.manual_seed(seed)
    return LatentDiffusion(CFG, UNet(CFG.unet), [CLIPTextModel(CFG.text[0].encoder)])


def _batch(model: LatentDiffusion):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    ids = [Tokenizer(CFG.text[0].tokenizer)(["a red circle", "a zqx"])]
    return x0, ids, torch.tensor([False, True]), torch.tensor([10, 500]), torch.randn(2, 4, 8, 8, generator=g)


def test_layer_choices():
    unet = UNet(CFG.unet)
    attention, transformer, everything = (unet_layers(unet, t) for t in ("attention", "transformer", "all"))
    assert set(attention) < set(transformer) < set(everything)
    assert all(n.rsplit(".", 2)[-2] in ("attn1", "attn2", "to_out") for n in attention)
    assert any(n.endswith("proj_in") for n in transformer) and not any("in_layers" in n for n in transformer)
    assert any(n.endswith("in_layers.2") for n in everything) and any(n.endswith(".op") for n in everything)
    encoder = CLIPTextModel(CFG.text[0].encoder)
    layers = CFG.text[0].encoder.num_layers
    assert len(text_layers(encoder, "transformer")) == 6 * layers
    assert len(text_layers(encoder, "attention", hidden_layer=-2)) == 4 * (layers - 1)  # the last layer is unused


def test_untrained_lora_is_the_base_model_and_only_adapters_train():
    model = _model()
    batch = _batch(model)
    with torch.no_grad():
        base = model(*batch)
    layers = {"unet": unet_layers(model.unet, "all"), "text_encoder": text_layers(model.text_encoders[0], "transformer")}
    trained = LoraTraining(model, layers, rank=4, alpha=2.0)
    assert all(name.startswith("pairs.") for name, _ in trained.named_parameters())
    assert len(trained.state_dict()) == 2 * sum(map(len, layers.values()))
    loss = trained(*batch)
    assert torch.equal(loss.detach(), base)  # up starts at zero
    loss.backward()
    assert all(p.grad is not None for p in trained.parameters())
    assert all(p.grad is None for p in model.parameters())
    trained.remove()
    with torch.no_grad():
        assert torch.equal(model(*batch), base)


def test_textual_inversion_vectors_start_at_the_word_and_get_gradients():
    model = _model()
    tokenizer = Tokenizer(CFG.text[0].tokenizer)
    trained = TextualInversionTraining(model, "zqx", 3, "circle", [tokenizer])
    word = model.text_encoders[0].text_model.embeddings.token_embedding.weight[tokenizer.encode("circle")[0]]
    assert torch.equal(trained.vectors[0].detach(), word.detach().expand(3, -1))
    vocab = CFG.text[0].encoder.vocab_size
    assert trained.ids == [(vocab, vocab + 1, vocab + 2)]
    x0, _, drop, t, noise = _batch(model)
    ids = torch.tensor([[49406, vocab, vocab + 1, vocab + 2, 49407] + [49407] * 72] * 2)
    trained(x0, [ids], drop, t, noise).backward()
    assert trained.vectors[0].grad is not None and trained.vectors[0].grad.abs().sum() > 0
    assert [n for n, _ in trained.named_parameters()] == ["vectors.0"]


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = _model(seed=3)
        gradient_checkpointing(model.unet, checkpointing)
        model(*_batch(model)).backward()
        grads.append({n: p.grad.clone() for n, p in model.unet.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)
