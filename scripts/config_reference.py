#!/usr/bin/env python
"""Write docs/config.md: every config key with its type, default and description, read from the typed
fields of lmtrain/config/sections.py (their annotations, defaults and docstrings). tests/test_config_source.py
checks the page is current.

    python scripts/config_reference.py          # writes docs/config.md
    python scripts/config_reference.py --check  # exit 1 if docs/config.md is not what this writes
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
from pathlib import Path

from doc_sections import write_or_check

from lmtrain import config

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "config.md"


def field_docstrings(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (the string literal after its line)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for field, following in zip(body, body[1:]):
        if (isinstance(field, ast.AnnAssign) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            # "a[l-1](t)" would read as a Markdown link: the bracket escaped, the text the same
            docs[field.target.id] = " ".join(following.value.value.split()).replace("](", "]\\(")
    return docs


def default_text(field: dataclasses.Field) -> str:
    value = config.default(field)
    return "null" if value is None else config.to_yaml_value(value)


def rules(key: str) -> str:
    checks = [text for keys, text in ((config.POSITIVE_KEYS, "positive"), (config.NON_NEGATIVE_KEYS, "not negative"),
                                      (config.RATE_KEYS, "in [0, 1)")) if key in keys]
    return f"; {', '.join(checks)}" if checks else ""


def page() -> str:
    lines = ["# Configuration reference", "",
             "Every key of a config file, its type, its default and what it does. A config is YAML with three",
             "sections, `data`, `model` and `train`; `lmtrain train CONFIG key=value ...` overrides any key on the",
             "command line (`model.hidden_size=512`). Relative `data.*` paths in a file are relative to the file's",
             "folder; a path starting with `~` is in the home folder, as in a shell. Written by",
             "`python scripts/config_reference.py` from the typed fields of `lmtrain/config/sections.py`,",
             "which also give the choices, defaults and error messages `lmtrain` uses, and the defaults of the",
             "Python constructors. An integer is a 64-bit one (up to about 9.2e18, the range torch and the",
             "checkpoints hold); a key given twice in a file, or one that is not a name, is an error. A key given",
             "twice on the command line takes its last value. Files named on the command line replace the file's",
             "way of naming the text: `data.path=mine.txt` drops its `data.corpus` and `data.train/valid/test`,",
             "`data.train=...` its `data.corpus` and `data.path`; and a corpus named there replaces its files:",
             "`data.corpus=ptb` drops its `data.path` and `data.train/valid/test`. A value the rest of the config",
             "leaves unused (`train.momentum` with Adam, `train.min_lr` with the constant schedule, the step",
             "schedule's keys with another) and warmup longer than `train.max_steps` each get a `warning:` line,",
             "as does warmup longer than `train.max_epochs` allows, once `lmtrain train` has counted an epoch.", ""]
    for section, cls in config.SECTIONS.items():
        docs = field_docstrings(cls)
        lines += [f"## `{section}`", "", " ".join(inspect.getdoc(cls).split()), "",
                  "| key | type | default | what it does |", "|---|---|---|---|"]
        for field in dataclasses.fields(cls):
            key = f"{section}.{field.name}"
            kind = config.type_name(config.field_type(key)) + rules(key)
            lines.append(f"| `{key}` | {kind} | `{default_text(field)}` | {docs.get(field.name, '')} |")
        lines.append("")
    renamed = ", ".join(f"`{old}` (now `{new}`)" for old, new in config.RENAMED.items())
    lines += ["## Old names", "", f"Read as their new names, with a warning: {renamed}.", ""]
    return "\n".join(lines)


def main() -> int:
    return write_or_check(PAGE, page(), script="scripts/config_reference.py")


if __name__ == "__main__":
    sys.exit(main())
