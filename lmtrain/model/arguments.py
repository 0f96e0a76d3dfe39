"""Checks of the model's constructor arguments for the Python API: a size that is no positive integer, or
a flag that is no bool (the string "false" is true to Python), is one `ValueError` naming the argument.
A config's values are checked earlier, by key (`lmtrain.config`)."""

from __future__ import annotations

import numbers
from typing import Any


def size(name: str, value: Any) -> int:
    """`value` as a Python int (a NumPy integer too), refused unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def flags(**values: Any) -> None:
    """Refuse any of `values` that is not True or False (a NumPy bool is taken, as NumPy numbers are)."""
    for name, value in values.items():
        if not is_bool(value):
            raise ValueError(f"{name} must be True or False; got {value!r}")


def is_bool(value: Any) -> bool:
    """Whether `value` is True or False, as Python's bool or NumPy's (np.True_), without importing NumPy."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"))


def number_or_none(name: str, value: Any) -> float | None:
    """`value` as a Python float, or None; anything else refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number or None; got {value!r}")
    return float(value)
