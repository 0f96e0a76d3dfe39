"""The command tree and what every command shares: plain help, the options before a command, and the
one place that turns an error into one line on stderr and an exit code."""

from __future__ import annotations

import errno
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer

# torch warns at import when NumPy is absent; lmtrain does not use NumPy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from lmtrain.config import INT64  # noqa: E402
from lmtrain.errors import LmtrainError, error_line, os_reason  # noqa: E402

if TYPE_CHECKING:
    from lmtrain.speed.threads import Load


def _group(help: str, **options) -> typer.Typer:
    """A command group with plain help (flags as `--flag / --no-flag`, values named by their metavar, no
    boxes): it reads the same in a terminal, a pipe and a log."""
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                       context_settings={"help_option_names": ["-h", "--help"]}, **options)


app = _group("Train recurrent language models (RNN, GRU, LSTM) and sample text from them.", add_completion=True)
eval_app = _group("Evaluate a checkpoint: perplexity, agreement.")
app.add_typer(eval_app, name="eval")
diagnose_app = _group("Look inside a model: the lecture's points, measured.")
app.add_typer(diagnose_app, name="diagnose")
data_app = _group("Download and list reference corpora.")
app.add_typer(data_app, name="data")
kernels_app = _group("Build, show and clear the compiled kernels.")
app.add_typer(kernels_app, name="kernels")


def whole(value: int | None) -> int | None:
    """An integer option, refused past 64 bits, as the config's integers are: torch and the checkpoints hold
    no larger. A callback, so --help shows no range."""
    if value is not None and not INT64[0] <= value <= INT64[1]:
        raise typer.BadParameter(f"{value} is past the range of a 64-bit integer (±9.2e18)")
    return value


@dataclass(frozen=True)
class CommandOptions:
    """What the options before a command decide for it (click's `ctx.obj`, which every command's context
    inherits): the traceback of an error under --debug, and the other processes' load, measured from the
    start until a command that computes picks its threads (lmtrain.speed.threads.Load)."""

    debug: bool = False
    load: Load | None = None


def warning_printer(debug: bool) -> Callable[..., None]:
    """`warnings.showwarning` printing a Python warning (torch's, a library's) as one `warning:` line, the
    way lmtrain's own read; its source file and line only under --debug."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message).strip().splitlines()
        where = f" ({filename}:{lineno})" if debug else ""
        print(f"warning: {text[0] if text else category.__name__}{where}", file=file or sys.stderr)
    return show


def _version(value: bool) -> None:
    if not value:
        return
    import torch

    import lmtrain
    from lmtrain.speed.kernels import state

    kernels = state()  # a few words, never a traceback: the cache can be another user's
    typer.echo(f"lmtrain {lmtrain.__version__}, torch {torch.__version__}, compiled kernels: "
               f"{'in use' if kernels == 'built' else kernels}")
    raise typer.Exit(0)


@app.callback()
def main(ctx: typer.Context,
         debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")] = False,
         version: Annotated[bool, typer.Option("--version", help="Show lmtrain's and torch's versions and whether the "
                                               "compiled kernels are in use, and exit.", is_eager=True,
                                               callback=_version)] = False) -> None:
    from lmtrain.speed.threads import Load

    warnings.showwarning = warning_printer(debug)
    ctx.obj = CommandOptions(debug=debug, load=Load())


def set_threads(options: CommandOptions | None) -> None:
    """The free cores as threads, for a command that computes (sample, eval, diagnose)."""
    from lmtrain.speed.threads import set_for_command

    set_for_command(load=(options or CommandOptions()).load)


def chosen_device(name: str) -> str:
    """`--device` of sample and eval: the CPU unless CUDA is asked for (and present)."""
    from lmtrain.checkpoint import usable_device

    return str(usable_device(name, "--device"))


def check_segment(segment: int | None) -> None:
    """`--segment` of eval perplexity and visualize: a length of stream segments, or 0 for one stream."""
    if segment is not None and segment < 0:
        raise LmtrainError(f"--segment must be >= 0 (0: the whole text as one stream); got {segment}")


# torch's words for an allocation it could not make (its allocator's, C++'s), or whose size does not fit in 64 bits,
# and the loader's for a library it had no room to map (ulimit -v).
OUT_OF_MEMORY = ("can't allocate memory", "std::bad_alloc", "Storage size calculation overflowed",
                 "failed to map segment")


def _out_of_memory(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from or while handling (a C extension's SystemError
    over a MemoryError), is an allocation that failed: the chain a traceback would show."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, MemoryError) or any(words in str(error) for words in OUT_OF_MEMORY):
            return True
        seen.add(id(error))
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return False


@contextmanager
def user_errors(options: CommandOptions | None = None) -> Iterator[None]:
    """Turn errors into one line on stderr and an exit code: 2 for a user's mistake, 1 for a bug; with
    `options.debug`, the traceback before it."""
    debug = options is not None and options.debug
    try:
        yield
    except typer.Exit:
        raise
    except LmtrainError as error:
        if debug:
            traceback.print_exc()
        if not error.quiet:  # quiet: a distributed training printed it already, or another process does
            typer.echo(error_line(error), err=True)
        raise typer.Exit(getattr(error, "exit_code", None) or 2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except BrokenPipeError:
        # The reader went away (`lmtrain sample ... | head`): stop quietly, as Unix tools do on SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
    except Exception as error:  # noqa: BLE001 - the last line of defence against tracebacks
        if debug:
            traceback.print_exc()
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            # A write with no file of lmtrain's own to name: the output (`> /dev/full`, a full disk under it).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            typer.echo(f"error: cannot write the output: {os_reason(error)}", err=True)
            raise typer.Exit(2) from None
        if _out_of_memory(error):
            # A size past what this process may allocate (ulimit -v, a container's limit) got through the
            # checks of physical memory: name the resource, not an internal error.
            tried = re.search(r"allocate (\d+) bytes", str(error))
            amount = f" (it asked for {int(tried.group(1)) / 1e9:,.1f} GB)" if tried else ""
            remedy = ("no room to load torch's libraries; give the process more memory (ulimit -v, a container's "
                      "limit)" if isinstance(error, ImportError) else "make the model, the batch or the number of "
                      "samples smaller, or give the process more memory")
            typer.echo(f"error: out of memory{amount}: {remedy}", err=True)
            raise typer.Exit(2) from None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        typer.echo(f"error: internal error {type(error).__name__}: {first_line} (rerun with lmtrain --debug ... "
                   f"for the traceback)", err=True)
        raise typer.Exit(1) from None
