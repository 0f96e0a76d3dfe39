"""Files written so that a crash never leaves half of one: the new content goes to a temporary file in
the same folder, is flushed to disk, and is renamed over the old name (a rename is atomic on POSIX); the
folder is then synced, so that the rename itself survives a power cut. A reader sees the old file or the
whole new one, never a mixture."""

from __future__ import annotations

import fcntl
import glob
import json
import math
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from lmtrain.errors import LmtrainError


def user_cache() -> Path:
    """The user's cache folder by the XDG base directory rule: `$XDG_CACHE_HOME`, else `~/.cache`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def sync(path: Path) -> None:
    """Flush a file, or a folder's list of names, to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def replacing(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content into; when the block ends without an error it
    replaces `path` at once, and otherwise it is removed and `path` is left as it was. The temporary
    file is `.NAME.XXXXXXXX.tmp` beside it (what a cleanup of a killed writer's leftovers looks for)."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from its group and others
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    sync(path.parent)


# A temporary file younger than this is never taken for a leftover: its writer locks it just after making it.
LEFTOVER_SECONDS = 60


@contextmanager
def writing_output(path: str | Path) -> Iterator[BinaryIO]:
    """`replacing_held` for a file the user named (a plot, a page), through a link as `through_link` says."""
    with replacing_held(through_link(path)) as handle:
        yield handle


@contextmanager
def replacing_held(path: Path) -> Iterator[BinaryIO]:
    """`replacing`, for a file whose writing can take long enough to be killed part way (an output, the
    token cache's ids): the writer holds a lock on its temporary file while it writes, and first, the
    temporary files of this name that no writer holds (one killed mid-write left them, and nothing else
    would ever remove them) are removed."""
    leftover = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")  # `replacing`'s names, no other's
    for candidate in path.parent.glob(f"{glob.escape(f'.{path.name}.')}*.tmp"):
        if leftover.fullmatch(candidate.name):
            _remove_if_abandoned(candidate)
    with replacing(path) as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel if this process dies
        except OSError:  # a file system without locks: its leftovers are then never removed, as before
            pass
        yield handle


def _remove_if_abandoned(path: Path) -> None:
    """Remove `path` if it is a regular file older than LEFTOVER_SECONDS whose lock no process holds;
    leave it, without a word, where any of that cannot be known or done (another user's file, say)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode) or time.time() - status.st_mtime < LEFTOVER_SECONDS:
            return
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: its writer is alive
        path.unlink()
    except OSError:
        return
    finally:
        os.close(descriptor)


def _umask() -> int:
    """The process's umask (read by setting it and setting it back: POSIX has no call that only reads it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def through_link(path: str | Path) -> Path:
    """`path`, or the file it is a symbolic link to: a user's output named by a link (`latest.png ->
    runs/x/curves.png`) replaces the file the link names, as writing in place would, and the link stays.
    (A run folder's own files never go through a link: lmtrain.training.rundir.)"""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def atomic_write(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` so that a reader sees either the old file or the whole new one."""
    with replacing(path) as handle:
        handle.write(data)


def check_output(option: str, path: str, *, suffixes: tuple[str, ...], inputs: Iterable[str | Path] = ()) -> None:
    """Refuse, before any work, an output path that cannot be written: empty, a folder, in a folder that
    does not exist, not ending in one of `suffixes` (which also keeps a slip of the keyboard from
    writing over a checkpoint), or the same file as one of `inputs`, which it would replace."""
    target = Path(path)
    if not path:
        raise LmtrainError(f"{option} needs a file name")
    if target.suffix.lower() not in suffixes:
        raise LmtrainError(f"{option} must name a {' or '.join(suffixes)} file; got {path}")
    if target.is_dir():
        raise LmtrainError(f"cannot write {path}: it is a directory")
    # The output is written through a link, to the file it names: that file must be of the output's kind.
    named = Path(os.path.realpath(target))
    if target.is_symlink() and named.suffix.lower() != target.suffix.lower():
        raise LmtrainError(f"{option} {path} is a link to {named}, not a {target.suffix.lower()} file: writing "
                           f"it would replace that file")
    if not target.parent.is_dir():
        raise LmtrainError(f"cannot write {path}: the folder {target.parent} does not exist")
    for source in inputs:
        if same_file(target, Path(source)):
            raise LmtrainError(f"{option} {path} is the input {source}: writing it would replace what is read")


def printable_name(path: str | Path, *, whole: bool = False) -> str:
    """A file's name (`whole`: the path as given) as text that can be written anywhere (a page, a plot's
    legend): bytes of it that are no UTF-8, which Python holds as lone surrogates, shown as U+FFFD."""
    return os.fsencode(str(path) if whole else Path(path).name or str(path)).decode("utf-8", errors="replace")


def same_file(first: str | Path, second: str | Path) -> bool:
    """Whether both name one file (links followed); False where either is not there."""
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist (yet)
        return False


def json_lines(data: bytes) -> tuple[list[tuple[bytes, dict]], int]:
    """The lines of a JSON-lines file that hold a JSON object, each as (its bytes ending in a newline, the
    object), and how many other lines there were (not UTF-8, not JSON, not an object), so that a damaged
    line costs only itself. A last line without its newline that does not parse is not counted: a crash
    while it was being written leaves exactly that."""
    records, damaged = [], 0
    lines = data.splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        try:
            values = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError included
            values = None
        if isinstance(values, dict):
            records.append((line if line.endswith(b"\n") else line + b"\n", values))
        elif line.strip() and not (number == len(lines) and not line.endswith(b"\n") and values is None):
            damaged += 1
    return records, damaged


def metric_events(data: bytes) -> tuple[list[tuple[bytes, dict]], int]:
    """The events of a metrics.jsonl, as `json_lines` gives them, and how many lines are damaged: besides
    what `json_lines` counts, an object whose `step` is not a number or whose `loss` is neither a number
    nor null is no event lmtrain wrote, so every reader (plot, resume) drops the same lines."""
    records, damaged = json_lines(data)
    events = [(line, values) for line, values in records
              if _is_number(values.get("step")) and (values.get("loss") is None or _is_number(values["loss"]))]
    return events, damaged + len(records) - len(events)


def strict_json(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with every non-finite float (a diverged loss, a perplexity past float64) as None, since
    JSON has no NaN or Infinity and strict readers refuse Python's spelling of them."""
    return {name: None if isinstance(value, float) and not math.isfinite(value) else value
            for name, value in values.items()}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
