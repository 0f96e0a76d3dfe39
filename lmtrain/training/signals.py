"""Stopping cleanly: while training, SIGINT (Ctrl-C) and SIGTERM finish the current step; the loop then
writes last.pt and raises `TrainingInterrupted`, whose exit code says which signal it was."""

from __future__ import annotations

import signal
import threading

from lmtrain.errors import LmtrainError


class TrainingInterrupted(LmtrainError):
    """SIGINT or SIGTERM arrived; `last.pt` was written. `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """While training, SIGINT and SIGTERM only set a flag; the loop stops after the current step. A
    second signal stops at once, if `second_stops_at_once`."""

    def __init__(self, *, second_stops_at_once: bool = True) -> None:
        self.signal: int | None = None
        self.second_stops_at_once = second_stops_at_once
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: object) -> None:
        if self.signal is not None and self.second_stops_at_once:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = number

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def interrupted(self, signal_number: int, *, step: int, written: str, resume_command: str) -> TrainingInterrupted:
        """The error that ends a run stopped by `signal_number` at `step`, `written` saved."""
        return TrainingInterrupted(f"stopped by {signal.Signals(signal_number).name} at step {step:,}; {written} "
                                   f"written; continue with: {resume_command}", 128 + signal_number)
