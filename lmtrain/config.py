"""Typed configuration: three dataclass sections (`data`, `model`, `train`) read from YAML plus
dotted `key=value` overrides that win over the file.

A leaf module: it imports neither torch nor anything else of lmtrain but `errors`, so a config can
be checked before anything heavy loads. Every mistake raises `ConfigError` naming the key.

Paths: a relative `data.*` path written in a YAML file is relative to that file's folder (so a
config works from any directory); a relative path given on the command line, and `train.out_dir`,
are relative to the current directory. The resolved config holds absolute data paths.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmtrain.errors import LmtrainError


class ConfigError(LmtrainError):
    """A config key is unknown, has the wrong type, or an impossible value."""


@dataclass
class DataConfig:
    corpus: str | None = None          # a downloaded corpus by name (`lmtrain data download NAME`)
    path: str | None = None            # one corpus file, cut by `split`
    split: list[float] = field(default_factory=lambda: [0.9, 0.1])  # train, valid[, test] fractions
    train: str | None = None           # or three files
    valid: str | None = None
    test: str | None = None
    level: str = "char"                # char | word
    mode: str = "stream"               # stream | sentences
    eos: str = "line"                  # line: <eos> at each line end | none
    min_freq: int = 1                  # word level: rarer words become <unk>
    max_vocab: int | None = None       # word level: keep the most frequent, specials included
    encoding: str = "utf-8"
    encoding_errors: str = "strict"    # strict: undecodable bytes are an error | replace
    cache: bool = True                 # stream mode: tokenize once into the token cache, memory-map it after


@dataclass
class ModelConfig:
    cell: str = "lstm"                 # rnn | gru | lstm
    embed_size: int = 64
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.0               # the rate of the three below when they are null
    input_dropout: float | None = None     # on the embeddings x(t) going into the first layer
    layer_dropout: float | None = None     # between layers
    output_dropout: float | None = None    # on the last layer's a(t) going into the softmax
    locked_dropout: bool = False       # one dropout mask per sequence, the same at every step (variational)
    embedding_dropout: float = 0.0     # whole words dropped from the embedding for a batch
    weight_drop: float = 0.0           # DropConnect on the recurrent weights W_aa, one mask per batch
    tie_weights: bool = False
    init: str = "auto"                 # auto: torch with adam and adamw, zaremba with sgd | zaremba: U(-0.1, 0.1)
                                       # embedding and projection | torch: torch.nn's defaults
    forget_bias: float | None | str = "auto"  # lstm only: the forget gate's initial bias; null: like the other
                                       # biases; auto: 1 with init zaremba, null with torch
    relevance_gate: bool = True        # gru only: the full GRU (True) or the simplified one
    gru_reset: str = "before"          # gru only: Γ_r applied to c(t-1) before W_c (lecture) | after (PyTorch)
    backward: str = "manual"           # manual: the hand-written backpropagation through time | autograd
    direction: str = "forward"         # forward | bi: also a backward LM sharing embedding and softmax (ELMo)


@dataclass
class TrainConfig:
    batch_size: int = 32
    bptt: int = 64                     # stream: truncated-BPTT length; sentences: longest sequence
    optimizer: str = "adam"            # adam | adamw | sgd
    lr: float = 2e-3
    weight_decay: float = 0.0
    momentum: float = 0.0              # sgd only
    schedule: str = "constant"         # constant | cosine (over the step, epoch or time budget) | step
    warmup_steps: int = 0
    min_lr: float = 0.0                # cosine and step floor
    decay_start: int = 0               # step schedule: the first step at lr * decay_rate
    decay_every: int = 1000            # step schedule: a further decay_rate every this many steps
    decay_rate: float = 0.5            # step schedule
    activation_regularization: float = 0.0           # AR's α: α mean((m ⊙ a)²) added to the loss
    temporal_activation_regularization: float = 0.0  # TAR's β: β mean((a(t) - a(t+1))²)
    clip: float = 5.0                  # global gradient-norm clip; 0 turns it off
    max_steps: int | None = None       # stop at whichever of the three limits comes first
    max_epochs: int | None = None
    max_seconds: float | None = None
    eval_every: int = 500
    eval_segment: int = 2048           # stream mode: evaluation reads the split in segments this long
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_last: int = 2                 # step-numbered checkpoints kept besides last.pt and best.pt
    max_bad_steps: int = 5             # non-finite steps in a row (each skipped) before training stops
    final_samples: int = 5             # sentences printed when training ends
    sample_every: int | None = None    # also print a few samples every this many steps
    tensorboard: bool = False          # also log to <out_dir>/tensorboard (needs the tensorboard package)
    seed: int = 1234
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    threads: int | str = "auto"        # CPU threads: auto (the free cores, following the load) | a number
    precision: str = "float32"         # float32 | bfloat16: the training step's matrix products take bfloat16
                                       # factors, summed in float32 (mixed precision); evaluation stays float32
    out_dir: str = "runs/default"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


MAX_THREADS = 1024  # more is no machine's core count, and each thread is an OS thread with a stack

SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
CHOICES: dict[str, tuple[str, ...]] = {
    "data.level": ("char", "word"),
    "data.mode": ("stream", "sentences"),
    "data.eos": ("line", "none"),
    "data.encoding_errors": ("strict", "replace"),
    "model.cell": ("rnn", "gru", "lstm"),
    "model.init": ("auto", "zaremba", "torch"),
    "model.gru_reset": ("before", "after"),
    "model.backward": ("autograd", "manual"),
    "model.direction": ("forward", "bi"),
    "train.optimizer": ("adam", "adamw", "sgd"),
    "train.schedule": ("constant", "cosine", "step"),
    "train.precision": ("float32", "bfloat16"),
}
POSITIVE = ("model.embed_size", "model.hidden_size", "model.num_layers", "train.batch_size",
            "train.bptt", "train.lr", "train.eval_every", "train.eval_segment", "train.log_every",
            "train.checkpoint_every", "train.sample_every", "train.max_bad_steps", "train.max_steps", "train.max_epochs", "train.max_seconds",
            "data.min_freq", "train.decay_every")
NON_NEGATIVE = ("train.decay_start", "train.activation_regularization", "train.temporal_activation_regularization",
                "train.keep_last", "train.weight_decay", "train.momentum", "train.warmup_steps", "train.min_lr",
                "train.clip", "train.final_samples", "train.seed")
DATA_PATHS = ("data.path", "data.train", "data.valid", "data.test")
PATHS = (*DATA_PATHS, "train.out_dir")


def all_keys() -> list[str]:
    """Every dotted key a config accepts, e.g. `model.hidden_size`."""
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read `path` (YAML), apply `KEY=VALUE` overrides, check types and values; return the config."""
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
    if overridden & set(DATA_PATHS) and "data.corpus" not in overridden:
        values.pop("data.corpus", None)  # files named on the command line win over the YAML's corpus
    return build_config(values)


def _absolute(key: str, path: str, base: Path) -> str:
    if "\0" in path:
        raise ConfigError(f"{key} holds a NUL character: {shown(path)}")
    absolute = base / path
    try:
        if absolute.exists() and not (absolute.is_file() or absolute.is_dir()):
            return str(absolute.absolute())  # a pipe (/dev/fd/63) resolves to no path at all: keep its name
        return str(absolute.resolve())
    except (OSError, RuntimeError):  # a loop of symbolic links: left to the reader of the file to name
        return str(absolute.absolute())


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
            if isinstance(key, (str, int, float, bool)) and key in lines:
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
    """`value` as an error message shows it: its repr, cut short (a value may be enormous)."""
    return _SHORT.repr(value)


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 80, 80, 6, 6, 3


def build_config(values: dict[str, Any]) -> Config:
    """Build a Config from a flat {dotted key: value} dict; unknown keys and bad values raise."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        section, _, name = key.partition(".")
        if key not in all_keys():
            raise ConfigError(f"unknown config key {shown(key)}{_suggestion(key)}")
        sections[section][name] = _coerce(key, value, _field_type(SECTIONS[section], name))
    config = Config(**{name: SECTIONS[name](**kwargs) for name, kwargs in sections.items()})
    validate(config)
    config.model.init, config.model.forget_bias = initialisation(config.model.init, config.model.forget_bias,
                                                                 optimizer=config.train.optimizer)
    return config


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
    for key in all_keys():  # .inf and .nan are numbers to YAML, and no setting here can be one
        value = get_value(config, key)
        if any(isinstance(number, float) and not math.isfinite(number)
               for number in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"{key} must be a finite number; got {shown(value)}")
    for key, choices in CHOICES.items():
        if get_value(config, key) not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {shown(get_value(config, key))}")
    for key in POSITIVE:
        value = get_value(config, key)
        if value is not None and not value > 0:
            raise ConfigError(f"{key} must be positive; got {value}")
    for key in NON_NEGATIVE:
        if not get_value(config, key) >= 0:  # written so that NaN fails too
            raise ConfigError(f"{key} must not be negative; got {get_value(config, key)}")
    data, model, train = config.data, config.model, config.train
    for key in ("model.dropout", "model.input_dropout", "model.layer_dropout", "model.output_dropout",
                "model.embedding_dropout", "model.weight_drop"):
        value = get_value(config, key)
        if value is not None and not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1); got {value}")
    if not 0.0 < train.decay_rate <= 1.0:
        raise ConfigError(f"train.decay_rate must be in (0, 1]; got {train.decay_rate}")
    if model.tie_weights and model.embed_size != model.hidden_size:
        raise ConfigError(f"model.tie_weights needs model.embed_size == model.hidden_size; "
                          f"got {model.embed_size} and {model.hidden_size}")
    if model.gru_reset == "after" and not model.relevance_gate:
        raise ConfigError("model.gru_reset: after needs model.relevance_gate: true (it places the relevance gate)")
    if train.precision != "float32" and config.model.backward != "manual":
        raise ConfigError(f"train.precision: {train.precision} needs model.backward: manual (the autograd layers "
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

    if "\0" in train.out_dir:
        raise ConfigError(f"train.out_dir holds a NUL character: {train.out_dir!r}")
    if isinstance(model.forget_bias, str) and model.forget_bias != "auto":
        raise ConfigError(f"model.forget_bias must be a number, null or auto; got {shown(model.forget_bias)}")
    if train.threads != "auto" and not (isinstance(train.threads, int) and 1 <= train.threads <= MAX_THREADS):
        raise ConfigError(f"train.threads must be auto or a number of threads from 1 to {MAX_THREADS}; got "
                          f"{shown(train.threads)}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", train.device):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N; got {shown(train.device)}")


def get_value(config: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (YAML- and checkpoint-safe)."""
    return dataclasses.asdict(config)


def from_dict(nested: dict[str, dict[str, Any]]) -> Config:
    """Inverse of `to_dict`, validated (used for the config stored in a checkpoint)."""
    return build_config({f"{s}.{k}": v for s, section in nested.items() for k, v in section.items()})


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


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(key: str, value: Any, expected: Any) -> Any:
    """Check `value` against the field's annotation; widen int -> float and read '3e-3' as a float
    (YAML 1.1 reads `3e-3` as a string)."""
    options = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is type(None):
            continue
        if typing.get_origin(option) is list:
            (item_type,) = typing.get_args(option)
            if isinstance(value, list):
                return [_coerce(key, item, item_type) for item in value]
            continue
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        if option is str and isinstance(value, str):
            return value
    raise ConfigError(f"{key} must be {_type_name(expected)}; got {shown(value)}")


def _type_name(expected: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             type(None): "null"}
    options = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
    return " or ".join(names.get(o, "a list of numbers") for o in options)


def _suggestion(key: str, candidates: list[str] | None = None) -> str:
    candidates = candidates if candidates is not None else all_keys()
    key = key[:100]  # difflib's time grows with the square of the length
    # A bare field name ("hidden_size") is matched against the last part of each key too.
    by_name = {c.rpartition(".")[2]: c for c in candidates}
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    close = close or [by_name[m] for m in difflib.get_close_matches(key.rpartition(".")[2], by_name, n=1, cutoff=0.75)]
    return f" (did you mean '{close[0]}'?)" if close else ""
