"""Building a C++ extension once per machine so that no process can wedge another, and no version of
lmtrain ever loads another's library.

A build is named by what makes its library different: the sources' bytes, the compiler flags, torch's
and Python's versions, lmtrain's version and the machine (`Spec.digest`). Under the cache folder
(`$TORCH_EXTENSIONS_DIR/lmtrain`, by default `~/.cache/torch_extensions/lmtrain`) each build has

    <module>/           the published build: <module>.so and lmtrain-build.json (what went into it)
    <module>.lock       held with flock(2) by the one process building it
    <module>.failed     the log of a failed build, so that later runs do not retry it at every start
    .building-<module>-XXXX/   a build in progress, private to the process making it

- The library is compiled in a private folder and published by renaming that folder (atomic on one
  file system): a process finds either a whole build or none, never half of one.
- The lock is an flock, which the kernel releases when its holder dies however it dies (SIGKILL,
  SIGHUP, the OOM killer); torch's own lock is a file that only its holder deletes, so a killed build
  left every later process polling it forever. Another process waits for the holder, saying so, for at
  most `wait_seconds`, then goes on without the library.
- A cache folder that cannot be written (a read-only image, a cluster's home) is read as it is (a
  build published there ahead of time, `lmtrain kernels build`, loads), and a build goes to a private
  folder under the system's temporary folder instead.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType

import torch

import lmtrain
from lmtrain.files import atomic_write, sync, user_cache
from lmtrain.speed.torch_internals import torch_logs_captured

LIBRARY_SUFFIX = ".pyd" if sys.platform == "win32" else ".so"  # what torch's loader names the library
RECORD = "lmtrain-build.json"
BUILDING = ".building-"

Announce = Callable[[str], None]


@dataclass(frozen=True)
class Spec:
    """One extension: its sources and flags. `name` says what it is and for which CPU
    (e.g. "lmtrain_kernels_avx512"); `module` adds the digest of everything that shapes the library."""

    name: str
    sources: tuple[Path, ...]
    cflags: tuple[str, ...] = ()
    headers: tuple[Path, ...] = ()      # what the sources include: part of the digest, not compiled alone
    ldflags: tuple[str, ...] = ()
    compiler: str = field(default_factory=lambda: os.environ.get("CXX", "c++"))

    def fingerprint(self) -> dict:
        return {"name": self.name,
                "sources": {s.name: hashlib.sha256(s.read_bytes()).hexdigest() for s in (*self.sources, *self.headers)},
                "cflags": list(self.cflags), "ldflags": list(self.ldflags), "compiler": self.compiler,
                "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.implementation.cache_tag,
                "machine": platform.machine(), "lmtrain": lmtrain.__version__}

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def module(self) -> str:
        return f"{self.name}_{self.digest}"


class BuildFailed(Exception):
    """The compiler (or the import of what it made) failed; the message is one line, the log is whole."""

    def __init__(self, summary: str, log: str) -> None:
        super().__init__(summary)
        self.log = log


def default_root() -> Path:
    """Where builds are cached: beside torch's own extension builds."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    if base:
        return Path(base) / "lmtrain"
    return user_cache() / "torch_extensions" / "lmtrain"


def private_root() -> Path:
    """The fallback when the cache folder cannot be written: a folder of this user's alone."""
    return Path(tempfile.gettempdir()) / f"lmtrain-kernels-{os.getuid()}"


@dataclass(frozen=True)
class Paths:
    """Where one spec's build lives under one cache folder."""

    root: Path
    spec: Spec

    @property
    def folder(self) -> Path:
        return self.root / self.spec.module

    @property
    def library(self) -> Path:
        return self.folder / f"{self.spec.module}{LIBRARY_SUFFIX}"

    @property
    def lock(self) -> Path:
        return self.root / f"{self.spec.module}.lock"

    @property
    def failure(self) -> Path:
        return self.root / f"{self.spec.module}.failed"


def roots() -> list[Path]:
    """The cache folder, then the private fallback."""
    return [default_root(), private_root()]


def published(spec: Spec) -> Paths | None:
    """Where `spec` is built, if it is, in either folder."""
    return next((paths for root in roots() if (paths := Paths(root, spec)).library.exists()), None)


def obtain(spec: Spec, *, announce: Announce, wait_seconds: float, root: Path | None = None,
           retry_failed: bool = False, can_build: Callable[[], str | None] = lambda: None,
           building: str = "lmtrain: compiling {sources}") -> tuple[ModuleType | None, str | None]:
    """The extension's module, loaded from the cache or built into it; or None and a one-line reason.

    `can_build` says why a build cannot start here (no compiler, ...), asked only when one is needed;
    `building` is the line announced when a build starts. A failed build is recorded and not tried again
    by later calls, unless `retry_failed`."""
    candidates = [root] if root is not None else roots()
    for candidate in candidates:  # a build published in either: load it, no lock, no write
        paths = Paths(candidate, spec)
        if paths.library.exists():
            return _import(paths)
        if paths.failure.exists() and not retry_failed:
            return None, _failure_reason(paths)
    if (reason := can_build()) is not None:
        return None, reason
    folder, note = _writable(candidates)
    if folder is None:
        return None, note
    paths = Paths(folder, spec)
    if note:
        announce(note)
    with _exclusive(paths.lock, wait_seconds=wait_seconds, announce=announce) as holder:
        if holder is not None:
            return None, f"{holder} has been compiling the kernels for over {wait_seconds:g} s"
        if paths.library.exists():  # built by the process we waited for
            return _import(paths)
        if paths.failure.exists() and not retry_failed:  # ... or failed by it
            return None, _failure_reason(paths)
        announce(building.format(sources=", ".join(source.name for source in spec.sources)))
        try:
            module = _build(paths)
        except BuildFailed as failure:
            _write_atomically(paths.failure, f"{failure}\n\n{failure.log}\n")
            return None, f"build failed: {failure} (log: {paths.failure})"
        paths.failure.unlink(missing_ok=True)
        return module, None


def _import(paths: Paths) -> tuple[ModuleType | None, str | None]:
    try:
        specification = importlib.util.spec_from_file_location(paths.spec.module, paths.library)
        module = importlib.util.module_from_spec(specification)
        specification.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - a damaged file, a library for another machine copied in by hand
        return None, (f"cannot load {paths.library} ({_first_line(error)}); `lmtrain kernels clear` removes it")
    return module, None


def _failure_reason(paths: Paths) -> str:
    summary = paths.failure.read_text(errors="replace").partition("\n")[0]
    return f"the build failed earlier: {summary} (log: {paths.failure}; `lmtrain kernels build` tries again)"


def _writable(candidates: list[Path]) -> tuple[Path | None, str | None]:
    """The first of `candidates` this process can build in, and a line saying so when it is not the first."""
    reasons = []
    for index, root in enumerate(candidates):
        try:
            if index > 0:  # under the shared temporary folder: ours alone, or not used at all
                root.mkdir(mode=0o700, exist_ok=True)
                status = root.lstat()  # not a link: another user could point it anywhere
                if status.st_uid != os.getuid() or status.st_mode & 0o022 or not stat.S_ISDIR(status.st_mode):
                    raise PermissionError(errno.EPERM, "owned or writable by another user")
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=root):
                pass
        except OSError as error:
            reasons.append((root, error.strerror or str(error)))
            continue
        if index == 0:
            return root, None
        return root, (f"lmtrain: the kernel cache {candidates[0]} is not writable ({reasons[0][1]}); "
                      f"compiling into {root}")
    return None, "no folder to compile into: " + "; ".join(f"{root} ({why})" for root, why in reasons)


@contextmanager
def _exclusive(lock: Path, *, wait_seconds: float, announce: Announce) -> Iterator[str | None]:
    """Hold `lock` (flock) inside the block, yielding None; or, when another process still holds it after
    `wait_seconds`, yield who holds it. A holder that dies releases it at once."""
    descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        holder = _acquire(descriptor, wait_seconds=wait_seconds, announce=announce)
        if holder is None:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield holder
    finally:
        os.close(descriptor)  # releases the lock


def _acquire(descriptor: int, *, wait_seconds: float, announce: Announce) -> str | None:
    deadline, said = time.monotonic() + wait_seconds, False
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            pass
        except OSError:  # a file system without locks: private build folders keep it correct anyway
            return None
        written = os.pread(descriptor, 200, 0).decode(errors="replace").strip()  # "pid N on HOST"
        holder = f"another process ({written})" if written else "another process"
        if time.monotonic() >= deadline:
            return holder
        if not said:
            announce(f"lmtrain: waiting for {holder} to finish compiling the kernels (at most {wait_seconds:g} s)")
            said = True
        time.sleep(0.2)


def _build(paths: Paths) -> ModuleType:
    """Compile in a private folder, then publish it under its final name; the module, loaded."""
    spec, begin = paths.spec, time.monotonic()
    for stale in paths.root.glob(f"{BUILDING}{spec.module}-*"):  # left by a builder that died: we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    private = Path(tempfile.mkdtemp(prefix=f"{BUILDING}{spec.module}-", dir=paths.root))
    try:
        with torch_logs_captured() as log:
            try:
                from torch.utils import cpp_extension

                module = cpp_extension.load(spec.module, [str(s) for s in spec.sources], extra_cflags=list(spec.cflags),
                                            extra_ldflags=list(spec.ldflags), build_directory=str(private),
                                            verbose=False)
            except Exception as error:  # noqa: BLE001 - a compiler failure comes as any of several types
                raise BuildFailed(_summary(error), "\n".join([*log, str(error)])) from None
        record = {**spec.fingerprint(), "module": spec.module, "seconds": round(time.monotonic() - begin, 1),
                  "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "log": log}
        (private / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        for written in (private / f"{spec.module}{LIBRARY_SUFFIX}", private / RECORD, private):
            sync(written)  # on disk before its name is: a power cut must not publish an empty library
        try:
            os.rename(private, paths.folder)  # the library, whole, appears under its name at once
            sync(paths.root)
        except OSError:
            if not paths.library.exists():  # not published by another process meanwhile: a real failure
                raise
        return module
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _summary(error: Exception) -> str:
    """The line of a compiler's output that says what went wrong, else the error's first line."""
    text = str(error)
    for line in text.splitlines():
        if "error:" in line or "Error:" in line:
            return line.strip()[:300]
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def _write_atomically(path: Path, text: str) -> None:
    try:
        atomic_write(path, text.encode())
    except OSError:
        pass  # only a later run's time is lost: it tries the build again


# -- seeing and clearing the cache (`lmtrain kernels status`, `lmtrain kernels clear`) --------------

def builds(root: Path) -> list[dict]:
    """Every build under `root`, of any version: {module, state, path, bytes, record}. The states:
    built, failed, building (a process holds its lock), abandoned (a build folder whose process died)."""
    if not root.is_dir():
        return []
    found: dict[str, dict] = {}
    for entry in sorted(root.iterdir()):
        name = entry.name
        if name.startswith(BUILDING):
            module = name[len(BUILDING):].rpartition("-")[0]
            state = "building" if _locked(root / f"{module}.lock") else "abandoned"
            found[name] = {"module": module, "state": state, "path": str(entry), "bytes": _size(entry)}
        elif entry.suffix == ".failed":
            found[name] = {"module": entry.stem, "state": "failed", "path": str(entry), "bytes": _size(entry),
                           "reason": entry.read_text(errors="replace").partition("\n")[0]}
        elif entry.is_dir():
            record = _read_record(entry / RECORD)
            found[name] = {"module": name, "state": "built", "path": str(entry), "bytes": _size(entry),
                           "record": record}
    return list(found.values())


def clear(root: Path) -> tuple[list[str], list[str]]:
    """Remove every build under `root` but those being built now; (removed paths, kept paths)."""
    removed, kept = [], []
    for build in builds(root):
        if build["state"] == "building":
            kept.append(build["path"])
            continue
        path = Path(build["path"])
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(build["path"])
    for lock in root.glob("*.lock") if root.is_dir() else ():
        if not _locked(lock):
            lock.unlink(missing_ok=True)
    return removed, kept


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
