"""The built-in models, in plain torch: GPT-2's and BERT's shapes at tiny sizes, and a BatchNorm classifier.

Written here rather than taken from transformers because importing a transformers model costs every process
about 2 s of CPU before its first step, more than a tiny run trains. The math is the same as transformers'
eager GPT-2 and BERT (the weights' names are not): attention is an explicit softmax over masked scores, the
same kernels for every batch shape, so that every split of a batch gives the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

INIT_STD = 0.02  # GPT-2's and BERT's initializer_range


@dataclass
class Output:
    logits: torch.Tensor  # mutable: a fault injection multiplies it by NaN


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attn_dropout = nn.Dropout(dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """``visible``: bool, broadcastable to (batch, heads, query, key), True where a query may see a key."""
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(width // self.heads)
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        probs = self.attn_dropout(scores.softmax(dim=-1))
        mixed = (probs @ v).transpose(1, 2).reshape(batch, seq, width)
        return self.dropout(self.proj(mixed))


class Block(nn.Module):
    """A transformer block: GPT-2's (LayerNorm before each sublayer, tanh GELU) or BERT's (after, exact GELU)."""

    def __init__(self, width: int, heads: int, dropout: float, pre_norm: bool, eps: float) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.attn = SelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width),
            nn.GELU(approximate="tanh" if pre_norm else "none"),
            nn.Linear(4 * width, width),
            nn.Dropout(dropout),
        )
        self.norm_1 = nn.LayerNorm(width, eps=eps)
        self.norm_2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm_1(x), visible)
            return x + self.mlp(self.norm_2(x))
        x = self.norm_1(x + self.attn(x, visible))
        return self.norm_2(x + self.mlp(x))


def _init(model: nn.Module, layers: int, scale_projections: bool) -> None:
    """transformers' initialization: normal(0, 0.02) weights, zero biases, unit LayerNorms, a zero padding row;
    GPT-2 also scales each residual projection by 1/sqrt(2 x layers)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            residual = scale_projections and name.endswith(("proj", "mlp.2"))
            nn.init.normal_(module.weight, std=INIT_STD / math.sqrt(2 * layers) if residual else INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _visible(attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    keys = attention_mask[:, None, None, :].bool()
    if not causal:
        return keys
    seq = attention_mask.shape[1]
    return keys & torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).tril()


class TinyGPT2(nn.Module):
    """A causal LM of GPT-2's architecture: token and learned position embeddings, pre-norm blocks, a final
    LayerNorm and an LM head tied to the token embedding."""

    _no_split_modules = ["Block"]  # FSDP's units, as transformers names them

    def __init__(self, vocab_size: int, positions: int, width: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(positions, width)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout, pre_norm=True, eps=1e-5) for _ in range(layers))
        self.norm = nn.LayerNorm(width, eps=1e-5)
        self.head = nn.Linear(width, vocab_size, bias=False)
        _init(self, layers, scale_projections=True)
        self.head.weight = self.tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Output:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.dropout(self.tokens(input_ids) + self.positions(positions))
        visible = _visible(mask, causal=True)
        for block in self.blocks:
            x = block(x, visible)
        return Output(self.head(self.norm(x)))


class TinyBert(nn.Module):
    """A sequence classifier of BERT's architecture: token, position and segment embeddings, post-norm blocks,
    a tanh pooler over the first token and a linear head."""

    _no_split_modules = ["Block"]

    def __init__(
        self,
        vocab_size: int,
        pad_token_id: int,
        positions: int,
        width: int,
        layers: int,
        heads: int,
        labels: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width, padding_idx=pad_token_id)
        self.positions = nn.Embedding(positions, width)
        self.segments = nn.Embedding(2, width)
        self.embed_norm = nn.LayerNorm(width, eps=1e-12)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout, pre_norm=False, eps=1e-12) for _ in range(layers))
        self.pooler = nn.Linear(width, width)
        self.head = nn.Linear(width, labels)
        _init(self, layers, scale_projections=False)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> Output:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        segments = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = self.tokens(input_ids) + self.positions(positions) + self.segments(segments)
        x = self.dropout(self.embed_norm(x))
        visible = _visible(attention_mask, causal=False)
        for block in self.blocks:
            x = block(x, visible)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return Output(self.head(self.dropout(pooled)))


class MlpBatchNorm(nn.Module):
    """Bag-of-bytes classifier with BatchNorm: embedding, masked mean over the tokens, then ``num_layers``
    blocks of Linear -> BatchNorm1d -> ReLU, dropout, and a Linear to the classes.

    Small and free of attention on purpose: what it shows is BatchNorm's dependence on the micro-batch.
    The masked mean makes a sample's features independent of the padding its micro-batch needs.
    """

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        blocks = []
        for _ in range(num_layers):
            blocks += [nn.Linear(hidden_size, hidden_size), nn.BatchNorm1d(hidden_size), nn.ReLU()]
        self.body = nn.Sequential(*blocks, nn.Dropout(dropout))
        self.head = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Output:
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return Output(self.head(self.body(pooled)))
