"""Tiny deterministic corpora for the end-to-end tests (test_cli.py, test_train.py)."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the a cat dog sat ran on under mat rug big small red blue old new saw ate fish bird").split()


def sentences(count: int, seed: int) -> list[str]:
    """`count` deterministic lines of 2 to 6 words drawn from a 20-word vocabulary."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(count)]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path
