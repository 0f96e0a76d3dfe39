"""Building a C++ extension once per machine so that no process can wedge another, and no version of
lmtrain ever loads another's library.

A build is named by what makes its library different: the sources' bytes, the compiler flags, torch's
and Python's versions, lmtrain's version and the machine (`Spec.digest`). Under the cache folder
(`$TORCH_EXTENSIONS_DIR/lmtrain`, by default `~/.cache/torch_extensions/lmtrain`) each build has

    <module>/           the published build: <module>.so and lmtrain-build.json (what went into it)
    <module>.lock       held with flock(2) by the one process building it
    <module>.failed     the log of a failed build, so that later runs do not retry it at every start
    .building-<module>-XXXX/   a build in progress, private to the process making it (mode 755 less the
                               umask, as mkdir makes a folder: once published, every user loads from it)

- The library is compiled in a private folder and published by renaming that folder (atomic on one
  file system): a process finds either a whole build or none, never half of one.
- The lock is an flock, which the kernel releases when its holder dies however it dies (SIGKILL,
  SIGHUP, the OOM killer); torch's own lock is a file that only its holder deletes, so a killed build
  left every later process polling it forever. Another process waits for the holder, saying so, for at
  most `wait_seconds`, then goes on without the library.
- A cache folder that cannot be written (a read-only image, a cluster's home) is read as it is (a
  build published there ahead of time, `lmtrain kernels build`, loads), and a build goes to a private
  folder under the system's temporary folder instead. A cache folder that cannot be read (another user's
  build, mode 700) is passed over the same way.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import secrets
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
from lmtrain.errors import os_reason
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


@dataclass
class Look:
    """What the cache folders hold of one spec: its published build, else its failed one (and the log's first
    line), and the folders that could not be read, each with the reason."""

    published: Paths | None = None
    failed: Paths | None = None
    failure: str = ""
    unreadable: dict[Path, str] = field(default_factory=dict)


def look(spec: Spec, candidates: list[Path] | None = None) -> Look:
    """Look for `spec` in `candidates` (the cache folder, then the private fallback), opening its library and
    reading a failure's log, nothing else; a folder this user may not read is noted and passed over."""
    found = Look()
    for root in candidates if candidates is not None else roots():
        if root == private_root() and not _ours(root):  # another user's library there would run as ours
            continue
        paths = Paths(root, spec)
        try:
            if _readable(paths.library):
                found.published = paths
                return found
            if found.failed is None and _readable(paths.failure):
                found.failed, found.failure = paths, paths.failure.read_text(errors="replace").partition("\n")[0]
        except OSError as error:  # another user's build or folder (mode 700), a folder with mode 000
            found.unreadable[root] = os_reason(error)
    return found


def _ours(folder: Path) -> bool:
    """Whether `folder` is a folder (not a link: another user could point it anywhere) of this user's that
    no one else may write into: the private fallback under the shared temporary folder must be."""
    try:
        status = folder.lstat()
    except OSError:
        return False
    return status.st_uid == os.getuid() and not status.st_mode & 0o022 and stat.S_ISDIR(status.st_mode)


def _readable(path: Path) -> bool:
    """Whether `path` is there, opening it to be sure it can be read; an OSError where it cannot (stat alone
    would not tell a library that only its owner can read)."""
    try:
        os.close(os.open(path, os.O_RDONLY))
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def published(spec: Spec) -> Paths | None:
    """Where `spec` is built, if it is, in a folder that can be read."""
    return look(spec).published


def obtain(spec: Spec, *, announce: Announce, wait_seconds: float, root: Path | None = None,
           retry_failed: bool = False, can_build: Callable[[], str | None] = lambda: None,
           building: str = "lmtrain: compiling {sources}") -> tuple[ModuleType | None, str | None]:
    """The extension's module, loaded from the cache or built into it; or None and a one-line reason.

    `can_build` says why a build cannot start here (no compiler, ...), asked only when one is needed;
    `building` is the line announced when a build starts. A failed build is recorded and not tried again
    by later calls, unless `retry_failed`."""
    candidates = [root] if root is not None else roots()
    found = look(spec, candidates)
    if found.published is not None:  # a build published in either: load it, no lock, no write
        return _import(found.published)
    if found.failed is not None and not retry_failed:
        return None, _failure_reason(found.failed, found.failure)
    if (reason := can_build()) is not None:
        return None, reason
    folder, note = _writable(candidates, found.unreadable)
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
            return None, _failure_reason(paths, paths.failure.read_text(errors="replace").partition("\n")[0])
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


def _failure_reason(paths: Paths, summary: str) -> str:
    return f"the build failed earlier: {summary} (log: {paths.failure}; `lmtrain kernels build` tries again)"


def writable(root: Path) -> bool:
    """Whether this process can build in the cache folder `root` (made if it is not there)."""
    return _writable([root], {})[0] is not None


def _writable(candidates: list[Path], unreadable: dict[Path, str]) -> tuple[Path | None, str | None]:
    """The first of `candidates` this process can build in, and a line saying so when it is not the first;
    those in `unreadable` are not used: a build there could be neither found nor published."""
    reasons = []
    for index, root in enumerate(candidates):
        if root in unreadable:
            reasons.append((root, "not readable", unreadable[root]))
            continue
        try:
            if index > 0:  # under the shared temporary folder: ours alone, or not used at all
                root.mkdir(mode=0o700, exist_ok=True)
                if not _ours(root):
                    raise PermissionError(errno.EPERM, "owned or writable by another user")
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=root):
                pass
        except OSError as error:
            reasons.append((root, "not writable", os_reason(error)))
            continue
        if index == 0:
            return root, None
        _, what, why = reasons[0]
        return root, f"lmtrain: the kernel cache {candidates[0]} is {what} ({why}); compiling into {root}"
    return None, "no folder to compile into: " + "; ".join(
        f"{root} ({why})" if what == "not writable" else f"{root} ({what}: {why})" for root, what, why in reasons)


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
    private = _new_folder(paths.root, f"{BUILDING}{spec.module}-")
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


def _new_folder(root: Path, prefix: str) -> Path:
    """A folder of a name no other process has, made as mkdir makes one (755 less the umask), not 700 as
    mkdtemp's: published, it is read by every user (an image built as root, run as another user)."""
    while True:
        folder = root / f"{prefix}{secrets.token_hex(4)}"
        try:
            folder.mkdir(mode=0o755)
        except FileExistsError:
            continue
        return folder


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
