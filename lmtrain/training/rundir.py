"""The files of one run in `train.out_dir`, kept so that no crash loses work:

    config.yaml        the resolved config
    metrics.jsonl      one JSON object per log or evaluation event
    step-0001000.pt    the last `train.keep_last` periodic checkpoints
    last.pt            the newest checkpoint (a hard link to the newest step file)
    best.pt            the lowest finite validation loss
    lock               held (flock) by the training process using the folder

Every file is replaced atomically (`lmtrain.files.atomic_write`), and old step files are pruned only
after the new one is in place. `--resume` takes the newest checkpoint that loads: last.pt, else the
step files newest first, else best.pt.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from lmtrain.checkpoint import ANOTHER, checkpoint_bytes, load_checkpoint
from lmtrain.errors import LmtrainError, os_reason
from lmtrain.files import atomic_write, metric_events

STEP_FILE = re.compile(r"step-(\d+)\.pt")


class RunDirectory:
    def __init__(self, path: str | Path, *, keep_last: int = 2) -> None:
        self.path, self.keep_last = Path(path), keep_last
        self.last, self.best = self.path / "last.pt", self.path / "best.pt"
        self.metrics = self.path / "metrics.jsonl"
        self._lock_handle = None

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise LmtrainError(f"cannot create train.out_dir {self.path}: {os_reason(error)}") from None

    def open_for_run(self, config_yaml: str, *, fresh: bool) -> None:
        """Create the folder, take its lock, then write the run's config.yaml. A `fresh` run looks again,
        under the lock, for a run it would overwrite: one may have finished here since its first look."""
        self.create()
        self.lock()
        if fresh:
            self.check_fresh()
        try:
            atomic_write(self.path / "config.yaml", config_yaml.encode())
        except OSError as error:
            raise LmtrainError(f"cannot write to train.out_dir {self.path}: {os_reason(error)}") from None

    # -- one trainer per folder ----------------------------------------------------------------------

    def lock(self) -> None:
        """Take the folder's lock or refuse (held already: nothing to do). An flock dies with its process,
        so a lock left by a killed run is never stale; the pid inside is only for the message."""
        if self._lock_handle is not None:
            return
        try:  # never through a symbolic link: the pid written below would overwrite the file it names
            handle = open(os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+",
                          encoding="utf-8")
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise LmtrainError(f"{self.path / 'lock'} is a symbolic link, which lmtrain never makes; remove it "
                                   f"(the lock is a file of its own)") from None
            raise LmtrainError(f"cannot write to train.out_dir {self.path}: {os_reason(error)}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise LmtrainError(f"another training (pid {holder}) is using {self.path}; wait for it or choose "
                               f"another train.out_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_handle = handle
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Half-written files of a run that was killed mid-write (`.step-0000100.pt.XXXX.tmp`,
        `.last.pt.link`): with the lock held, no other process is writing them."""
        for leftover in [*self.path.glob(".*.pt.*.tmp"), *self.path.glob(".*.pt.link"),
                         *self.path.glob(".*.jsonl.*.tmp"),
                         *self.path.glob(".config.yaml.*.tmp")]:
            leftover.unlink(missing_ok=True)

    def check_fresh(self) -> None:
        """A new run never overwrites a run's checkpoints by starting again in its folder."""
        if self.has_run():
            raise LmtrainError(f"{self.path} already holds a run ({self._newest_name()}): add --resume to continue "
                               f"it, or choose another train.out_dir")

    def _newest_name(self) -> str:
        return next(path.name for path in [self.last, *self.step_files(), self.best]
                    if path.exists() or path.is_symlink())

    def unlock(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()  # closing releases the flock
            self._lock_handle = None

    # -- checkpoints ---------------------------------------------------------------------------------

    def save_last(self, payload: dict[str, Any], step: int) -> None:
        """Write the step's checkpoint, point last.pt at it, then prune step files beyond keep_last (all of
        them at 0, those of a resumed run that kept more included)."""
        data = checkpoint_bytes(payload)
        if self.keep_last == 0:
            _write(self.last, data)
        else:
            step_path = self.path / f"step-{step:07d}.pt"
            _write(step_path, data)
            _link_or_write(step_path, self.last, data)
        self.prune()

    def prune(self) -> None:
        """Remove the step files beyond the newest `keep_last`."""
        for old in self.step_files()[self.keep_last:]:
            old.unlink(missing_ok=True)

    def save_best(self, payload: dict[str, Any]) -> None:
        _write(self.best, checkpoint_bytes(payload))

    def step_files(self) -> list[Path]:
        """Step checkpoints, newest first."""
        found = [(int(m.group(1)), p) for p in self.path.glob("step-*.pt") if (m := STEP_FILE.fullmatch(p.name))]
        return [path for _, path in sorted(found, reverse=True)]

    def has_run(self) -> bool:
        """Whether the folder holds a checkpoint `--resume` would continue: last.pt, a step file, or best.pt
        alone (a run stopped after its first evaluation, before its first periodic checkpoint)."""
        return self.last.exists() or bool(self.step_files()) or self.best.exists() or self.best.is_symlink()

    def newest_intact(self) -> tuple[Path, dict[str, Any], list[str]]:
        """The checkpoint to resume from and notes on any that were skipped as damaged."""
        notes = []
        for path in [self.last, *self.step_files(), self.best]:
            if not path.exists():
                continue
            try:
                return path, load_checkpoint(path, training=True), notes
            except LmtrainError as error:
                notes.append(f"warning: {str(error).removesuffix(f'; {ANOTHER}')}; trying an older checkpoint")
        if notes:
            raise LmtrainError(f"no intact checkpoint to resume in {self.path} ({len(notes)} damaged)")
        where = "" if self.path.is_absolute() else (f" ({self.path.absolute()}: a relative train.out_dir is read "
                                                     f"from the current folder)")
        raise LmtrainError(f"nothing to resume: no last.pt in {self.path}{where}")

    # -- metrics -------------------------------------------------------------------------------------

    def open_metrics(self, *, resumed_at: int | None,
                     warn: Callable[[str], None] = lambda line: None) -> tuple[IO[str], set[str]]:
        """metrics.jsonl for appending, and the splits it holds events of at the resumed step. On resume,
        events logged after the checkpoint's step (by a run that died before its next checkpoint) are
        dropped, since they are about to be redone, and so are damaged lines (not UTF-8, not an event),
        with one warning: the events around them are kept."""
        try:
            if resumed_at is None:  # a new file, as on resume (atomic_write): never written through a link
                self.metrics.unlink(missing_ok=True)
                return open(self.metrics, "w", encoding="utf-8"), set()
            kept = []
            if self.metrics.exists():
                events, damaged = metric_events(self.metrics.read_bytes())
                kept = [(line, values) for line, values in events if values["step"] <= resumed_at]
                atomic_write(self.metrics, b"".join(line for line, _ in kept))
                if damaged:
                    warn(f"warning: {self.metrics}: {damaged} damaged line{'s' * (damaged > 1)} (not UTF-8 or not "
                         f"a JSON event) removed, the events around {'them' if damaged > 1 else 'it'} kept")
            return (open(self.metrics, "a", encoding="utf-8"),
                    {values["split"] for _, values in kept if values["step"] == resumed_at})
        except OSError as error:
            raise LmtrainError(f"cannot write {self.metrics}: {os_reason(error)}") from None


def _write(path: Path, data: bytes) -> None:
    try:
        atomic_write(path, data)
    except OSError as error:
        if not path.parent.is_dir():
            kept = "; the run folder is gone"
        elif any(path.parent.glob("*.pt")):
            kept = "; the checkpoints written before are intact"
        else:
            kept = ""  # the first checkpoint of the run: there is none to keep
        raise LmtrainError(f"could not write checkpoint {path}: {os_reason(error)}{kept}") from None


def _link_or_write(source: Path, target: Path, data: bytes) -> None:
    """Atomically make `target` the same file as `source`: a hard link renamed into place (no second
    copy on disk), or a plain atomic write where the file system has no hard links."""
    temporary = target.with_name(f".{target.name}.link")
    try:
        temporary.unlink(missing_ok=True)
        os.link(source, temporary)
        os.replace(temporary, target)
    except OSError:
        temporary.unlink(missing_ok=True)
        _write(target, data)
