"""A config's values checked against their fields: types (with YAML's and NumPy's numbers read as
Python's), bounds, the combinations that cannot work, and each mistake named by key."""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import numbers
import re
import reprlib
import typing
from typing import Any

from lmtrain.config.sections import (
    CHOICES,
    DEVICE_NAME,
    MAX_THREADS,
    NON_NEGATIVE_KEYS,
    POSITIVE_KEYS,
    RATE_KEYS,
    RENAMED,
    SECTIONS,
    Config,
    ConfigError,
    ModelConfig,
    TrainConfig,
    all_keys,
    field_type,
    get_value,
    type_options,
)


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
            raise ConfigError(f"unknown config key {shown(key)}{suggestion(key)}")
        sections[section][name] = _coerce(key, value, field_type(key))
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
        model = ModelConfig(**{name: _coerce(f"model.{name}", value, field_type(f"model.{name}"))
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


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (YAML- and checkpoint-safe)."""
    return dataclasses.asdict(config)


def checked(config: Config) -> Config:
    """`config` checked again as `build_config` checks a new one: a Config changed in Python after it was
    loaded (`config.train.eval_every = 0`, a NumPy number) is refused, or made plain, by key."""
    if not isinstance(config, Config):
        raise TypeError(f"config must be an lmtrain.config.Config (from load_config or build_config); got "
                        f"{type(config).__name__}")
    # An attribute set under a misspelt name would be dropped unseen (a name of one's own, `_note`, is one's own).
    for attribute in vars(config):
        if attribute not in SECTIONS and not attribute.startswith("_"):
            raise ConfigError(f"unknown config section {shown(attribute)}{suggestion(attribute, list(SECTIONS))}")
    for name, cls in SECTIONS.items():
        section = getattr(config, name)
        for attribute in vars(section) if isinstance(section, cls) else ():
            if attribute not in cls.__dataclass_fields__ and not attribute.startswith("_"):
                raise ConfigError(f"unknown config key {shown(f'{name}.{attribute}')}"
                                  f"{suggestion(f'{name}.{attribute}')}")
    return from_dict(to_dict(config))


def from_dict(nested: dict[str, dict[str, Any]]) -> Config:
    """Inverse of `to_dict`, validated (used for the config stored in a checkpoint)."""
    return build_config({f"{s}.{k}": v for s, section in nested.items() for k, v in section.items()})



def differences(a: Config, b: Config, *, ignore: tuple[str, ...] = ()) -> list[str]:
    """The dotted keys whose values differ between two configs."""
    return [key for key in all_keys() if key not in ignore and get_value(a, key) != get_value(b, key)]




INT64 = (-(1 << 63), (1 << 63) - 1)


def _coerce(key: str, value: Any, expected: Any) -> Any:
    """Check `value` against the field's type; widen int -> float and read '3e-3' as a float (YAML 1.1
    reads `3e-3` as a string)."""
    options = type_options(expected)
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
        if option is bool and (isinstance(value, bool) or (type(value).__module__ == "numpy"
                                                          and type(value).__name__ in ("bool_", "bool"))):
            return bool(value)  # a NumPy bool too
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
             else names.get(option, "a list of numbers") for option in type_options(expected)]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def suggestion(key: str, candidates: list[str] | None = None) -> str:
    candidates = candidates if candidates is not None else all_keys()
    key = key[:100]  # difflib's time grows with the square of the length
    # A bare field name ("hidden_size") is matched against the last part of each key too.
    by_name = {c.rpartition(".")[2]: c for c in candidates}
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    close = close or [by_name[m] for m in difflib.get_close_matches(key.rpartition(".")[2], by_name, n=1, cutoff=0.75)]
    return f" (did you mean '{close[0]}'?)" if close else ""
