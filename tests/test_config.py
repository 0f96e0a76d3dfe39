"""lmtrain.config: every shipped config validates; overrides win and are typed; mistakes name the key."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import yaml

from lmtrain.config import (
    Config,
    ConfigError,
    all_keys,
    build_config,
    differences,
    field_type,
    from_dict,
    load_config,
    parse_override,
    to_dict,
    to_yaml,
    type_options,
)
from lmtrain.errors import LmtrainError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(CONFIGS_DIR.glob("*.yaml"))

MINIMAL_YAML = "data:\n  path: corpus.txt\ntrain:\n  max_steps: 10\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def minimal(tmp_path: Path) -> Path:
    return write(tmp_path / "c.yaml", MINIMAL_YAML)


def config_error(path, overrides=()) -> str:
    """The message of the ConfigError that loading raises; checked to be a single line."""
    with pytest.raises(ConfigError) as caught:
        load_config(path, list(overrides))
    message = str(caught.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# --- shipped configs -------------------------------------------------------------------------------

def test_configs_dir_is_not_empty():
    assert SHIPPED, f"no *.yaml in {CONFIGS_DIR}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path: Path):
    config = load_config(path)
    assert isinstance(config, Config)
    written = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("data") or {}
    for key in ("path", "train", "valid", "test"):
        value = getattr(config.data, key)
        if written.get(key) is None:
            assert value is None
        else:  # resolved relative to the YAML's folder, not to the current directory
            assert value == str((path.parent / written[key]).resolve())
    # The resolved config survives the dict round trip stored in checkpoints.
    assert from_dict(to_dict(config)) == config


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_first_line_is_a_command(path: Path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# lmtrain ")


# --- overrides -------------------------------------------------------------------------------------

def test_defaults_without_overrides(minimal: Path):
    config = load_config(minimal)
    assert config.model.hidden_size == 256
    assert config.train.lr == 2e-3
    assert config.data.split == [0.9, 0.1]


def test_override_wins_over_yaml(tmp_path: Path):
    path = write(tmp_path / "c.yaml", MINIMAL_YAML + "model:\n  hidden_size: 32\n  embed_size: 32\n")
    assert load_config(path).model.hidden_size == 32
    assert load_config(path, ["model.hidden_size=48"]).model.hidden_size == 48
    # The last of two overrides of one key wins.
    assert load_config(path, ["model.hidden_size=48", "model.hidden_size=16"]).model.hidden_size == 16


def test_override_lr_in_exponent_notation_is_a_float(minimal: Path):
    lr = load_config(minimal, ["train.lr=3e-3"]).train.lr
    assert type(lr) is float and lr == 0.003


def test_yaml_exponent_without_dot_is_a_float(tmp_path: Path):
    # YAML 1.1 reads `3e-3` as a string; the config still takes it as a number.
    path = write(tmp_path / "c.yaml", MINIMAL_YAML.replace("train:\n", "train:\n  lr: 3e-3\n"))
    lr = load_config(path).train.lr
    assert type(lr) is float and lr == 0.003


def test_integer_widened_to_float(minimal: Path):
    clip = load_config(minimal, ["train.clip=1"]).train.clip
    assert type(clip) is float and clip == 1.0


@pytest.mark.parametrize("text, expected", [("yes", True), ("true", True), ("no", False), ("false", False)])
def test_bool_override(minimal: Path, text: str, expected: bool):
    config = load_config(minimal, [f"model.tie_weights={text}", "model.embed_size=8", "model.hidden_size=8"])
    assert config.model.tie_weights is expected


def test_override_null_clears_optional(tmp_path: Path):
    path = write(tmp_path / "c.yaml", MINIMAL_YAML + "  max_epochs: 3\n")
    assert load_config(path).train.max_epochs == 3
    assert load_config(path, ["train.max_epochs=null"]).train.max_epochs is None
    assert load_config(path, ["train.max_epochs="]).train.max_epochs is None


def test_list_override(minimal: Path):
    assert load_config(minimal, ["data.split=[0.8, 0.1, 0.1]"]).data.split == [0.8, 0.1, 0.1]


def test_parse_override():
    assert parse_override("model.hidden_size=256") == ("model.hidden_size", 256)
    assert parse_override(" train.lr = 0.5") == ("train.lr", 0.5)
    assert parse_override("train.out_dir=runs/x=y") == ("train.out_dir", "runs/x=y")


@pytest.mark.parametrize("item", ["model.hidden_size", "=3", ""])
def test_override_without_equals_is_an_error(minimal: Path, item: str):
    message = config_error(minimal, [item])
    assert "KEY=VALUE" in message


def test_no_yaml_only_overrides(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["data.path=corpus.txt", "train.max_steps=1"])
    assert config.data.path == str(tmp_path.resolve() / "corpus.txt")


# --- paths -----------------------------------------------------------------------------------------

def test_yaml_paths_relative_to_yaml_folder(tmp_path: Path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    path = write(folder / "c.yaml", "data:\n  train: ../corpus/train.txt\n  valid: v.txt\n"
                                    "  test: /abs/test.txt\ntrain:\n  max_steps: 1\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path)
    assert config.data.train == str((tmp_path / "corpus" / "train.txt").resolve())
    assert config.data.valid == str((folder / "v.txt").resolve())
    assert config.data.test == str(Path("/abs/test.txt").resolve())


def test_override_paths_relative_to_cwd(tmp_path: Path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    path = write(folder / "c.yaml", MINIMAL_YAML)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert load_config(path).data.path == str((folder / "corpus.txt").resolve())
    assert load_config(path, ["data.path=other.txt"]).data.path == str((cwd / "other.txt").resolve())


def test_files_on_the_command_line_replace_the_files_way_of_naming_the_text(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    split_files = write(tmp_path / "split.yaml",
                        "data: {train: a.txt, valid: b.txt, test: c.txt}\ntrain: {max_steps: 1}\n")
    one_file = write(tmp_path / "one.yaml", "data: {path: a.txt}\ntrain: {max_steps: 1}\n")
    data = load_config(split_files, ["data.path=mine.txt"]).data
    assert (data.path, data.train, data.valid, data.test) == (str(tmp_path / "mine.txt"), None, None, None)
    data = load_config(one_file, ["data.train=t.txt", "data.valid=v.txt"]).data
    assert (data.path, data.train, data.valid) == (None, str(tmp_path / "t.txt"), str(tmp_path / "v.txt"))
    with pytest.raises(ConfigError, match="data.path or data.train/valid/test, not both"):
        load_config(one_file, ["data.test=c.txt"])  # a test file beside data.path's split: which is meant?


def test_a_corpus_on_the_command_line_replaces_the_files_files(tmp_path: Path):
    split_files = write(tmp_path / "split.yaml",
                        "data: {train: a.txt, valid: b.txt, test: c.txt}\ntrain: {max_steps: 1}\n")
    data = load_config(write(tmp_path / "one.yaml", MINIMAL_YAML), ["data.corpus=ptb"]).data
    assert (data.corpus, data.path) == ("ptb", None)
    data = load_config(split_files, ["data.corpus=ptb"]).data
    assert (data.corpus, data.train, data.valid, data.test) == ("ptb", None, None, None)
    with pytest.raises(ConfigError, match="not both"):  # both on the command line: which is meant?
        load_config(split_files, ["data.corpus=ptb", "data.path=x.txt"])


def test_out_dir_is_not_resolved(minimal: Path):
    assert load_config(minimal, ["train.out_dir=runs/x"]).train.out_dir == "runs/x"


def test_a_tilde_of_a_user_with_no_home_is_one_line(minimal: Path):
    assert config_error(minimal, ["data.path=~no-such-user-here/c.txt"]) == (
        "data.path '~no-such-user-here/c.txt': there is no home folder for ~no-such-user-here")
    assert config_error(minimal, ["train.out_dir=~no-such-user-here/x"]).startswith("train.out_dir '~no-such")


def test_a_path_starting_with_a_tilde_is_in_the_home_folder(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(tmp_path / "c.yaml", "data:\n  path: ~/corpus.txt\ntrain:\n  max_steps: 1\n  out_dir: ~/runs/x\n")
    config = load_config(path)
    assert (config.data.path, config.train.out_dir) == (str(tmp_path / "home" / "corpus.txt"),
                                                        str(tmp_path / "home" / "runs" / "x"))
    config = load_config(path, ["data.path=~/other.txt", "train.out_dir=~/"])
    assert (config.data.path, config.train.out_dir) == (str(tmp_path / "home" / "other.txt"), str(tmp_path / "home"))


# --- unknown keys and sections ---------------------------------------------------------------------

def test_unknown_override_key_suggests_close_one(minimal: Path):
    message = config_error(minimal, ["model.hiden_size=3"])
    assert "'model.hiden_size'" in message
    assert "did you mean 'model.hidden_size'" in message


def test_bare_field_name_suggests_dotted_key(minimal: Path):
    message = config_error(minimal, ["hidden_size=3"])
    assert "'hidden_size'" in message and "'model.hidden_size'" in message


def test_unknown_yaml_key_suggests_close_one(tmp_path: Path):
    path = write(tmp_path / "c.yaml", MINIMAL_YAML + "model:\n  num_layer: 2\n")
    message = config_error(path)
    assert "'model.num_layer'" in message and "did you mean 'model.num_layers'" in message


def test_unknown_key_without_close_match_has_no_suggestion(minimal: Path):
    message = config_error(minimal, ["model.zzzzzzzz=1"])
    assert "'model.zzzzzzzz'" in message and "did you mean" not in message


def test_unknown_section(tmp_path: Path):
    path = write(tmp_path / "c.yaml", MINIMAL_YAML + "modle:\n  cell: gru\n")
    message = config_error(path)
    assert "unknown config section 'modle'" in message and "did you mean 'model'" in message
    assert str(path) in message


def test_section_must_be_a_mapping(tmp_path: Path):
    path = write(tmp_path / "c.yaml", MINIMAL_YAML + "model: 3\n")
    assert "section 'model' must be a mapping" in config_error(path)


def test_top_level_must_be_a_mapping(tmp_path: Path):
    path = write(tmp_path / "c.yaml", "- a\n- b\n")
    assert "top level must be a mapping" in config_error(path)


def test_empty_section_and_empty_file(tmp_path: Path):
    path = write(tmp_path / "c.yaml", MINIMAL_YAML + "model:\n")
    assert load_config(path).model.cell == "lstm"
    empty = write(tmp_path / "empty.yaml", "")
    # Empty is fine as YAML, but there is no corpus.
    assert "no corpus" in config_error(empty)


# --- wrong types -----------------------------------------------------------------------------------

@pytest.mark.parametrize("item, key, kind", [
    ("model.hidden_size=2.5", "model.hidden_size", "an integer"),
    ("model.hidden_size=true", "model.hidden_size", "an integer"),
    ("model.hidden_size=abc", "model.hidden_size", "an integer"),
    ("train.lr=fast", "train.lr", "a number"),
    ("train.lr=true", "train.lr", "a number"),
    ("model.tie_weights=1", "model.tie_weights", "true or false"),
    ("model.cell=3", "model.cell", "one of rnn, gru, lstm"),
    ("train.max_steps=1.5", "train.max_steps", "an integer or null"),
    ("data.split=0.5", "data.split", "a list of numbers"),
    ("data.split=[0.5, x]", "data.split", "a number"),
    ("data.path=[a, b]", "data.path", "a string or null"),
])
def test_wrong_type_names_key(minimal: Path, item: str, key: str, kind: str):
    message = config_error(minimal, [item])
    assert message.startswith(f"{key} must be {kind}; got ")


def test_wrong_type_in_yaml(tmp_path: Path):
    path = write(tmp_path / "c.yaml", MINIMAL_YAML + "model:\n  num_layers: two\n")
    assert config_error(path) == "model.num_layers must be an integer; got 'two'"


@pytest.mark.parametrize(("text", "overrides", "message"), [
    ("", ["train.out_dir=2024-01-01"],
     "train.out_dir must be a string; got the date 2024-01-01 (quote it to keep it a string)"),
    ("model:\n  hidden_size: yes\n", [], "model.hidden_size must be an integer; got true (YAML reads yes, no, on "
                                          "and off as true and false: quote a word to keep it)"),
    ("yes:\n  lr: 1\n", [], "unknown config section true (YAML reads yes, no, on and off as true and false: "
                             "quote a word to keep it)"),
])
def test_values_yaml_made_from_words_are_shown_in_yaml_s_words(tmp_path: Path, text: str, overrides: list[str],
                                                                message: str):
    assert message in config_error(write(tmp_path / "c.yaml", MINIMAL_YAML + text), overrides)


# --- impossible values -----------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["model.embed_size", "model.hidden_size", "model.num_layers", "train.batch_size",
                                 "train.bptt", "train.lr", "train.eval_segment", "train.max_steps",
                                 "data.min_freq"])
@pytest.mark.parametrize("value", [0, -1])
def test_sizes_must_be_positive(minimal: Path, key: str, value: int):
    message = config_error(minimal, [f"{key}={value}"])
    assert message in (f"{key} must be positive; got {value}", f"{key} must be positive; got {float(value)}")


@pytest.mark.parametrize("key", ["train.weight_decay", "train.momentum", "train.warmup_steps", "train.min_lr",
                                 "train.clip", "train.seed"])
def test_must_not_be_negative(minimal: Path, key: str):
    message = config_error(minimal, [f"{key}=-1"])
    assert message.startswith(f"{key} must not be negative")
    load_config(minimal, [f"{key}=0"])  # zero is allowed


@pytest.mark.parametrize("key", ["train.min_lr", "train.clip", "train.weight_decay", "train.momentum"])
def test_nan_is_not_a_valid_non_negative_number(minimal: Path, key: str):
    # `nan < 0` is False, so a plain `< 0` check lets NaN through (POSITIVE uses `not value > 0`).
    message = config_error(minimal, [f"{key}=.nan"])
    assert key in message


@pytest.mark.parametrize("key, value, needle", [
    ("model.cell", "transformer", "model.cell must be one of rnn, gru, lstm; got 'transformer'"),
    ("data.level", "byte", "data.level must be one of char, word"),
    ("data.mode", "batch", "data.mode must be one of stream, sentences"),
    ("train.optimizer", "lbfgs", "train.optimizer must be one of adam, adamw, sgd"),
    ("train.schedule", "linear", "train.schedule must be one of constant, cosine"),
    ("model.dropout", "1.0", "model.dropout must be in [0, 1)"),
    ("model.dropout", "-0.1", "model.dropout must be in [0, 1)"),
    ("data.max_vocab", "2", "data.max_vocab must be at least 3"),
    ("train.device", "gpu", "train.device must be auto, cpu, cuda or cuda:N"),
])
def test_bad_values_name_key(minimal: Path, key: str, value: str, needle: str):
    assert needle in config_error(minimal, [f"{key}={value}"])


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_good_devices(minimal: Path, device: str):
    assert load_config(minimal, [f"train.device={device}"]).train.device == device


def test_tie_weights_needs_equal_sizes(minimal: Path):
    message = config_error(minimal, ["model.tie_weights=true", "model.embed_size=64", "model.hidden_size=128"])
    assert "model.tie_weights" in message and "64" in message and "128" in message
    config = load_config(minimal, ["model.tie_weights=true", "model.embed_size=32", "model.hidden_size=32"])
    assert config.model.tie_weights is True


@pytest.mark.parametrize("split", ["[0.9]", "[0.5, 0.6]", "[0.5, 0.2, 0.2, 0.1]", "[1.0, 0.0]", "[1.2, -0.2]",
                                   "[0.8, 0.1, 0.05]"])
def test_bad_split_fractions(minimal: Path, split: str):
    assert "data.split must be 2 or 3 positive fractions summing to 1" in config_error(minimal, [f"data.split={split}"])


def test_good_three_way_split(minimal: Path):
    assert load_config(minimal, ["data.split=[0.8, 0.1, 0.1]"]).data.split == [0.8, 0.1, 0.1]


def test_corpus_choices(tmp_path: Path):
    base = "train:\n  max_steps: 1\n"
    assert "no corpus" in config_error(write(tmp_path / "a.yaml", base))
    both = write(tmp_path / "b.yaml", base + "data:\n  path: x\n  train: y\n  valid: z\n")
    assert "not both" in config_error(both)
    no_valid = write(tmp_path / "c.yaml", base + "data:\n  train: y\n")
    assert "data.valid is required" in config_error(no_valid)
    config = load_config(write(tmp_path / "d.yaml", base + "data:\n  train: y\n  valid: z\n"))
    assert config.data.test is None


@pytest.mark.parametrize("extra", ["valid: z", "test: z"])
def test_path_with_valid_or_test_file_is_an_error(tmp_path: Path, extra: str):
    # data.path is cut by data.split; a valid/test file next to it would be silently ignored.
    path = write(tmp_path / "c.yaml", f"train:\n  max_steps: 1\ndata:\n  path: x\n  {extra}\n")
    assert "not both" in config_error(path)


def test_sentences_mode_needs_eos(minimal: Path):
    assert "data.mode: sentences needs data.eos: line" in config_error(minimal, ["data.mode=sentences",
                                                                                 "data.eos=none"])


def test_needs_a_stopping_limit(tmp_path: Path):
    path = write(tmp_path / "c.yaml", "data:\n  path: x\n")
    assert "at least one of train.max_steps" in config_error(path)
    assert load_config(path, ["train.max_seconds=1.5"]).train.max_seconds == 1.5


def test_cosine_over_a_time_budget_is_allowed(tmp_path: Path):
    path = write(tmp_path / "c.yaml", "data:\n  path: x\ntrain:\n  max_seconds: 5\n  schedule: cosine\n")
    assert load_config(path).train.schedule == "cosine"


# --- files -----------------------------------------------------------------------------------------

def test_invalid_yaml_names_line(tmp_path: Path):
    path = write(tmp_path / "c.yaml", "data:\n  path: x\nmodel:\n  cell: [lstm\n  hidden_size: 3\n")
    message = config_error(path)
    assert str(path) in message and "invalid YAML at line" in message


def test_invalid_yaml_line_number_is_one_based(tmp_path: Path):
    path = write(tmp_path / "c.yaml", "data:\n  path: x\n\tbad: tab\n")
    assert "at line 3" in config_error(path)


def test_missing_file(tmp_path: Path):
    missing = tmp_path / "nope.yaml"
    message = config_error(missing)
    assert message == f"config file not found: {missing}"


def test_directory(tmp_path: Path):
    assert "is a directory" in config_error(tmp_path)


def test_not_utf8(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"data:\n  path: \xff\n")
    assert "not UTF-8 text (byte offset 14)" in config_error(path)


def test_config_error_is_lmtrain_error():
    assert issubclass(ConfigError, LmtrainError)


# --- helpers ---------------------------------------------------------------------------------------

def test_all_keys_are_dotted_and_unique():
    keys = all_keys()
    assert len(keys) == len(set(keys))
    assert "model.hidden_size" in keys and "train.lr" in keys and "data.path" in keys
    assert all(key.split(".")[0] in ("data", "model", "train") for key in keys)


def test_dict_and_yaml_round_trip(minimal: Path, tmp_path: Path):
    config = load_config(minimal, ["model.cell=gru", "train.lr=0.01", "data.split=[0.8, 0.1, 0.1]"])
    assert from_dict(to_dict(config)) == config
    again = write(tmp_path / "again.yaml", to_yaml(config))
    assert load_config(again) == config


def test_from_dict_validates():
    nested = to_dict(build_config({"data.path": "/x", "train.max_steps": 1}))
    nested["model"]["hidden_size"] = -3
    with pytest.raises(ConfigError, match="model.hidden_size must be positive"):
        from_dict(nested)


def test_differences(minimal: Path):
    a = load_config(minimal)
    b = load_config(minimal, ["train.lr=0.5", "model.cell=rnn"])
    assert differences(a, b) == ["model.cell", "train.lr"]
    assert differences(a, b, ignore=("train.lr",)) == ["model.cell"]
    assert differences(a, a) == []


# --- hostile YAML ---------------------------------------------------------------------------------

def test_a_key_or_section_given_twice_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("data:\n  path: c.txt\nmodel:\n  hidden_size: 16\ntrain:\n  max_steps: 1\nmodel:\n  cell: gru\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: key 'model' appears twice, on lines 3 and 7"):
        load_config(path)
    path.write_text("data:\n  path: c.txt\nmodel:\n  hidden_size: 16\n  hidden_size: 32\ntrain:\n  max_steps: 1\n")
    with pytest.raises(ConfigError, match=r"key 'hidden_size' appears twice, on lines 4 and 5"):
        load_config(path)


def test_a_merge_key_gives_its_mappings_keys_and_the_mappings_own_win(tmp_path):
    """YAML's `<<: *anchor`, as one writes shared settings once: its keys are read, a key the mapping
    gives itself wins, and only the mapping's own keys count as given twice."""
    path = tmp_path / "merged.yaml"
    path.write_text("data:\n  path: c.txt\nmodel: &small\n  hidden_size: 16\n  embed_size: 16\n"
                    "train:\n  <<: {max_steps: 2, device: cpu}\n  max_steps: 3\n")
    config = load_config(path)
    assert (config.train.max_steps, config.train.device, config.model.hidden_size) == (3, "cpu", 16)
    path.write_text("data:\n  path: c.txt\ntrain:\n  <<: {device: cpu}\n  max_steps: 3\n  max_steps: 4\n")
    with pytest.raises(ConfigError, match=r"key 'max_steps' appears twice, on lines 5 and 6"):
        load_config(path)


def test_an_alias_bomb_is_refused_at_once_and_plain_aliases_work(tmp_path):
    import time

    bomb = "data:\n  path: c.txt\n  split: &a0 [" + ", ".join(['"lol"'] * 9) + "]\n" + "".join(
        f"  k{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 9))
    (tmp_path / "bomb.yaml").write_text(bomb)
    began = time.monotonic()
    with pytest.raises(ConfigError, match=r"aliases expand to 4[0-9,]+ values, more than the 100,000"):
        load_config(tmp_path / "bomb.yaml")
    assert time.monotonic() - began < 2
    flow = "{" + ", ".join([f"k0: &a0 [{', '.join(['lol'] * 9)}]"] + [
        f"k{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]) + "}"
    with pytest.raises(ConfigError, match="override model.cell: its aliases expand"):
        parse_override("model.cell=" + flow)
    (tmp_path / "aliases.yaml").write_text("data: {path: c.txt}\nmodel: {hidden_size: &size 24, embed_size: *size}\n"
                                           "train: {max_steps: 1}\n")
    config = load_config(tmp_path / "aliases.yaml")
    assert config.model.hidden_size == config.model.embed_size == 24


def test_deep_nesting_is_an_error_not_a_crash(tmp_path):
    (tmp_path / "deep.yaml").write_text("data: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml: nested too deeply"):
        load_config(tmp_path / "deep.yaml")


FLOAT_KEYS = [key for key in all_keys() if float in type_options(field_type(key))]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_no_numeric_key_takes_a_non_finite_number(key, value, tmp_path):
    value = f"[0.9, {value}]" if key == "data.split" else value
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be a finite number"):
        load_config(None, ["data.path=c.txt", "train.max_steps=1", f"{key}={value}"])


def test_an_enormous_value_is_shown_short_in_the_message():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["data.path=c.txt", "train.max_steps=1", "model.cell=[" + ", ".join(["x"] * 10_000) + "]"])
    assert len(str(caught.value)) < 200 and "..." in str(caught.value)


def test_a_config_read_from_a_pipe_takes_data_paths_from_the_current_folder(tmp_path, monkeypatch):
    """`lmtrain train <(cat config.yaml)`: the pipe's folder is /proc/PID/fd, no place for data."""
    import os
    import threading

    monkeypatch.chdir(tmp_path)
    os.mkfifo(tmp_path / "config-pipe")
    writer = threading.Thread(target=lambda: (tmp_path / "config-pipe").write_text(
        "data: {path: corpus.txt}\ntrain: {max_steps: 1}\n"))
    writer.start()
    config = load_config(tmp_path / "config-pipe")
    writer.join()
    assert config.data.path == str(tmp_path / "corpus.txt")


def test_a_data_path_that_is_a_symlink_loop_is_kept_for_its_reader_to_name(tmp_path):
    (tmp_path / "a.txt").symlink_to("b.txt")
    (tmp_path / "b.txt").symlink_to("a.txt")
    config = load_config(None, [f"data.path={tmp_path / 'a.txt'}", "train.max_steps=1"])
    assert config.data.path == str(tmp_path / "a.txt")


def test_overrides_given_as_one_string_are_refused(tmp_path):
    """A string is iterable: its characters were read as overrides ("override 't' is not KEY=VALUE")."""
    with pytest.raises(TypeError, match="overrides must be a list of KEY=VALUE strings; got the string"):
        load_config(None, "train.max_steps=5")


def test_settings_the_rest_of_the_config_leaves_unused_are_warned_of(tmp_path: Path):
    path = write(tmp_path / "c.yaml", MINIMAL_YAML)
    with pytest.warns(UserWarning) as caught:
        load_config(path, ["train.momentum=0.9", "train.min_lr=0.001", "train.decay_every=10",
                           "train.warmup_steps=11"])
    assert [str(warning.message) for warning in caught] == [
        "train.momentum is for optimizer: sgd; adam leaves it unused",
        "train.min_lr is unused with schedule: constant",
        "train.decay_every is unused with schedule: constant",
        "train.warmup_steps 11 is more than train.max_steps 10: the learning rate never reaches train.lr"]
    split_files = write(tmp_path / "split.yaml", "data: {train: a.txt, valid: b.txt}\ntrain: {max_steps: 1}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default split, as a run's own config.yaml writes it: no word
        load_config(split_files, ["data.split=[0.9, 0.1]"])
    with pytest.warns(UserWarning, match=r"^data.split is unused: the config names its splits' files"):
        load_config(split_files, ["data.split=[0.8, 0.2]"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # used, or left at their defaults: no word
        load_config(path, ["train.optimizer=sgd", "train.momentum=0.9", "train.schedule=step", "train.min_lr=0.001",
                           "train.decay_every=10", "train.warmup_steps=10", "train.decay_rate=0.5"])
        for bundled in sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")):
            load_config(bundled)
