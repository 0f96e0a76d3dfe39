"""One config source: the typed fields of lmtrain/config/sections.py give the choices, the checks, the error
messages, the constructors' defaults and docs/config.md; the code's tables of choices agree with them."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from lmtrain import config
from lmtrain.config import ConfigError, ModelConfig, build_config, choices, load_config
from lmtrain.model.cells import CELLS
from lmtrain.model.language_model import LanguageModel
from lmtrain.model.objective import PRECISIONS

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = {"data.path": "/corpus.txt", "train.max_steps": 1}


def test_choices_come_from_the_literal_types():
    assert choices("model.cell") == ("rnn", "gru", "lstm")
    assert choices("model.forget_bias") == ("auto",)  # a number, null or auto: not a pure choice
    assert "model.forget_bias" not in config.CHOICES and "train.threads" not in config.CHOICES
    assert config.CHOICES["model.gradients"] == ("manual", "autograd")


def test_the_codes_tables_cover_exactly_the_configs_choices():
    assert tuple(CELLS) == choices("model.cell")
    assert tuple(PRECISIONS) == choices("train.precision")


@pytest.mark.parametrize("key", sorted(config.CHOICES))
def test_every_choice_builds_and_anything_else_is_named(key: str):
    for word in config.CHOICES[key]:
        values = {**MINIMAL, key: word}
        if key == "data.eos" and word == "none":
            values["data.mode"] = "stream"
        if key == "model.gru_reset":
            values["model.cell"] = "gru"
        build_config(values)
    with pytest.raises(ConfigError, match=f"^{key} must be one of {', '.join(config.CHOICES[key])}; got 'nope'$"):
        build_config({**MINIMAL, key: "nope"})


@pytest.mark.parametrize("key", config.POSITIVE_KEYS)
def test_every_positive_key_refuses_zero(key: str):
    with pytest.raises(ConfigError, match=f"^{key} must be positive; got 0"):
        build_config({**MINIMAL, key: 0})


@pytest.mark.parametrize("key", config.RATE_KEYS)
def test_every_rate_refuses_one(key: str):
    with pytest.raises(ConfigError, match=rf"^{key} must be in \[0, 1\); got 1"):
        build_config({**MINIMAL, key: 1.0})


def test_the_model_is_built_from_its_section_whole():
    """LanguageModel's keyword arguments are exactly the `model:` keys, with the same defaults."""
    parameters = inspect.signature(LanguageModel).parameters
    keywords = {name: p.default for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords == {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def test_an_old_key_is_read_as_its_new_name_with_a_warning(tmp_path: Path):
    path = tmp_path / "old.yaml"
    path.write_text("data: {path: corpus.txt}\nmodel: {backward: autograd}\ntrain: {max_steps: 1}\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_config(path)
    assert loaded.model.gradients == "autograd"
    assert [str(w.message) for w in caught] == ["model.backward is now called model.gradients: read as model.gradients"]
    with pytest.raises(ConfigError, match="one setting"):
        build_config({**MINIMAL, "model.backward": "manual", "model.gradients": "manual"})


def test_the_reference_page_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_reference_page_lists_every_key_with_its_docstring():
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    for key in config.all_keys():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, key
        assert row.rstrip(" |").split(" | ")[-1].strip(), f"{key} has no description"


def test_every_command_line_option_is_spelled_in_lowercase():
    """`--device`, `--max-tokens`, ... in every command, with every typer lmtrain admits (typer 0.27 named
    an option after a metavar that was its argument's name in capitals: `--DEVICE`)."""
    import typer

    from lmtrain.cli import app

    def commands(group, path: str = "lmtrain"):  # click's commands (typer's own copy of click since 0.28)
        yield path, group
        for name, command in getattr(group, "commands", {}).items():
            yield from commands(command, f"{path} {name}")

    checked = 0
    for path, command in commands(typer.main.get_command(app)):
        for parameter in command.params:
            if parameter.param_type_name == "option":
                flags = [*parameter.opts, *parameter.secondary_opts]
                assert all(flag == flag.lower() for flag in flags) and flags[0].startswith("--"), (path, flags)
                checked += 1
    assert checked > 40
