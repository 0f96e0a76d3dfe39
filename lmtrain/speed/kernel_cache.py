"""Seeing and clearing the cache of builds that `kernel_build` makes (`lmtrain kernels status`,
`lmtrain kernels clear`): every build of any version, with its state, and none removed while a process
builds it."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lmtrain.errors import os_reason
from lmtrain.speed.kernel_build import BUILDING, RECORD


def builds(root: Path) -> list[dict]:
    """Every build under `root`, of any version: {module, state, path, bytes, record}. The states:
    built, failed, building (a process holds its lock), abandoned (a build folder whose process died),
    unreadable (another user's, say; with the reason). An OSError where `root` itself cannot be read."""
    if not root.is_dir():
        return []
    found: dict[str, dict] = {}
    for entry in sorted(root.iterdir()):
        try:
            facts = _entry(root, entry)
        except OSError as error:  # this one entry: the others are still shown
            facts = {"module": _module(entry), "state": "unreadable", "path": str(entry), "bytes": 0,
                     "reason": os_reason(error)}
        if facts is not None:
            found[entry.name] = facts
    return list(found.values())


def _module(entry: Path) -> str:
    """The module an entry of the cache folder belongs to."""
    if entry.name.startswith(BUILDING):
        return entry.name[len(BUILDING):].rpartition("-")[0]
    return entry.stem if entry.suffix in (".failed", ".lock") else entry.name


def _entry(root: Path, entry: Path) -> dict | None:
    """One entry of `builds`, or None for what is not a build (a lock, a stray file)."""
    module, path = _module(entry), str(entry)
    if entry.name.startswith(BUILDING):
        state = "building" if _locked(root / f"{module}.lock") else "abandoned"
        return {"module": module, "state": state, "path": path, "bytes": _size(entry)}
    if entry.suffix == ".failed":
        return {"module": module, "state": "failed", "path": path, "bytes": _size(entry),
                "reason": entry.read_text(errors="replace").partition("\n")[0]}
    if entry.is_dir():
        os.listdir(entry)  # a folder this user may not read is unreadable, not an empty build
        return {"module": module, "state": "built", "path": path, "bytes": _size(entry),
                "record": _read_record(entry / RECORD)}
    return None


@dataclass
class Cleared:
    """What `clear` did under one folder: the paths removed, kept (being built now), and not removed, each
    with the reason (the folder itself where nothing could be removed)."""

    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def clear(root: Path) -> Cleared:
    """Remove every build under `root` but those being built now. A folder this user may not change is
    left whole: a removal that would fail part way is not started."""
    cleared = Cleared()
    try:
        if not root.is_dir():
            return cleared
        with tempfile.TemporaryFile(dir=root):  # a read-only cache: nothing removed, rather than half
            pass
        found = builds(root)
    except OSError as error:
        cleared.failed[str(root)] = os_reason(error)
        return cleared
    for build in found:
        if build["state"] == "building":
            cleared.kept.append(build["path"])
            continue
        try:
            _remove(Path(build["path"]))
        except OSError as error:
            cleared.failed[build["path"]] = os_reason(error)
        else:
            cleared.removed.append(build["path"])
    for lock in root.glob("*.lock"):
        try:
            if not _locked(lock):
                lock.unlink(missing_ok=True)
        except OSError as error:
            cleared.failed[str(lock)] = os_reason(error)
    return cleared


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _locked(lock: Path) -> bool:
    try:
        descriptor = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(descriptor)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
