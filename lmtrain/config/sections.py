"""The settings themselves: three dataclass sections (`data`, `model`, `train`), each field typed, its
default and docstring the one source that the checks, the error messages and docs/config.md read."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from lmtrain.errors import LmtrainError


class ConfigError(LmtrainError):
    """A config key is unknown, has the wrong type, or an impossible value."""


# What a number may be: `validate` checks these marks, docs/config.md names them.
POSITIVE = "positive"
NON_NEGATIVE = "not negative"
RATE = "in [0, 1)"

# A device by name, as train.device (which may also be `auto`) and the commands' --device take it.
DEVICE_NAME = r"cpu|cuda(:\d+)?"


@dataclass
class DataConfig:
    """`data`: the text and how it becomes tokens."""

    corpus: str | None = None
    """A corpus fetched by `lmtrain data download NAME` (`tinyshakespeare`, `ptb`)."""
    path: str | None = None
    """One corpus file, cut by `data.split`."""
    split: list[float] = field(default_factory=lambda: [0.9, 0.1])
    """Fractions for train, valid[, test]: contiguous parts, each cut moved to the end of its line."""
    train: str | None = None
    """Or separate files: the training text (with `data.valid`)."""
    valid: str | None = None
    """The validation text: it picks best.pt."""
    test: str | None = None
    """The test text (optional)."""
    level: Literal["char", "word"] = "char"
    """`char`: Unicode code points; `word`: whitespace-separated words."""
    mode: Literal["stream", "sentences"] = "stream"
    """`stream`: one token stream in `batch_size` rows, truncated BPTT of `bptt` steps with the state
    carried; `sentences`: each line its own sequence from a zero state, padded batches, padding left out
    of the loss, lines longer than `bptt` cut into pieces."""
    eos: Literal["line", "none"] = "line"
    """`line`: `<eos>` ends every line; `none`: line ends are ordinary characters (char level) or ignored
    (word level)."""
    min_freq: Annotated[int, POSITIVE] = 1
    """Tokens seen fewer times in training become `<unk>`."""
    max_vocab: int | None = None
    """Keep the most frequent tokens, `<unk>` and `<eos>` included (at least 3)."""
    encoding: str = "utf-8"
    """The text encoding; a byte-order mark is dropped, and LF, CRLF and a lone CR are all line ends."""
    encoding_errors: Literal["strict", "replace"] = "strict"
    """`strict`: undecodable bytes are an error naming file and byte offset; `replace`: U+FFFD."""
    cache: bool = True
    """Stream mode: tokenize the corpus once into the token cache and memory-map the ids in later runs;
    `false` reads the text whole every run."""


@dataclass
class ModelConfig:
    """`model`: the lecture's network (lmtrain/model/)."""

    cell: Literal["rnn", "gru", "lstm"] = "lstm"
    """The recurrent cell: the vanilla RNN, the GRU or the LSTM."""
    embed_size: Annotated[int, POSITIVE] = 64
    """E, the size of the token embedding x(t)."""
    hidden_size: Annotated[int, POSITIVE] = 256
    """H, the size of the state a(t)."""
    num_layers: Annotated[int, POSITIVE] = 2
    """Stacked layers: the lecture's deep RNN."""
    dropout: Annotated[float, RATE] = 0.0
    """The rate of each of the three dropouts below left `null` (Zaremba et al. 2014)."""
    input_dropout: Annotated[float | None, RATE] = None
    """Dropout on the embeddings x(t) going into the first layer."""
    layer_dropout: Annotated[float | None, RATE] = None
    """Dropout between layers, on a[l-1](t) going into layer l."""
    output_dropout: Annotated[float | None, RATE] = None
    """Dropout on the last layer's a(t) going into the softmax."""
    locked_dropout: bool = False
    """`true`: each of the three dropouts draws one mask per sequence and keeps it at every step
    (variational dropout, Gal & Ghahramani 2016); `false`: a new mask at every step."""
    embedding_dropout: Annotated[float, RATE] = 0.0
    """Drop whole words: each vocabulary entry is dropped for the batch with this probability (Gal &
    Ghahramani 2016, Merity et al. 2017)."""
    weight_drop: Annotated[float, RATE] = 0.0
    """DropConnect on the recurrent weights W_aa of every gate, one mask per batch (Merity et al. 2017)."""
    tie_weights: bool = False
    """Share the embedding and the output projection (needs `embed_size == hidden_size`; Press & Wolf 2017)."""
    init: Literal["auto", "zaremba", "torch"] = "auto"
    """Embedding and projection initialisation: `zaremba`, U(-0.1, 0.1) and a zero output bias (Zaremba
    et al. 2014, for SGD); `torch`, nn.Embedding's and nn.Linear's defaults; `auto`, `torch` with `adam`
    and `adamw`, `zaremba` with `sgd`. The cells always start from U(-1/√H, 1/√H)."""
    forget_bias: float | None | Literal["auto"] = "auto"
    """LSTM only: the forget gate's initial bias (1 keeps the memory at the start, Jozefowicz et al.
    2015); `null`: drawn like every other bias, as nn.LSTM does; `auto`: 1 with `init: zaremba`, `null`
    with `torch`."""
    relevance_gate: bool = True
    """GRU only: the full GRU with Γ_r (`true`) or the simplified one."""
    gru_reset: Literal["before", "after"] = "before"
    """GRU only: `before`, the lecture's Γ_r * c(t-1) inside the product (Cho et al. 2014); `after`,
    PyTorch's Γ_r * (W_cc c(t-1) + b_cc)."""
    gradients: Literal["manual", "autograd"] = "manual"
    """How the gradients are computed: `manual`, the hand-written backpropagation through time
    (lmtrain/backprop/); `autograd`, PyTorch's autograd through the same forward."""
    direction: Literal["forward", "bi"] = "forward"
    """`bi`: also train a right-to-left LM sharing embedding and softmax (ELMo); the loss is the mean of
    both."""


@dataclass
class TrainConfig:
    """`train`: the optimisation, its limits, and what a run writes."""

    batch_size: Annotated[int, POSITIVE] = 32
    """Rows (stream) or sentences (sentences mode) per step."""
    bptt: Annotated[int, POSITIVE] = 64
    """Stream: the truncated-BPTT length; sentences: the longest piece."""
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    """`adam`, `adamw` or `sgd` (with `train.momentum`)."""
    lr: Annotated[float, POSITIVE] = 2e-3
    """The learning rate (the schedule's peak)."""
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0
    """L2 penalty (`adam`, `sgd`) or decoupled decay (`adamw`)."""
    momentum: Annotated[float, NON_NEGATIVE] = 0.0
    """SGD only."""
    schedule: Literal["constant", "cosine", "step"] = "constant"
    """`constant`; `cosine` from `lr` to `train.min_lr` over the step, epoch or time budget; `step`: `lr`
    until `train.decay_start`, then times `train.decay_rate` there and every `train.decay_every` steps
    (Zaremba et al. 2014). All after `train.warmup_steps` of linear warmup."""
    warmup_steps: Annotated[int, NON_NEGATIVE] = 0
    """Steps of linear warmup from 0 to `lr`."""
    min_lr: Annotated[float, NON_NEGATIVE] = 0.0
    """The floor of the cosine and step schedules, at most `lr`."""
    decay_start: Annotated[int, NON_NEGATIVE] = 0
    """Step schedule: the first step at `lr * decay_rate`."""
    decay_every: Annotated[int, POSITIVE] = 1000
    """Step schedule: a further `decay_rate` every this many steps."""
    decay_rate: float = 0.5
    """Step schedule: the factor, in (0, 1]."""
    activation_regularization: Annotated[float, NON_NEGATIVE] = 0.0
    """AR's α: adds α mean((m * a(t))²) over the last layer's outputs after dropout (Merity et al. 2017)."""
    temporal_activation_regularization: Annotated[float, NON_NEGATIVE] = 0.0
    """TAR's β: adds β mean((a(t) - a(t+1))²) over the last layer's outputs (Merity et al. 2017)."""
    clip: Annotated[float, NON_NEGATIVE] = 5.0
    """Clip the global gradient norm to this; 0 turns it off."""
    max_steps: Annotated[int | None, POSITIVE] = None
    """Stop after this many steps (whichever of the three limits comes first; at least one is set)."""
    max_epochs: Annotated[int | None, POSITIVE] = None
    """Stop after this many passes over the training split."""
    max_seconds: Annotated[float | None, POSITIVE] = None
    """Stop after this many seconds of training steps (evaluation not counted)."""
    eval_every: Annotated[int, POSITIVE] = 500
    """Steps between validation runs."""
    eval_segment: Annotated[int, POSITIVE] = 2048
    """Stream mode: evaluation reads the split in segments this long."""
    log_every: Annotated[int, POSITIVE] = 50
    """Steps between `train` events in metrics.jsonl."""
    checkpoint_every: Annotated[int, POSITIVE] = 1000
    """Steps between writes of last.pt."""
    keep_last: Annotated[int, NON_NEGATIVE] = 2
    """Step-numbered checkpoints kept besides last.pt and best.pt (0: only last.pt)."""
    max_bad_steps: Annotated[int, POSITIVE] = 5
    """Non-finite steps in a row (each skipped) before training stops."""
    final_samples: Annotated[int, NON_NEGATIVE] = 5
    """Sentences sampled when training ends."""
    sample_every: Annotated[int | None, POSITIVE] = None
    """Also print a few samples every this many steps (their own RNG: the training is unchanged)."""
    tensorboard: bool = False
    """Also log to <out_dir>/tensorboard (needs the tensorboard package)."""
    seed: Annotated[int, NON_NEGATIVE] = 1234
    """Initialisation, dropout and data order."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`. A GPU runs the Python loops, not the compiled
    kernels: for small batches a CPU is as fast (docs/benchmarks-gpu.md)."""
    threads: int | Literal["auto"] = "auto"
    """CPU threads: `auto`, the cores this process may use less those other processes keep busy,
    following the load while training (docs/running.md); or a number."""
    precision: Literal["float32", "bfloat16"] = "float32"
    """`bfloat16`: mixed precision, the training step's matrix products take bfloat16 factors summed in
    float32; weights, states, the loss, the optimizer and evaluation stay float32."""
    out_dir: str = "runs/default"
    """Where the run's files go."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


MAX_THREADS = 1024  # more is no machine's core count, and each thread is an OS thread with a stack

SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
# Keys renamed since: a config or checkpoint that still has the old one is read as the new.
RENAMED = {"model.backward": "model.gradients"}


@functools.cache
def section_types(cls: type) -> dict[str, Any]:
    """A section's field types, read once (every key of every config looks its type up)."""
    return typing.get_type_hints(cls, include_extras=True)


def type_options(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of a field's type: `int | None` -> (int, NoneType); Annotated marks dropped."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(option for part in typing.get_args(annotation) for option in type_options(part))
    return (annotation,)


def choices(key: str) -> tuple[str, ...]:
    """The words a key accepts, from its `Literal[...]` type: `choices("model.cell")` -> ("rnn", "gru", "lstm")."""
    section, _, name = key.partition(".")
    return tuple(word for option in type_options(section_types(SECTIONS[section])[name])
                 if typing.get_origin(option) is typing.Literal for word in typing.get_args(option))


def _marked(mark: str) -> tuple[str, ...]:
    return tuple(f"{section}.{name}" for section, cls in SECTIONS.items()
                 for name, annotation in section_types(cls).items()
                 if typing.get_origin(annotation) is typing.Annotated and mark in typing.get_args(annotation)[1:])


def all_keys() -> list[str]:
    """Every dotted key a config accepts, e.g. `model.hidden_size`."""
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def field_type(key: str) -> Any:
    section, _, name = key.partition(".")
    return section_types(SECTIONS[section])[name]


# The keys that are a choice of words and nothing else, e.g. model.cell; model.forget_bias (a number or
# auto) is not one: it is checked by its type.
CHOICES: dict[str, tuple[str, ...]] = {
    key: choices(key) for key in all_keys()
    if all(typing.get_origin(option) is typing.Literal for option in type_options(field_type(key)))}
POSITIVE_KEYS, NON_NEGATIVE_KEYS, RATE_KEYS = _marked(POSITIVE), _marked(NON_NEGATIVE), _marked(RATE)
DATA_PATHS = ("data.path", "data.train", "data.valid", "data.test")
PATHS = (*DATA_PATHS, "train.out_dir")


def default(field_: dataclasses.Field) -> Any:
    """A field's default value, whether given as a value or as a factory (a list's)."""
    return field_.default_factory() if field_.default is dataclasses.MISSING else field_.default



def get_value(config: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)
