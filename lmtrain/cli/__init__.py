"""The `lmtrain` command: parses arguments and delegates. A user's mistake ends in one line on stderr
and a non-zero exit code, never a traceback (`--debug` shows it, for bug reports).

`app` holds the command tree and the error handling every command shares; `training`, `evaluating`,
`views` and `caches` add the commands; `run` is the console script.
"""

from __future__ import annotations

import io
import os
import re
import signal
import sys

import typer

# Each module registers its commands; --help lists them in this order.
from lmtrain.cli import training  # noqa: F401

# isort: split
from lmtrain.cli import evaluating  # noqa: F401

# isort: split
from lmtrain.cli import caches, views  # noqa: F401
from lmtrain.cli.app import app, user_errors  # app: the command tree, which tests and scripts import from here
from lmtrain.config import MAX_THREADS


def drop_unusable_thread_setting(environment: dict[str, str] | os._Environ) -> str | None:
    """Remove an `OMP_NUM_THREADS` that is no thread count from 1 to MAX_THREADS (0, a word, a million)
    before torch loads: OpenMP would print its own complaint about it, or start that many threads.
    Returns the warning to print."""
    text = environment.get("OMP_NUM_THREADS")
    # Digits as OpenMP reads them: ASCII ones (Python's int() takes "２" too).
    if text is None or (re.fullmatch(r"\s*[0-9]+\s*", text) and 1 <= int(text) <= MAX_THREADS):
        return None
    del environment["OMP_NUM_THREADS"]
    return (f"warning: OMP_NUM_THREADS={text!r} is not a thread count from 1 to {MAX_THREADS}: ignored, the "
            f"threads follow the free cores")


def run() -> None:
    """Console-script entry point. A mistake on the command line (an unknown option, a missing one, a
    value of the wrong type) is one `error:` line, like every other mistake; a command group given no
    command (`lmtrain`, `lmtrain eval`) prints its help and exits 0."""
    open_standard_streams()
    if (dropped := drop_unusable_thread_setting(os.environ)) is not None:  # before torch loads OpenMP
        print(dropped, file=sys.stderr)
    code = _exit_code()
    _end_at_once_on_ctrl_c(code)
    if "lmtrain.training.distributed" in sys.modules:  # a training process may hold a process group to the end
        from lmtrain.training.distributed import end_process

        end_process(code)
    sys.exit(code)


def open_standard_streams() -> None:
    """Standard input, output and error as the command needs them. One that was closed (`>&-`) is
    /dev/null: left closed, the first file lmtrain opened would take its number, and a library's print
    would land in a checkpoint. An unbuffered output (PYTHONUNBUFFERED=1, as container images set it) is
    written through a buffer, emptied at every line end: Python's text layer drops the rest of a write
    that the system cut short (a full disk, `ulimit -f`), where the buffer writes it or raises the error
    that says so."""
    for number in (0, 1, 2):
        try:
            os.fstat(number)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
            if opened != number:
                os.dup2(opened, number)
                os.close(opened)
    for name, number in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if stream is None:  # closed when Python started
            setattr(sys, name, open(number, "w", errors="backslashreplace", closefd=False))
        elif isinstance(getattr(stream, "buffer", None), io.FileIO):
            setattr(sys, name, io.TextIOWrapper(io.BufferedWriter(stream.buffer), encoding=stream.encoding,
                                                errors=stream.errors, line_buffering=True, write_through=True))


def _end_at_once_on_ctrl_c(code: int) -> None:
    """Once the command is done, a Ctrl-C while the interpreter shuts down (torch's exit hooks) ends the
    process at once with the command's exit code, where it printed a KeyboardInterrupt traceback from
    inside a library: what the command did is done."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGINT, lambda number, frame: os._exit(code))


def _command_path(arguments: list[str]) -> str:
    """The command that `arguments` name (`lmtrain eval perplexity`), passing over a group's options."""
    command, path = typer.main.get_command(app), ["lmtrain"]
    for word in arguments:
        commands = getattr(command, "commands", None)  # a group's (click's, or the copy newer typers carry)
        if commands is None:
            break
        if word in commands:
            command = commands[word]
            path.append(word)
    return " ".join(path)


def _exit_code() -> int:
    """The command's exit code; an error raised outside any command's own handling (loading a library it
    imports, say) is one line too."""
    try:
        with user_errors():
            return _parsed_and_run()
    except typer.Exit as done:
        return done.exit_code


def _parsed_and_run() -> int:
    try:
        code = app(prog_name="lmtrain", standalone_mode=False)
    except Exception as error:  # the command-line parser's errors (click's, inside typer); the rest: user_errors
        if not (hasattr(error, "format_message") and isinstance(getattr(error, "exit_code", None), int)):
            raise
        context = getattr(error, "ctx", None)
        if type(error).__name__ == "NoArgsIsHelpError" and context is not None:
            typer.echo(context.get_help())
            return 0
        # An option's missing value comes with no context of its command: the command line names it.
        command = context.command_path if context is not None else _command_path(sys.argv[1:])
        typer.echo(f"error: {error.format_message()} (see: {command} --help)", err=True)
        return error.exit_code
    except typer.Abort:
        typer.echo("interrupted", err=True)
        return 130
    return code if isinstance(code, int) else 0
