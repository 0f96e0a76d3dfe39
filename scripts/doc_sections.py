"""Benchmarks write their tables into docs/benchmarks.md one `## ` section each, so that re-running one
script replaces its own section and leaves the others."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path


def recorded_line() -> str:
    """The date and the commit of the code that made a table (and whether the checkout had changes)."""
    git = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True,  # noqa: E731
                                       cwd=Path(__file__).parent).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = bool(git("status", "--porcelain", "--", ":/lmtrain"))
    return (f"*Recorded on {datetime.date.today().isoformat()} with the code of commit {commit}"
            + (" with uncommitted changes to lmtrain/" if changed else "") + ".*")


def write_section(path: Path, title: str, text: str) -> None:
    """Put "## {title}", the date and commit (`recorded_line`) and `text` into `path`, in place of an
    earlier section of that title (up to the next "## "), or at the end."""
    heading = f"## {title}\n"
    section = f"{heading}\n{recorded_line()}\n\n{text.strip()}\n"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    start = old.find(heading)
    if start < 0:
        path.write_text(old.rstrip("\n") + ("\n\n" if old else "") + section, encoding="utf-8")
        return
    end = old.find("\n## ", start + len(heading))
    path.write_text(old[:start] + section + (old[end:] if end >= 0 else ""), encoding="utf-8")


def write_or_check(page: Path, text: str, *, script: str, argv: list[str] | None = None) -> int:
    """The `main` of a script that generates a whole page: write `text` to `page`, or with `--check` only
    compare (exit status 1 and one line naming `script` when the page is not current)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=f"Write {page.name}, or check that it is current.")
    parser.add_argument("--check", action="store_true", help="only check that the page is current")
    if parser.parse_args(argv).check:
        if not page.exists() or page.read_text(encoding="utf-8") != text:
            print(f"{page} is not current: run python {script}", file=sys.stderr)
            return 1
        return 0
    page.write_text(text, encoding="utf-8")
    print(f"wrote {page}")
    return 0
