"""The language model: embedding -> deep RNN -> dropout -> projection to the vocabulary.

    x(t) = E[token(t)]                 (a zero vector where token(t) == ZERO_INPUT: the lecture's x(1) = 0)
    a[l](t) = cell(a[l](t-1), a[l-1](t))   for l = 1..num_layers, a[0](t) = x(t)
    ŷ(t) = softmax(W_y a(t) + b_y)     (the model returns the logits W_y a(t) + b_y)

In training, dropout acts on x(t) (`input_dropout`), between layers (`layer_dropout`) and on a(t) before
W_y (`output_dropout`), with one mask per sequence if `locked_dropout`; `embedding_dropout` drops whole
words and `weight_drop` the recurrent weights (`lmtrain.model.regularization` has the papers).

Batch-first: tokens (B, T) -> logits (B, T, V); given the targets, the model returns the summed
NLL instead, Σ_t −log ŷ(t)[y(t)], made with the output layer in one step (`lmtrain.speed.loss`) so that the
(B, T, V) logits never leave it. What to do with the loss lives in `lmtrain.training` and
`lmtrain.evaluation`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from lmtrain.config import ConfigError, ModelConfig, initialisation, model_from_arguments
from lmtrain.data.tokenizer import ZERO_INPUT
from lmtrain.model import arguments, regularization
from lmtrain.model.cells import CELLS, Cell, GRUCell
from lmtrain.model.layers import RecurrentStack
from lmtrain.model.regularization import SequenceDropout
from lmtrain.speed import gemm, loss
from lmtrain.speed.route import choose
from lmtrain.speed.token_step import LayerWeights, TokenStep

DEFAULTS = ModelConfig()  # the constructor's defaults are the config's
MODEL_KEYS = tuple(field.name for field in dataclasses.fields(ModelConfig))


def gate_count(config: ModelConfig) -> int:
    """How many gate blocks of H rows the cell's stacked weights hold: the RNN 1, the GRU 3 (2 without
    the relevance gate), the LSTM 4."""
    return {"rnn": 1, "gru": 3 if config.relevance_gate else 2, "lstm": 4}[config.cell]


def parameter_estimate(config: ModelConfig, vocab_size: int) -> dict[str, int]:
    """The parameters `LanguageModel.from_config(config, vocab_size)` would have, by part, counted from
    the sizes alone (nothing allocated): "embedding" V x E, "recurrent" every gate's W (H, H + input)
    and b (H,) in every layer (twice for `direction: bi`), "output" W_y (V, H) and b_y (V,)."""
    gates = gate_count(config)
    E, H, L, V = config.embed_size, config.hidden_size, config.num_layers, vocab_size
    stack = gates * H * (H + E + 1) + (L - 1) * gates * H * (2 * H + 1)
    return {"embedding": V * E, "recurrent": stack * (2 if config.direction == "bi" else 1),
            "output": V if config.tie_weights else V * H + V}


def check_size(config: ModelConfig, vocab_size: int, *, bytes_per_parameter: int, available: int | None) -> None:
    """Refuse, naming the keys, a model whose parameters (weights and, in training, their gradients and
    the optimizer's state: `bytes_per_parameter`) would not fit in `available` bytes of memory."""
    parts = parameter_estimate(config, vocab_size)
    total = sum(parts.values())
    if available is None or total * bytes_per_parameter <= available:
        return
    largest = max(parts, key=parts.get)
    keys = {"embedding": f"model.embed_size={config.embed_size} over {vocab_size:,} tokens",
            "recurrent": f"model.hidden_size={config.hidden_size}, model.num_layers={config.num_layers}"
                         + (f", model.embed_size={config.embed_size}"
                            if config.embed_size > config.hidden_size else ""),
            "output": f"model.hidden_size={config.hidden_size} over {vocab_size:,} tokens"}[largest]
    raise ConfigError(f"the model would have {total:.3g} parameters, most of them in its {largest} ({keys}): "
                      f"{_bytes(total * bytes_per_parameter)}, more than the {_bytes(available)} of memory this "
                      f"process may still take; make it smaller")


def _bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if count < 1000:
            return f"{count:.3g} {unit}"
        count /= 1000
    return f"{count:.3g} EB"


def check_tokens(tokens: Tensor, vocab_size: int) -> None:
    """Refuse, naming them, ids that are no token: an id past the vocabulary would fail inside torch's
    embedding, one below ZERO_INPUT would be read as <unk>. The range is read on the CPU only: on a GPU
    reading it would wait for the device at every call (there torch's embedding asserts)."""
    if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.int64, torch.int32):  # what nn.Embedding reads
        raise ValueError(f"tokens must be a tensor of int64 or int32 ids; got "
                         f"{tokens.dtype if isinstance(tokens, Tensor) else type(tokens).__name__}")
    if tokens.numel() and tokens.device.type == "cpu":
        low, high = (int(value) for value in torch.aminmax(tokens))
        if low < ZERO_INPUT or high >= vocab_size:
            raise ValueError(f"token ids must be in 0..{vocab_size - 1} (or {ZERO_INPUT}, the zero input); got "
                             f"{low if low < ZERO_INPUT else high}")


class Projection(nn.Linear):
    """The output layer, `W_y a + b_y`: nn.Linear's parameters and maths, its forward by `gemm.projection`
    (oneDNN's GEMM on the CPU, the faster one for PTB's 10k-word output)."""

    def forward(self, x: Tensor) -> Tensor:
        return gemm.projection(x, self.weight, self.bias)

    def summed_nll(self, x: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
        """Σ −log softmax(W_y x + b_y)[target] over the targets that are not `ignore_index`
        (`loss.projected_nll`)."""
        return loss.projected_nll(x, self.weight, self.bias, targets, ignore_index)


class LanguageModel(nn.Module):
    def __init__(self, vocab_size: int, *, cell: str = DEFAULTS.cell, embed_size: int = DEFAULTS.embed_size,
                 hidden_size: int = DEFAULTS.hidden_size, num_layers: int = DEFAULTS.num_layers,
                 dropout: float = DEFAULTS.dropout, tie_weights: bool = DEFAULTS.tie_weights,
                 relevance_gate: bool = DEFAULTS.relevance_gate, gru_reset: str = DEFAULTS.gru_reset,
                 gradients: str = DEFAULTS.gradients, direction: str = DEFAULTS.direction,
                 input_dropout: float | None = DEFAULTS.input_dropout,
                 layer_dropout: float | None = DEFAULTS.layer_dropout,
                 output_dropout: float | None = DEFAULTS.output_dropout, locked_dropout: bool = DEFAULTS.locked_dropout,
                 embedding_dropout: float = DEFAULTS.embedding_dropout, weight_drop: float = DEFAULTS.weight_drop,
                 init: str = DEFAULTS.init, forget_bias: float | None | str = DEFAULTS.forget_bias) -> None:
        """Every default is `model.*`'s in a config (`ModelConfig`). `dropout` is the rate of the three
        dropouts left as None. `init`: "zaremba", U(-0.1, 0.1) embedding and projection with a zero
        output bias (Zaremba et al. 2014, pytorch/examples), "torch", nn.Embedding's N(0, 1) and
        nn.Linear's defaults, or "auto", torch's (what a config with the default optimizer, Adam, takes).
        `forget_bias`: the LSTM's initial b_f (None: like the other biases; "auto": follows `init`)."""
        vocab_size = arguments.size("vocab_size", vocab_size)
        # The checks a config's model section gets, naming the arguments; NumPy numbers become Python's.
        options = model_from_arguments({name: value for name, value in locals().items() if name in MODEL_KEYS})
        init, forget_bias = initialisation(options.init, options.forget_bias)
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, options.embed_size)
        self.embedding_dropout = options.embedding_dropout
        rate = lambda p: options.dropout if p is None else p  # noqa: E731
        cell_options = {"relevance_gate": options.relevance_gate, "gru_reset": options.gru_reset,
                        "forget_bias": forget_bias}
        new_stack = lambda: RecurrentStack(  # noqa: E731
            options.cell, options.embed_size, options.hidden_size, num_layers=options.num_layers,
            dropout=rate(options.layer_dropout), locked_dropout=options.locked_dropout,
            weight_drop=options.weight_drop, gradients=options.gradients, **cell_options)
        self.rnn = new_stack()
        # ELMo's bidirectional LM (Peters et al. 2018): a second stack reads the text right to left;
        # embedding and softmax are shared. A bidirectional RNN could not predict the next token.
        self.rnn_right_to_left = new_stack() if options.direction == "bi" else None
        self.input_dropout = SequenceDropout(rate(options.input_dropout), locked=options.locked_dropout)
        self.output_dropout = SequenceDropout(rate(options.output_dropout), locked=options.locked_dropout)
        self.projection = Projection(options.hidden_size, vocab_size)  # W_y, b_y
        if init == "zaremba":
            # U(-0.1, 0.1) embedding and projection, zero output bias: Zaremba et al. 2014's initialisation, kept
            # by pytorch/examples word_language_model (nn.Embedding's N(0, 1) is too large for SGD at lr 20).
            # With Adam at character level it learned slower than torch's defaults (docs/results.md).
            nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
            nn.init.uniform_(self.projection.weight, -0.1, 0.1)
            nn.init.zeros_(self.projection.bias)
        if options.tie_weights:
            # One matrix as both input embedding and output projection (Press & Wolf 2017, Inan et al. 2017).
            self.projection.weight = self.embedding.weight

    @classmethod
    def from_config(cls, config: ModelConfig, vocab_size: int) -> LanguageModel:
        """The model a `model:` section describes: its keys are this constructor's arguments."""
        return cls(vocab_size, **dataclasses.asdict(config))

    @property
    def directions(self) -> tuple[bool, ...]:
        """The language models inside, by `right_to_left`: (False,), or (False, True) for `direction: bi`."""
        return (False, True) if self.rnn_right_to_left is not None else (False,)

    def initial_state(self, batch_size: int, **kwargs) -> list[tuple[Tensor, ...]]:
        return self.rnn.initial_state(batch_size, **kwargs)

    def embed(self, tokens: Tensor) -> Tensor:
        """x(t) for every token: its embedding, and the zero vector for `ZERO_INPUT` (the lecture's x(1) = 0)."""
        check_tokens(tokens, self.embedding.num_embeddings)
        return self.embedding(tokens.clamp(min=0)).masked_fill((tokens == ZERO_INPUT).unsqueeze(-1), 0.0)

    def forward(self, tokens: Tensor, state: list[tuple[Tensor, ...]] | None = None, *,
                targets: Tensor | None = None, ignore_index: int = -100, right_to_left: bool = False,
                hidden: bool = False) -> tuple:
        """Logits for the next token at every position, and the new state. Given `targets` (B, T), the
        summed NLL of those that are not `ignore_index` (a scalar) takes the logits' place: the training
        loss, without the (B, T, V) logits. `right_to_left=True` runs the right-to-left LM of a `direction: bi`
        model, which expects `tokens` in reversed order (see `data.reverse_text`). `hidden=True` also
        returns the last layer's outputs before and after output dropout, `(a, m * a)`, both (B, T, H),
        for AR/TAR."""
        if targets is not None and targets.shape != tokens.shape:
            raise ValueError(f"targets must have the tokens' shape {tuple(tokens.shape)}, a target per token; got "
                             f"{tuple(targets.shape)}")
        x = self.embed(tokens)                                               # (B, T, E)
        if self.training:
            x = regularization.embedding_dropout(x, tokens, self.embedding.num_embeddings, self.embedding_dropout)
        rnn = self.rnn_right_to_left if right_to_left else self.rnn
        if rnn is None:
            raise ValueError("right_to_left=True needs a model built with direction='bi'")
        a, state = rnn(self.input_dropout(x), state)                        # (B, T, H)
        a_dropped = self.output_dropout(a)
        if targets is None:
            output = self.projection(a_dropped)                             # (B, T, V) logits
        else:
            output = self.projection.summed_nll(a_dropped, targets, ignore_index)
        return (output, state, (a, a_dropped)) if hidden else (output, state)

    def token_step(self) -> TokenStep | None:
        """The left-to-right model's step for one token a row (sampling, `lmtrain.evaluation.sampling`),
        with a copy of its weights packed now (a later change to them needs a new step): `(tokens (B,),
        state) -> (logits (B, V), state)`, the numbers of `self(tokens[:, None], state)`'s last position
        up to float32 rounding (tests/test_token_step.py). None where the compiled kernels do not run (`route.choose`:
        CUDA, float64, no compiler, LMTRAIN_COMPILED=0), or for a subclass with a forward of its own; then
        the model's forward takes each token."""
        route = choose(self.embedding.weight)
        if route.loops is None or route.mixed or type(self).forward is not LanguageModel.forward:
            return None
        with torch.no_grad():
            return TokenStep(route.loops, [_layer_weights(layer.cell) for layer in self.rnn.layers],
                             self.embedding.weight.detach(), self.projection.weight.detach(),
                             self.projection.bias.detach())


def _layer_weights(cell: Cell) -> LayerWeights:
    """A cell's W_a = [W_aa, W_ax] of every gate in its gate order, and its biases."""
    W_a = tuple(getattr(cell, f"W_{gate}").detach() for gate in cell.gates)
    b = torch.cat([getattr(cell, f"b_{gate}") for gate in cell.gates]).detach()
    name = next(name for name, kind in CELLS.items() if isinstance(cell, kind))
    b_cc = cell.b_cc.detach() if isinstance(cell, GRUCell) and cell.gru_reset == "after" else None
    return LayerWeights(name, W_a, b, b_cc)
