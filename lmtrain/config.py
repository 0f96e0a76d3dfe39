"""Typed configuration: three dataclass sections (`data`, `model`, `train`) read from YAML plus
dotted `key=value` overrides that win over the file.

A leaf module: it imports neither torch nor anything else of lmtrain but `errors`, so a config can
be checked before anything heavy loads. Every mistake raises `ConfigError` naming the key.

Paths: a relative `data.*` path written in a YAML file is relative to that file's folder (so a
config works from any directory); a relative path given on the command line, and `train.out_dir`,
are relative to the current directory; `~` is the home folder, as in a shell. The resolved config
holds absolute data paths.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import functools
import math
import numbers
import re
import reprlib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

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
def _annotations(cls: type) -> dict[str, Any]:
    """A section's field types, read once (every key of every config looks its type up)."""
    return typing.get_type_hints(cls, include_extras=True)


def _options(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of a field's type: `int | None` -> (int, NoneType); Annotated marks dropped."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(option for part in typing.get_args(annotation) for option in _options(part))
    return (annotation,)


def choices(key: str) -> tuple[str, ...]:
    """The words a key accepts, from its `Literal[...]` type: `choices("model.cell")` -> ("rnn", "gru", "lstm")."""
    section, _, name = key.partition(".")
    return tuple(word for option in _options(_annotations(SECTIONS[section])[name])
                 if typing.get_origin(option) is typing.Literal for word in typing.get_args(option))


def _marked(mark: str) -> tuple[str, ...]:
    return tuple(f"{section}.{name}" for section, cls in SECTIONS.items()
                 for name, annotation in _annotations(cls).items()
                 if typing.get_origin(annotation) is typing.Annotated and mark in typing.get_args(annotation)[1:])


def all_keys() -> list[str]:
    """Every dotted key a config accepts, e.g. `model.hidden_size`."""
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _annotation(key: str) -> Any:
    section, _, name = key.partition(".")
    return _annotations(SECTIONS[section])[name]


# The keys that are a choice of words and nothing else, e.g. model.cell; model.forget_bias (a number or
# auto) is not one: it is checked by its type.
CHOICES: dict[str, tuple[str, ...]] = {
    key: choices(key) for key in all_keys()
    if all(typing.get_origin(option) is typing.Literal for option in _options(_annotation(key)))}
POSITIVE_KEYS, NON_NEGATIVE_KEYS, RATE_KEYS = _marked(POSITIVE), _marked(NON_NEGATIVE), _marked(RATE)
DATA_PATHS = ("data.path", "data.train", "data.valid", "data.test")
PATHS = (*DATA_PATHS, "train.out_dir")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read `path` (YAML), apply `KEY=VALUE` overrides, check types and values; return the config."""
    if isinstance(overrides, str):  # its characters would be read as overrides, one each
        raise TypeError(f"overrides must be a list of KEY=VALUE strings; got the string {overrides!r}")
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        values = _read_yaml(path)
        # Relative to the YAML file's folder; a config read from a pipe (`<(cmd)`) has none: the current one.
        base = path.parent if path.is_file() else Path.cwd()
        for key in DATA_PATHS:
            if isinstance(values.get(key), str):
                values[key] = _absolute(key, values[key], base)
    overridden = set()
    for item in overrides:
        key, value = parse_override(item)
        overridden.add(key)
        if key in PATHS and isinstance(value, (int, float, bool)):
            value = item.partition("=")[2].strip()  # `data.path=2024` is the file "2024", not a number
        values[key] = _absolute(key, value, Path.cwd()) if key in DATA_PATHS and isinstance(value, str) else value
    for old in set(values) & set(RENAMED) - {old for old, new in RENAMED.items() if new in values}:  # both: an error
        warnings.warn(f"{old} is now called {RENAMED[old]}: read as {RENAMED[old]}", stacklevel=2)
    if isinstance(values.get("train.out_dir"), str) and values["train.out_dir"].startswith("~"):
        values["train.out_dir"] = str(_home("train.out_dir", values["train.out_dir"]))  # not a "~" folder
    # What the command line names wins over the file's other way of naming the text: files over its
    # corpus, a corpus over its files, and its data.train/valid/test for a data.path (or its data.path for
    # a data.train) given here.
    if overridden & set(DATA_PATHS) and "data.corpus" not in overridden:
        values.pop("data.corpus", None)
    if "data.corpus" in overridden and not overridden & set(DATA_PATHS):
        for key in DATA_PATHS:
            values.pop(key, None)
    if "data.path" in overridden:
        for key in set(DATA_PATHS) - overridden:
            values.pop(key, None)
    elif "data.train" in overridden:
        values.pop("data.path", None)
    config = build_config(values)
    for line in unused_settings(values, config):  # a Python warning: the CLI prints it as one `warning:` line
        warnings.warn(line, stacklevel=2)
    return config


def unused_settings(values: dict[str, Any], config: Config) -> list[str]:
    """What the given `values` set that the rest of `config` leaves unused: each, a sentence saying so.
    (The cell-only keys, `forget_bias` and the GRU's, are left out: one config serves every cell.)"""
    train = config.train

    def given(key: str) -> bool:
        section, _, name = key.partition(".")
        return key in values and values[key] != default(SECTIONS[section].__dataclass_fields__[name])

    notes = []
    if given("data.split") and config.data.train is not None:
        notes.append("data.split is unused: the config names its splits' files (data.train, data.valid)")
    if given("train.momentum") and train.optimizer != "sgd":
        notes.append(f"train.momentum is for optimizer: sgd; {train.optimizer} leaves it unused")
    unused = {"constant": ("min_lr", "decay_start", "decay_every", "decay_rate"),
              "cosine": ("decay_start", "decay_every", "decay_rate"), "step": ()}[train.schedule]
    notes += [f"train.{name} is unused with schedule: {train.schedule}" for name in unused if given(f"train.{name}")]
    if train.max_steps is not None and train.warmup_steps > train.max_steps:
        notes.append(f"train.warmup_steps {train.warmup_steps} is more than train.max_steps {train.max_steps}: the "
                     f"learning rate never reaches train.lr")
    return notes


def default(field_: dataclasses.Field) -> Any:
    """A field's default value, whether given as a value or as a factory (a list's)."""
    return field_.default_factory() if field_.default is dataclasses.MISSING else field_.default


def _absolute(key: str, path: str, base: Path) -> str:
    if "\0" in path:
        raise ConfigError(f"{key} holds a NUL character: {shown(path)}")
    absolute = base / _home(key, path)
    try:
        if absolute.exists() and not (absolute.is_file() or absolute.is_dir()):
            return str(absolute.absolute())  # a pipe (/dev/fd/63) resolves to no path at all: keep its name
        return str(absolute.resolve())
    except (OSError, RuntimeError):  # a loop of symbolic links: left to the reader of the file to name
        return str(absolute.absolute())


def _home(key: str, path: str) -> Path:
    """`path` with a leading `~` or `~user` read as a shell reads it: that user's home folder."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # no such user, or no home folder to be found
        raise ConfigError(f"{key} {shown(path)}: there is no home folder for {path.split('/')[0]}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """`model.hidden_size=256` -> ("model.hidden_size", 256); the value is read as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {shown(item)} is not KEY=VALUE (e.g. model.hidden_size=256)")
    try:
        return key.strip(), read_yaml_text(text, f"override {key.strip()}") if text.strip() else None
    except yaml.YAMLError:
        return key.strip(), text


# A config is a few dozen values: a YAML file whose aliases expand to more than this is refused before
# anything walks it (nine aliases of nine make 9^9 values from 471 bytes).
MAX_VALUES = 100_000


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, but a key given twice in one mapping is an error, not a silent overwrite."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:  # `? [a, b]`: no config key
                raise ConfigError(f"line {key_node.start_mark.line + 1}: a key must be a name, not "
                                  f"{shown(key)}")
            if key in lines:
                raise ConfigError(f"key {shown(key)} appears twice, on lines {lines[key]} and "
                                  f"{key_node.start_mark.line + 1}: one would silently replace the other")
            lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml_text(text: str, source: str) -> Any:
    """The YAML document in `text`, read safely (no Python objects), with duplicate keys, deep nesting and
    alias expansion past MAX_VALUES refused by a ConfigError naming `source`; yaml.YAMLError for bad YAML."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if (size := _expanded_size(node)) > MAX_VALUES:
            raise ConfigError(f"{source}: its aliases expand to {size:,} values, more than the {MAX_VALUES:,} a "
                              f"config may hold")
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    except ConfigError as error:
        if str(error).startswith(source):
            raise
        raise ConfigError(f"{source}: {error}") from None
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node) -> int:
    """How many values the document holds once every alias is written out (each node counted as often as
    it is referred to); computed once per node, so a bomb costs nothing to measure."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = ([child for pair in node.value for child in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if children_done or not children:
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
        else:
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


def shown(value: Any) -> str:
    """`value` as an error message shows it: in YAML's words where YAML made it from something that read
    as a word or a string (yes, on, 2024-01-01), otherwise its repr, cut short (a value may be enormous)."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (YAML reads yes, no, on and off as true and false: quote a word to keep it)"
    if isinstance(value, (datetime.date, datetime.time)):
        return f"the date {value.isoformat()} (quote it to keep it a string)"
    return _SHORT.repr(value)


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 80, 80, 6, 6, 3


def build_config(values: dict[str, Any]) -> Config:
    """Build a Config from a flat {dotted key: value} dict; unknown keys and bad values raise."""
    values = renamed_keys(values)
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        section, _, name = key.partition(".")
        if key not in all_keys():
            raise ConfigError(f"unknown config key {shown(key)}{_suggestion(key)}")
        sections[section][name] = _coerce(key, value, _annotation(key))
    config = Config(**{name: SECTIONS[name](**kwargs) for name, kwargs in sections.items()})
    validate(config)
    config.model.init, config.model.forget_bias = initialisation(config.model.init, config.model.forget_bias,
                                                                 optimizer=config.train.optimizer)
    return config


def renamed_keys(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with each old key of RENAMED under its new name (a checkpoint written before the rename
    loads as it was)."""
    values = dict(values)
    for old, new in RENAMED.items():
        if old in values:
            if new in values:
                raise ConfigError(f"{old} and {new} are one setting ({old} is its old name): give only {new}")
            values[new] = values.pop(old)
    return values


def initialisation(init: str, forget_bias: float | None | str, *, optimizer: str = TrainConfig.optimizer
                   ) -> tuple[str, float | None]:
    """`model.init` and `model.forget_bias` as the model is built. `auto` takes torch.nn's initialisation
    with Adam and AdamW and Zaremba et al.'s with SGD (its U(-0.1, 0.1) embedding was made for SGD at lr
    20; with Adam it learned several times slower per step, docs/results.md), and a forget bias of 1 with
    Zaremba's, none (drawn like every other bias, as nn.LSTM does) with torch's."""
    if init == "auto":
        init = "zaremba" if optimizer == "sgd" else "torch"
    if forget_bias == "auto":
        forget_bias = 1.0 if init == "zaremba" else None
    return init, forget_bias


def validate(config: Config) -> None:
    """Values that are of the right type but impossible, named by key."""
    _check_values({key: get_value(config, key) for key in all_keys()})
    data, model, train = config.data, config.model, config.train
    if not 0.0 < train.decay_rate <= 1.0:
        raise ConfigError(f"train.decay_rate must be in (0, 1]; got {train.decay_rate}")
    _check_model_combinations(model)
    if train.precision != "float32" and config.model.gradients != "manual":
        raise ConfigError(f"train.precision: {train.precision} needs model.gradients: manual (the autograd layers "
                          "make their products in float32)")
    if data.max_vocab is not None and data.max_vocab < 3:
        raise ConfigError(f"data.max_vocab must be at least 3 (<unk>, <eos> and one word); got {data.max_vocab}")
    if data.corpus is not None and any(path is not None for path in (data.path, data.train, data.valid, data.test)):
        raise ConfigError("set either data.corpus or data.path / data.train, not both")
    if data.corpus is None and data.path is None and data.train is None:
        raise ConfigError("no corpus: set data.corpus, data.path (cut by data.split) or data.train and data.valid")
    if data.path is not None and any(path is not None for path in (data.train, data.valid, data.test)):
        raise ConfigError("set either data.path or data.train/valid/test, not both")
    if data.path is not None or data.corpus is not None:
        split = data.split
        if len(split) not in (2, 3) or any(not f > 0 for f in split) or not math.isclose(sum(split), 1.0):
            raise ConfigError(f"data.split must be 2 or 3 positive fractions summing to 1; got {split}")
    elif data.train is not None and data.valid is None:
        raise ConfigError("data.valid is required with data.train (validation drives best.pt)")
    if data.mode == "sentences" and data.eos == "none":
        raise ConfigError("data.mode: sentences needs data.eos: line (each line is one sentence ending in <eos>)")
    if train.max_steps is None and train.max_epochs is None and train.max_seconds is None:
        raise ConfigError("set at least one of train.max_steps, train.max_epochs, train.max_seconds")
    if train.schedule != "constant" and train.min_lr > train.lr:  # the floor above the peak: a rising rate
        raise ConfigError(f"train.min_lr ({train.min_lr:g}) is above train.lr ({train.lr:g}), the peak of the "
                          f"{train.schedule} schedule; set it at or below train.lr")

    if "\0" in train.out_dir:
        raise ConfigError(f"train.out_dir holds a NUL character: {train.out_dir!r}")
    if train.threads != "auto" and not (isinstance(train.threads, int) and 1 <= train.threads <= MAX_THREADS):
        raise ConfigError(f"train.threads must be auto or a number of threads from 1 to {MAX_THREADS}; got "
                          f"{shown(train.threads)}")
    if not re.fullmatch(rf"auto|{DEVICE_NAME}", train.device):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N; got {shown(train.device)}")


def model_from_arguments(arguments: dict[str, Any]) -> ModelConfig:
    """A `model` section from Python values, each checked as a config's key is (its type, NumPy numbers
    taken as Python's, and its bounds): `LanguageModel`'s constructor checks its arguments with it. A
    `ValueError` names the argument as the call spelled it (`hidden_size`, not `model.hidden_size`)."""
    try:
        model = ModelConfig(**{name: _coerce(f"model.{name}", value, _annotation(f"model.{name}"))
                               for name, value in arguments.items()})
        _check_values({f"model.{name}": getattr(model, name) for name in arguments})
        _check_model_combinations(model)
    except ConfigError as error:
        raise ValueError(str(error).replace("model.", "")) from None
    return model


def _check_values(values: dict[str, Any]) -> None:
    """Each key's own bounds: finite, one of its words, positive, not negative, a rate."""
    for key, value in values.items():  # .inf and .nan are numbers to YAML, and no setting here can be one
        if any(isinstance(number, float) and not math.isfinite(number)
               for number in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"{key} must be a finite number; got {shown(value)}")
    for key, value in values.items():
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{key} must be one of {', '.join(CHOICES[key])}; got {shown(value)}")
        if key in POSITIVE_KEYS and value is not None and not value > 0:  # written so that NaN fails too
            raise ConfigError(f"{key} must be positive; got {value}")
        if key in NON_NEGATIVE_KEYS and not value >= 0:
            raise ConfigError(f"{key} must not be negative; got {value}")
        if key in RATE_KEYS and value is not None and not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1); got {value}")


def _check_model_combinations(model: ModelConfig) -> None:
    if model.tie_weights and model.embed_size != model.hidden_size:
        raise ConfigError(f"model.tie_weights needs model.embed_size == model.hidden_size; "
                          f"got {model.embed_size} and {model.hidden_size}")
    if model.gru_reset == "after" and not model.relevance_gate:
        raise ConfigError("model.gru_reset: after needs model.relevance_gate: true (it places the relevance gate)")


def get_value(config: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (YAML- and checkpoint-safe)."""
    return dataclasses.asdict(config)


def checked(config: Config) -> Config:
    """`config` checked again as `build_config` checks a new one: a Config changed in Python after it was
    loaded (`config.train.eval_every = 0`, a NumPy number) is refused, or made plain, by key."""
    if not isinstance(config, Config):
        raise TypeError(f"config must be an lmtrain.config.Config (from load_config or build_config); got "
                        f"{type(config).__name__}")
    return from_dict(to_dict(config))


def from_dict(nested: dict[str, dict[str, Any]]) -> Config:
    """Inverse of `to_dict`, validated (used for the config stored in a checkpoint)."""
    return build_config({f"{s}.{k}": v for s, section in nested.items() for k, v in section.items()})


def to_yaml_value(value: Any) -> str:
    """One value as YAML writes it inline: `[0.9, 0.1]`, `true`, `0.002`."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


def differences(a: Config, b: Config, *, ignore: tuple[str, ...] = ()) -> list[str]:
    """The dotted keys whose values differ between two configs."""
    return [key for key in all_keys() if key not in ignore and get_value(a, key) != get_value(b, key)]


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"config path is a directory, not a YAML file: {path}")
    if not (path.is_file() or path.is_fifo()):  # a device (/dev/zero) would be read forever
        raise ConfigError(f"config path {path} is a device or a socket, not a YAML file")
    try:
        tree = read_yaml_text(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte offset {error.start})") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).strip().splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{line}: {problem}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with sections data, model, train")
    values: dict[str, Any] = {}
    for section, entries in tree.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown config section {shown(section)}"
                              f"{_suggestion(str(section)[:200], list(SECTIONS))}")
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping of keys to values")
        values.update({f"{section}.{name}": value for name, value in entries.items()})
    return values


INT64 = (-(1 << 63), (1 << 63) - 1)


def _coerce(key: str, value: Any, expected: Any) -> Any:
    """Check `value` against the field's type; widen int -> float and read '3e-3' as a float (YAML 1.1
    reads `3e-3` as a string)."""
    options = _options(expected)
    if value is None and type(None) in options:
        return None
    for option in options:
        if typing.get_origin(option) is typing.Literal:
            if isinstance(value, str) and value in typing.get_args(option):
                return value
            continue
        if typing.get_origin(option) is list:
            (item_type,) = typing.get_args(option)
            if isinstance(value, list):
                return [_coerce(key, item, item_type) for item in value]
            continue
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)  # a NumPy integer too
            if not INT64[0] <= value <= INT64[1]:  # torch, the RNG seeds and the checkpoints hold 64-bit integers
                raise ConfigError(f"{key} is {value}, past the range of a 64-bit integer (±9.2e18)")
            return value
        if option is float and not isinstance(value, bool):
            if isinstance(value, numbers.Real):  # a NumPy number too
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        if option is str and isinstance(value, str):
            return value
    if key in CHOICES:
        raise ConfigError(f"{key} must be one of {', '.join(CHOICES[key])}; got {shown(value)}")
    raise ConfigError(f"{key} must be {type_name(expected)}; got {shown(value)}")


def type_name(expected: Any) -> str:
    """A field's type in words: `float | None | Literal["auto"]` -> "a number, null or auto"."""
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             type(None): "null"}
    words = [" or ".join(typing.get_args(option)) if typing.get_origin(option) is typing.Literal
             else names.get(option, "a list of numbers") for option in _options(expected)]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _suggestion(key: str, candidates: list[str] | None = None) -> str:
    candidates = candidates if candidates is not None else all_keys()
    key = key[:100]  # difflib's time grows with the square of the length
    # A bare field name ("hidden_size") is matched against the last part of each key too.
    by_name = {c.rpartition(".")[2]: c for c in candidates}
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    close = close or [by_name[m] for m in difflib.get_close_matches(key.rpartition(".")[2], by_name, n=1, cutoff=0.75)]
    return f" (did you mean '{close[0]}'?)" if close else ""
