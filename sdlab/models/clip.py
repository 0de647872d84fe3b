"""CLIP text transformer (Radford et al. 2021): OpenAI ViT-L/14 and the OpenCLIP ViT-H/14 and bigG/14 variants.

A pre-LayerNorm transformer over token + learned position embeddings with causal self-attention.
The pooled text feature is the final-LayerNorm state at the first end-of-text token, optionally
projected (`text_projection`, SDXL's bigG). Parameter names are transformers' `CLIPTextModel` /
`CLIPTextModelWithProjection` names, so those state dicts load without renaming.

Which hidden state a pipeline feeds the U-Net is chosen by `encode(hidden_layer, final_layer_norm)`:
SD1 and SD2 take the last layer with the final LayerNorm (SD2's model already stops one layer early),
SDXL takes the penultimate layer without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sdlab.config import TextEncoderConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, as OpenCLIP uses."""
    return F.gelu(x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


@dataclass
class TextEncoderOutput:
    last_hidden_state: torch.Tensor  # (B, L, D) last layer after the final LayerNorm
    hidden_states: tuple[torch.Tensor, ...]  # num_layers + 1 of (B, L, D): embeddings, then each layer (no final LN)
    pooled: torch.Tensor  # (B, D) last_hidden_state at the first EOS token
    text_embeds: torch.Tensor | None  # (B, projection_dim) pooled @ projection, or None without one


class CLIPTextEmbeddings(nn.Module):
    """Token + position embeddings. Ids from `vocab_size` on look up `extra` (n, D), rows set aside for
    textual-inversion vectors (`set_extra_tokens`); they are not part of the state dict."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.extra: torch.Tensor | None = None  # (n, D) rows for ids vocab_size … vocab_size + n - 1
        self.extra_names: dict[str, tuple[int, ...]] = {}  # name -> its ids, in order

    def set_extra_tokens(self, rows: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        """Replace the extra rows with `rows` (name -> (n_i, D) vectors); returns each name's ids."""
        start, names, blocks = self.token_embedding.num_embeddings, {}, []
        for name, vectors in rows.items():
            names[name] = tuple(range(start, start + vectors.shape[0]))
            start += vectors.shape[0]
            blocks.append(vectors)
        weight = self.token_embedding.weight
        self.extra = torch.cat(blocks).to(weight.device, weight.dtype) if blocks else None  # (n, D)
        self.extra_names = names
        return names

    def tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) token vectors, extra rows included."""
        vocab = self.token_embedding.num_embeddings
        if self.extra is None:
            return self.token_embedding(input_ids)
        is_extra = input_ids >= vocab  # (B, L)
        base = self.token_embedding(input_ids.masked_fill(is_extra, 0))
        rows = self.extra.to(base.dtype)[(input_ids - vocab).clamp(0, self.extra.shape[0] - 1)]  # (B, L, D)
        return torch.where(is_extra[..., None], rows, base)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[-1]
        if length > self.position_embedding.num_embeddings:
            raise ValueError(
                f"CLIP text encoder takes at most {self.position_embedding.num_embeddings} tokens, got {length}; "
                "truncate or chunk the prompt first"
            )
        positions = torch.arange(length, device=input_ids.device)  # (L,)
        return self.tokens(input_ids) + self.position_embedding(positions)  # (B, L, D)


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention: each token sees itself and the tokens before it."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (self._heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, L, D/H)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, D/H)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))  # (B, L, D)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return x.view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, H, L, D/H)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.activation = ACTIVATIONS[cfg.activation]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))  # (B, L, D) -> (B, L, inter) -> (B, L, D)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """Holds the layers (for the `encoder.layers.N` names); CLIPTextTransformer runs them."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def hidden_states(self, input_ids: torch.Tensor, upto: int) -> list[torch.Tensor]:
        """Embeddings and the outputs of layers 1..upto: upto + 1 tensors of (B, L, D)."""
        states = [self.embeddings(input_ids)]
        for layer in self.encoder.layers[:upto]:
            states.append(layer(states[-1]))
        return states


class CLIPTextModel(nn.Module):
    """Token ids (B, L) -> hidden states (B, L, D) and a pooled (optionally projected) text feature."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor) -> TextEncoderOutput:
        states = self.text_model.hidden_states(input_ids, self.cfg.num_layers)
        last = self.text_model.final_layer_norm(states[-1])  # (B, L, D)
        pooled = self.pool(last, input_ids)  # (B, D)
        return TextEncoderOutput(last, tuple(states), pooled, self.project(pooled))

    def encode(
        self, input_ids: torch.Tensor, hidden_layer: int = -1, final_layer_norm: bool = True, pooled: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a pipeline conditions on: (hidden (B, L, D), text feature or None).

        `hidden_layer` indexes the hidden states like transformers' `hidden_states`: -1 the last layer,
        -2 the penultimate ("clip skip 2"), 0 the embeddings. The second result is `text_embeds` when the
        model has a projection, else the pooled state; it always comes from the last layer. With
        `pooled=False` it is None and no layer after `hidden_layer` is computed.
        """
        index = self._layer_index(hidden_layer)
        upto = self.cfg.num_layers if pooled else index
        states = self.text_model.hidden_states(input_ids, upto)
        norm = self.text_model.final_layer_norm
        hidden = norm(states[index]) if final_layer_norm else states[index]  # (B, L, D)
        if not pooled:
            return hidden, None
        feature = self.pool(norm(states[-1]), input_ids)  # (B, D)
        projected = self.project(feature)
        return hidden, feature if projected is None else projected

    def pool(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, D): the state at each row's first EOS token (position 0 if a row has none)."""
        eos = (input_ids == self.cfg.eos_token_id).int().argmax(dim=-1)  # (B,)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return last_hidden_state[rows, eos]

    def project(self, pooled: torch.Tensor) -> torch.Tensor | None:
        """(B, D) -> (B, projection_dim), or None without a projection."""
        return self.text_projection(pooled) if self.cfg.projection_dim is not None else None

    def _layer_index(self, hidden_layer: int) -> int:
        count = self.cfg.num_layers + 1  # embeddings + each layer
        if not -count <= hidden_layer < count:
            raise ValueError(
                f"hidden_layer must be in [{-count}, {count - 1}] for {self.cfg.num_layers} layers, got {hidden_layer}"
            )
        return hidden_layer % count
