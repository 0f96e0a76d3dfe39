"""The language model: embedding -> deep RNN -> dropout -> projection to the vocabulary.

    x(t) = E[token(t)]                 (a zero vector where token(t) == ZERO_INPUT: the lecture's x(1) = 0)
    a[l](t) = cell(a[l](t-1), a[l-1](t))   for l = 1..num_layers, a[0](t) = x(t)
    ŷ(t) = softmax(W_y a(t) + b_y)     (the model returns the logits W_y a(t) + b_y)

Batch-first: tokens (B, T) -> logits (B, T, V). The model only models; the loss lives in `train`
and `evaluate`, generation in `sampling`.
"""

from __future__ import annotations

from torch import Tensor, nn

from lmtrain.config import ModelConfig
from lmtrain.layers import RecurrentStack
from lmtrain.tokenizer import ZERO_INPUT


class LanguageModel(nn.Module):
    def __init__(self, vocab_size: int, *, cell: str = "lstm", embed_size: int = 64, hidden_size: int = 256,
                 num_layers: int = 1, dropout: float = 0.0, tie_weights: bool = False,
                 relevance_gate: bool = True) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = RecurrentStack(cell, embed_size, hidden_size, num_layers=num_layers, dropout=dropout,
                                  relevance_gate=relevance_gate)
        self.dropout = nn.Dropout(dropout)
        self.projection = nn.Linear(hidden_size, vocab_size)                # W_y, b_y
        # U(-0.1, 0.1) embedding and projection, zero output bias: Zaremba et al. 2014's initialisation, kept by
        # pytorch/examples word_language_model (nn.Embedding's N(0, 1) default is too large for SGD at lr 20).
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.projection.weight, -0.1, 0.1)
        nn.init.zeros_(self.projection.bias)
        if tie_weights:
            # One matrix as both input embedding and output projection (Press & Wolf 2017, Inan et al. 2017).
            self.projection.weight = self.embedding.weight

    @classmethod
    def from_config(cls, config: ModelConfig, vocab_size: int) -> LanguageModel:
        return cls(vocab_size, cell=config.cell, embed_size=config.embed_size, hidden_size=config.hidden_size,
                   num_layers=config.num_layers, dropout=config.dropout, tie_weights=config.tie_weights,
                   relevance_gate=config.relevance_gate)

    def initial_state(self, batch_size: int, **kwargs) -> list[tuple[Tensor, ...]]:
        return self.rnn.initial_state(batch_size, **kwargs)

    def forward(self, tokens: Tensor, state: list[tuple[Tensor, ...]] | None = None
                ) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
        x = self.embedding(tokens.clamp(min=0))                              # (B, T, E)
        x = x.masked_fill((tokens == ZERO_INPUT).unsqueeze(-1), 0.0)
        a, state = self.rnn(self.dropout(x), state)                         # (B, T, H)
        return self.projection(self.dropout(a)), state                      # (B, T, V)
