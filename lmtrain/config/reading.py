"""A config from a YAML file and `key=value` overrides: the file read safely, each override read as
YAML, paths made absolute, and what the command line names winning over the file."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import yaml

from lmtrain.config.checks import build_config, shown, suggestion, to_dict
from lmtrain.config.sections import DATA_PATHS, PATHS, RENAMED, SECTIONS, Config, ConfigError, default


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
    """What the given `values` set that the rest of `config` leaves unused: each, a sentence saying so."""
    train = config.train

    def given(key: str) -> bool:
        section, _, name = key.partition(".")
        return key in values and values[key] != default(SECTIONS[section].__dataclass_fields__[name])

    notes = [note for key, note in unused_keys(config).items() if given(key)]
    if train.max_steps is not None and train.warmup_steps > train.max_steps:
        notes.append(f"train.warmup_steps {train.warmup_steps} is more than train.max_steps {train.max_steps}: the "
                     f"learning rate never reaches train.lr")
    return notes


def unused_keys(config: Config) -> dict[str, str]:
    """The keys whose value the rest of `config` never reads, each with the sentence that says why. (The
    cell-only keys, `forget_bias` and the GRU's, are left out: one config serves every cell.)"""
    train = config.train
    unused = {}
    if config.data.train is not None:
        unused["data.split"] = "data.split is unused: the config names its splits' files (data.train, data.valid)"
    if train.optimizer != "sgd":
        unused["train.momentum"] = f"train.momentum is for optimizer: sgd; {train.optimizer} leaves it unused"
    for name in {"constant": ("min_lr", "decay_start", "decay_every", "decay_rate"),
                 "cosine": ("decay_start", "decay_every", "decay_rate"), "step": ()}[train.schedule]:
        unused[f"train.{name}"] = f"train.{name} is unused with schedule: {train.schedule}"
    return unused


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
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys are given by the mapping below
                continue
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



def to_yaml_value(value: Any) -> str:
    """One value as YAML writes it inline: `[0.9, 0.1]`, `true`, `0.002`."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)



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
                              f"{suggestion(str(section)[:200], list(SECTIONS))}")
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping of keys to values")
        values.update({f"{section}.{name}": value for name, value in entries.items()})
    return values
