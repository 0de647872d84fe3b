"""What fine-tuning trains besides whole networks: LoRA adapters and textual-inversion vectors.

Both wrap a frozen `LatentDiffusion` (U-Net + text encoders) without registering it, so the trained
module's parameters, state dict, EMA and DDP gradients are the adapters' alone, while its forward is
the frozen model's loss with the adapters in place:

    LoRA  each chosen Linear / Conv2d layer W gets W x + (alpha / r) · up(down(x)), down (r, in[, k, k])
          initialised like a Linear layer (Kaiming-uniform), up zero, so training starts at the base model
    TI    a name's n vectors are extra rows of each text encoder's token table (CLIPTextEmbeddings.extra),
          initialised from the token vectors of a word
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from sdlab.checkpoints.load import TEXT_COMPONENT_NAMES
from sdlab.models import lora
from sdlab.models.layers import Downsample, ResBlock, SpatialTransformer, Upsample
from sdlab.tokenizer import Tokenizer

# which layers a LoRA trains: kohya-ss's default is "transformer"; "all" adds the residual blocks'
# convolutions and the resamplers (LyCORIS's LoCon)
TARGETS = ("attention", "transformer", "all")
_ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_TEXT_ATTENTION = re.compile(r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
_TEXT_MLP = re.compile(r"mlp\.(fc1|fc2)$")


def unet_layers(unet: nn.Module, targets: str) -> list[str]:
    """Names of the U-Net's Linear/Conv2d layers a LoRA of kind `targets` adapts, in model order."""
    if targets not in TARGETS:
        raise ValueError(f"unknown LoRA targets {targets!r}; use one of {', '.join(TARGETS)}")
    inside: dict[str, type] = {}
    for name, m in unet.named_modules():
        if isinstance(m, (SpatialTransformer, ResBlock, Downsample, Upsample)):
            for sub, _ in m.named_modules():
                inside.setdefault(f"{name}.{sub}" if sub else name, type(m))
    chosen = []
    for name, m in unet.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        kind = inside.get(name)
        if targets == "attention":
            keep = bool(_ATTENTION.search(name))
        elif targets == "transformer":
            keep = kind is SpatialTransformer
        else:
            keep = kind is not None
        if keep:
            chosen.append(name)
    return chosen


_LAYER_INDEX = re.compile(r"encoder\.layers\.(\d+)\.")


def text_layers(encoder: nn.Module, targets: str, hidden_layer: int | None = None) -> list[str]:
    """The text encoder's attention projections, and for "transformer"/"all" its MLPs (kohya's default).
    With `hidden_layer` (the state the conditioning reads, e.g. -2), only the layers that state depends
    on: under DDP every trained parameter must receive a gradient."""
    names = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n in names if _TEXT_ATTENTION.search(n) or (targets != "attention" and _TEXT_MLP.search(n))]
    if hidden_layer is None:
        return chosen
    used = hidden_layer % (encoder.cfg.num_layers + 1)  # hidden states 0..used: layers 0..used-1 run
    return [n for n in chosen if int(_LAYER_INDEX.search(n).group(1)) < used]  # type: ignore[union-attr]


class LowRankPair(nn.Module):
    """down (r, in[, k, k]) and up (out, r[, 1, 1]) of one layer, as trainable parameters."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, rank: int, generator: torch.Generator):
        super().__init__()
        w = layer.weight
        if isinstance(layer, nn.Conv2d):
            down_shape, up_shape = (rank, w.shape[1], *w.shape[2:]), (w.shape[0], rank, 1, 1)
        else:
            down_shape, up_shape = (rank, w.shape[1]), (w.shape[0], rank)
        fan_in = math.prod(down_shape[1:])
        bound = 1 / math.sqrt(fan_in)  # nn.Linear's default: Kaiming-uniform with a = sqrt(5)
        self.down = nn.Parameter((torch.rand(down_shape, generator=generator) * 2 - 1) * bound)
        self.up = nn.Parameter(torch.zeros(up_shape))


def _key(component: str, layer: str) -> str:
    return f"{component}:{layer}".replace(".", "/")  # ModuleDict keys may not hold "."


class LoraTraining(nn.Module):
    """Trainable LoRA pairs on a frozen model; forward(*batch) is the model's loss with them applied."""

    def __init__(self, model: nn.Module, layers: Mapping[str, Sequence[str]], rank: int, alpha: float, seed: int = 0):
        """`model` a LatentDiffusion; `layers` component ("unet", "text_encoder", …) -> layer names in it."""
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.rank, self.alpha = rank, alpha
        self._model = (model.requires_grad_(False),)  # a tuple: not a submodule, not in the state dict
        generator = torch.Generator().manual_seed(seed)
        self.pairs = nn.ModuleDict()
        self.roots: dict[str, nn.Module] = {}
        for component, names in layers.items():
            root = self.component(component)
            self.roots[component] = root
            for name in names:
                self.pairs[_key(component, name)] = LowRankPair(lora.layer(root, name), rank, generator)
        self._handles = [h for component, updates in self.updates().items()
                         for h in lora.patch(self.roots[component], updates)]

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def component(self, name: str) -> nn.Module:
        model = self.model
        if name == "unet":
            return model.unet
        names = TEXT_COMPONENT_NAMES.get(model.cfg.family, ("text_encoder",))
        if name not in names:
            raise ValueError(f"no {name} in a {model.cfg.family} model")
        return model.text_encoders[names.index(name)]

    def updates(self) -> dict[str, dict[str, lora.LowRank]]:
        """component -> layer -> the update (its tensors are this module's parameters)."""
        out: dict[str, dict[str, lora.LowRank]] = {}
        for key, pair in self.pairs.items():
            component, layer = key.replace("/", ".").split(":", 1)
            out.setdefault(component, {})[layer] = lora.LowRank(self.alpha / self.rank, pair.down, pair.up)
        return out

    def remove(self) -> None:
        """Take the adapters out of the frozen model (it is as it was loaded)."""
        lora.remove(self._handles)
        self._handles = []

    def forward(self, *args, **kwargs) -> Tensor:
        return self.model(*args, **kwargs)


class TextualInversionTraining(nn.Module):
    """Trainable vectors of one new name, one (n, D_i) block per text encoder of a frozen model."""

    def __init__(self, model: nn.Module, name: str, vectors: int, init_word: str, tokenizers: Sequence[Tokenizer]):
        super().__init__()
        if vectors < 1:
            raise ValueError(f"an embedding needs at least one vector, got {vectors}")
        self.name = name
        self._model = (model.requires_grad_(False),)
        blocks = []
        for encoder, tokenizer in zip(model.text_encoders, tokenizers):
            ids = tokenizer.encode(init_word)
            if not ids:
                raise ValueError(f"the initial word {init_word!r} has no tokens")
            table = encoder.text_model.embeddings.token_embedding.weight.detach()
            start = table[ids].mean(dim=0)  # (D,) the word's mean token vector
            blocks.append(nn.Parameter(start.expand(vectors, -1).clone().float()))
        self.vectors = nn.ParameterList(blocks)
        self.ids = self.install()

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def install(self) -> list[tuple[int, ...]]:
        """Put the current vectors into the encoders' extra rows (computed from them: gradients reach them)."""
        ids = []
        for encoder, block in zip(self.model.text_encoders, self.vectors):
            embeddings = encoder.text_model.embeddings
            ids.append(embeddings.set_extra_tokens({self.name: block})[self.name])  # differentiable: a cat of it
        return ids

    def forward(self, *args, **kwargs) -> Tensor:
        self.install()
        return self.model(*args, **kwargs)
