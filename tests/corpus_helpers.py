"""Tiny deterministic corpora for the end-to-end tests (test_cli.py, test_train.py, the run folder's tests)."""

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


def train_and_valid(folder: Path) -> dict[str, Path]:
    """train.txt (50 lines) and valid.txt (10) in `folder`, from a 12-word vocabulary: a run folder's tests."""
    words = WORDS[:12]
    rng = random.Random(5)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) for _ in range(60)]
    return {"train": write_lines(folder / "train.txt", lines[:50]),
            "valid": write_lines(folder / "valid.txt", lines[50:])}
