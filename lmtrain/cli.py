"""The `lmtrain` command: parses arguments and delegates. A user's mistake ends in one line on stderr
and a non-zero exit code, never a traceback (`--debug` shows it, for bug reports)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

# torch warns at import when NumPy is absent; lmtrain does not use NumPy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from lmtrain.config import INT64, MAX_THREADS  # noqa: E402
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

def _whole(value: int | None) -> int | None:
    """An integer option, refused past 64 bits, as the config's integers are: torch and the checkpoints hold
    no larger. A callback, so --help shows no range."""
    if value is not None and not INT64[0] <= value <= INT64[1]:
        raise typer.BadParameter(f"{value} is past the range of a 64-bit integer (±9.2e18)")
    return value


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


@dataclass(frozen=True)
class CommandOptions:
    """What the options before a command decide for it (click's `ctx.obj`, which every command's context
    inherits): the traceback of an error under --debug, and the other processes' load, measured from the
    start until a command that computes picks its threads (lmtrain.speed.threads.Load)."""

    debug: bool = False
    load: Load | None = None


data_app = _group("Download and list reference corpora.")
app.add_typer(data_app, name="data")
kernels_app = _group("Build, show and clear the compiled kernels.")
app.add_typer(kernels_app, name="kernels")


def _warning_printer(debug: bool) -> Callable[..., None]:
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

    warnings.showwarning = _warning_printer(debug)
    ctx.obj = CommandOptions(debug=debug, load=Load())


def _set_threads(options: CommandOptions | None) -> None:
    """The free cores as threads, for a command that computes (sample, eval, diagnose)."""
    from lmtrain.speed.threads import set_for_command

    set_for_command(load=(options or CommandOptions()).load)


# torch's words for an allocation it could not make (its allocator's, C++'s), or whose size does not fit in 64 bits.
OUT_OF_MEMORY = ("can't allocate memory", "std::bad_alloc", "Storage size calculation overflowed")


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
            typer.echo(f"error: out of memory{amount}: make the model, the batch or the number of samples smaller, "
                       f"or give the process more memory", err=True)
            raise typer.Exit(2) from None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        typer.echo(f"error: internal error {type(error).__name__}: {first_line} (rerun with lmtrain --debug ... "
                   f"for the traceback)", err=True)
        raise typer.Exit(1) from None


@app.command(short_help="Train a model from a YAML config.",
             epilog="Every config key, with its default and meaning: docs/config.md. "
                    "Overrides are dotted keys: train.lr=1e-3 model.cell=gru.")
def train(
    ctx: typer.Context,
    config: Annotated[Optional[str], typer.Argument(
        metavar="CONFIG", help="YAML config (default: configs/quickstart.yaml).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(
        metavar="KEY=VALUE", help="Overrides, e.g. model.hidden_size=256.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in train.out_dir from its last.pt.")] = False,
    allow_changed_data: Annotated[bool, typer.Option("--allow-changed-data", help="With --resume: go on even though "
                                                     "the corpus files changed since the checkpoint.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress: a bar on a terminal, a plain line every "
                                                "train.log_every steps into a file or pipe.")] = True,
    nproc: Annotated[int, typer.Option(callback=_whole, metavar="N", help="Processes on this machine, training one "
                                       "model with DDP (via torchrun); train.batch_size is their global batch.")] = 1,
) -> None:
    """Train a model; prints the resolved config, progress, validation loss and a few samples."""
    from lmtrain.config import load_config, to_yaml

    with user_errors(ctx.obj):
        overrides = list(overrides or [])
        if config is not None and "=" in config and not Path(config).exists():
            config, overrides = None, [config, *overrides]  # `lmtrain train key=value` on the default config
        path = Path(config) if config is not None else _default_config()
        with warnings.catch_warnings():
            if nproc != 1 or os.environ.get("RANK", "0") != "0":  # the config's warnings once: from process 0
                warnings.simplefilter("ignore")
            resolved = load_config(path, overrides)
        if nproc != 1:
            from lmtrain.training.distributed import launch

            flags = ((["--resume"] if resume else []) + ([] if progress else ["--no-progress"])
                     + (["--allow-changed-data"] if allow_changed_data else []))
            import torch

            on_cpu = resolved.train.device == "cpu" or (resolved.train.device == "auto"
                                                        and not torch.cuda.is_available())
            raise typer.Exit(launch(nproc, [str(path), *overrides, *flags], batch_size=resolved.train.batch_size,
                                    on_cpu=on_cpu))
        # torchrun numbers the processes it starts (RANK); the first speaks for all.
        echo = typer.echo if os.environ.get("RANK", "0") == "0" else (lambda line: None)
        from lmtrain.training.trainer import train as run_training  # torch loads only once the config is known good

        # The config is printed once the run can start (its folder taken, a resume checked), so that a
        # refused start is its one error line.
        result = run_training(resolved, resume=resume, echo=typer.echo, warn=lambda line: typer.echo(line, err=True),
                              progress_bar=progress, on_start=lambda run: echo(f"# config: {path}\n{to_yaml(run)}"),
                              allow_changed_data=allow_changed_data)
        best = result.progress.best_valid_loss
        echo(f"done: {result.progress.step} steps ({result.stopped_by}), best valid loss "
             f"{'none finite' if best is None else f'{best:.4f}'}, checkpoints in {result.out_dir}")
        if result.samples:
            from lmtrain.evaluation.sampling import printable

            echo("samples:\n" + "\n".join(map(printable, result.samples)))


@app.command(short_help="Sample sentences from a checkpoint.")
def sample(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Option(metavar="PATH", help="Checkpoint file (.pt).")],
    num: Annotated[int, typer.Option(callback=_whole, metavar="N", help="Number of samples, one a line.")] = 1,
    prime: Annotated[str, typer.Option(metavar="TEXT", help="Text to start every sample with.")] = "",
    temperature: Annotated[float, typer.Option(metavar="T", help="Softmax temperature; 0 is greedy.")] = 1.0,
    top_k: Annotated[Optional[int], typer.Option(callback=_whole,
        metavar="K", help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(
        metavar="P", help="Nucleus sampling: the smallest set reaching p.")] = None,
    max_tokens: Annotated[int, typer.Option(callback=_whole,
        metavar="M", help="Stop a sample after this many new tokens.")] = 200,
    seed: Annotated[Optional[int], typer.Option(
        metavar="S", help="Random seed: the same seed gives the same samples.")] = None,
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="cpu, cuda or cuda:N.")] = "cpu",
    raw: Annotated[bool, typer.Option("--raw", help="Print control characters (CR, ESC, a newline of a data.eos: "
                                      "none model) as they are, not escaped as \\r, \\x1b, \\n.")] = False,
) -> None:
    """Generate sentences, each until <eos> (not printed) or --max-tokens, one a line. Control characters
    are shown escaped (\\r, \\n, \\x1b, \\u202e) unless --raw."""
    from lmtrain.evaluation.sampling import printable, sample_checkpoint

    with user_errors(ctx.obj):
        _set_threads(ctx.obj)
        samples, notes = sample_checkpoint(checkpoint, num=num, prime=prime, temperature=temperature, top_k=top_k,
                                           top_p=top_p, max_tokens=max_tokens, seed=seed, device=_device(device))
        for note in notes:
            typer.echo(note, err=True)
        typer.echo("\n".join(samples if raw else map(printable, samples)))


@app.command(short_help="Show what a checkpoint holds.")
def info(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Argument(metavar="CHECKPOINT", help="Checkpoint file (.pt).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """What a checkpoint holds: model, vocabulary, progress, config, format version."""
    import yaml

    from lmtrain.checkpoint import describe

    with user_errors(ctx.obj):
        facts = describe(checkpoint)
        if as_json:
            typer.echo(json.dumps(facts))
            return
        best, seconds = facts["best_valid_loss"], facts["train_seconds"]
        typer.echo(f"{checkpoint}: lmtrain checkpoint format {facts['format_version']}\n"
                   f"model: {facts['cell']} {facts['layers']}x{facts['hidden_size']} ({facts['direction']}), "
                   f"{facts['parameters']:,} parameters\n"
                   f"vocabulary: {facts['vocab_size']:,} {facts['level']} tokens: "
                   f"{' '.join(map(repr, facts['first_tokens']))} ...\n"
                   f"trained: step {facts['step']}, {_epochs(facts['epoch_in_progress'], facts['epochs_completed'])}, "
                   f"{'?' if seconds is None else f'{seconds:.0f}'} s of training, best valid loss "
                   f"{'none' if best is None else f'{best:.4f}'}\nconfig:\n"
                   + yaml.safe_dump(facts["config"], sort_keys=False, default_flow_style=False).rstrip())


@app.command(short_help="Plot the loss curves of runs.")
def plot(
    ctx: typer.Context,
    run_dirs: Annotated[list[str], typer.Argument(metavar="RUN_DIR", help="Run folders (train.out_dir) to overlay.")],
    output: Annotated[str, typer.Option(
        "--output", "-o", metavar="FILE", help="Image file to write (PNG, SVG, PDF).")] = "curves.png",
) -> None:
    """Train and validation loss against step and wall-clock time; needs matplotlib."""
    from lmtrain.evaluation.plots import plot_runs

    with user_errors(ctx.obj):
        plot_runs(run_dirs, output, option="-o")
        typer.echo(f"wrote {output}")


@app.command(short_help="See inside the cells: units and gates on a text, as one HTML page.")
def visualize(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Option(metavar="PATH", help="Checkpoint file (.pt).")],
    text: Annotated[str, typer.Option(metavar="FILE", help="The text to read (at most --max-tokens positions).")],
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", metavar="FILE.html",
        help="The page to write (default: visualize.html, unless --json, --png or --tokens asks for other output).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as one JSON object.")] = False,
    png: Annotated[Optional[str], typer.Option(
        metavar="FILE.png", help="Draw the chosen unit over the first 600 positions into a PNG file (needs "
                                 "matplotlib).")] = None,
    layer: Annotated[Optional[int], typer.Option(callback=_whole,
        metavar="L", help="The layer shown first (and drawn by --png), from 1 (default: the top one). Without "
                          "--layer, --quantity and --unit: the unit that follows a feature most closely.")] = None,
    quantity: Annotated[Optional[str], typer.Option(
        metavar="a|c|f|u|o|r", help="a(t), the LSTM's c(t), or a gate (default: a).")] = None,
    unit: Annotated[Optional[int], typer.Option(callback=_whole,
        metavar="U", help="The unit, from 0 (default: 0).")] = None,
    feature: Annotated[Optional[list[str]], typer.Option(
        metavar="NAME=FILE", help="A feature of your own: one label a line for each position (see --tokens); "
                                  "repeatable.")] = None,
    tokens: Annotated[bool, typer.Option(
        "--tokens", help="Print the positions, one token a line, to label them for --feature.")] = False,
    segment: Annotated[Optional[int], typer.Option(callback=_whole,
        metavar="N", help="As for eval perplexity: stream mode reads segments of N tokens from a zero state "
                          "(default: the run's train.eval_segment); 0: the whole text, the state carried.")] = None,
    max_tokens: Annotated[int, typer.Option(callback=_whole,
        metavar="N", help="Read at most this many positions.")] = 10_000,
    top: Annotated[int, typer.Option(callback=_whole, metavar="N", help="Units listed per feature.")] = 5,
    all_values: Annotated[bool, typer.Option("--all-values", help="With --json: every unit's values, not only "
                                             "the chosen unit's and the listed ones'.")] = False,
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """What each unit and gate does on a text (Karpathy, Johnson and Fei-Fei 2015): the text coloured by any
    unit with the model's next-token guesses, the units that follow features of the text, and the gates'
    saturation, in one HTML file that works offline."""
    from lmtrain.evaluation import visualize as view
    from lmtrain.files import check_output

    with user_errors(ctx.obj):
        if max_tokens < 1:
            raise LmtrainError(f"--max-tokens must be >= 1; got {max_tokens}")
        if top < 1:
            raise LmtrainError(f"--top must be >= 1; got {top}")
        if segment is not None and segment < 0:
            raise LmtrainError(f"--segment must be >= 0 (0: the whole text as one stream); got {segment}")
        if tokens and (output is not None or as_json or png is not None):
            raise LmtrainError("--tokens prints the positions and nothing else: leave out -o, --json and --png")
        if all_values and not as_json:
            raise LmtrainError("--all-values goes with --json")
        labels = {}
        for given in feature or []:
            name, separator, path = given.partition("=")
            if not separator or not name or not path:
                raise LmtrainError(f"--feature takes NAME=FILE; got {given!r}")
            if name in labels:
                raise LmtrainError(f"--feature {name} is given twice")
            labels[name] = path
        page_path = output if output is not None else None if as_json or png or tokens else "visualize.html"
        for option, path, suffixes in (("-o", page_path, (".html", ".htm")), ("--png", png, (".png",))):
            if path is not None:  # before the work, and before either is written
                check_output(option, path, suffixes=suffixes, inputs=[text, *labels.values()])
        _set_threads(ctx.obj)
        inside = view.look_inside(checkpoint, text, features=labels, segment=segment, max_positions=max_tokens,
                                  top=top, device=_device(device), layer=layer, quantity=quantity, unit=unit)
        for note in inside.notes:
            typer.echo(note, err=True)
        if tokens:
            typer.echo("\n".join(view.printable_token(token) for token in inside.trace.tokens))
            return
        chosen = inside.chosen
        if png is not None:
            view.unit_png(inside, chosen, png)
        if page_path is not None:
            view.write_page(page_path, view.page(inside, chosen, title=f"Inside {Path(checkpoint).name} on "
                                                                      f"{Path(text).name}"))
        if as_json:
            listed = [view.Unit(m.layer + 1, m.quantity, m.unit) for ms in inside.matches.values() for m in ms]
            typer.echo(json.dumps(view.as_json(inside, [chosen, *listed], all_values=all_values)))
            return
        count = len(inside.trace.tokens)
        typer.echo(f"{inside.description}: {count:,} position{'s' * (count != 1)}")
        for name, matches in inside.matches.items():
            typer.echo(f"  {name}: " + (f"layer {matches[0].layer + 1} {matches[0].quantity} unit {matches[0].unit}, "
                                        f"r = {matches[0].r:+.3f}" if matches else view.NOT_VARYING))
        for written in (page_path, png):
            if written is not None:
                typer.echo(f"wrote {written}")


@eval_app.command(short_help="Loss, perplexity and bits per character.")
def perplexity(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Option(metavar="PATH", help="Checkpoint file (.pt).")],
    data: Annotated[Optional[str], typer.Option(
        metavar="FILE", help="Text file to score, - for standard input (default: the checkpoint corpus's "
                             "--split).")] = None,
    split: Annotated[Optional[str], typer.Option(
        metavar="valid|test", help="valid or test split of the checkpoint's corpus (default: valid).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(callback=_whole,
        metavar="N", help="Sequences scored at once (the result does not depend on it).")] = None,
    segment: Annotated[Optional[int], typer.Option(callback=_whole,
        metavar="N", help="Stream mode: score in segments of this many tokens, each from a zero state (default: "
                          "the run's train.eval_segment); 0: the whole text as one stream, the state carried "
                          "throughout.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Loss (nats/token), perplexity and, for character models, bits per character; every token counted."""
    from lmtrain.evaluation.perplexity import evaluate_checkpoint
    from lmtrain.files import strict_json

    with user_errors(ctx.obj):
        if split is not None and split not in ("valid", "test"):
            raise LmtrainError(f"--split must be valid or test; got {split!r}")
        if split is not None and data is not None:
            raise LmtrainError("give --data FILE or --split, not both: --data scores that file instead of a split")
        if batch_size is not None and batch_size < 1:
            raise LmtrainError(f"--batch-size must be >= 1; got {batch_size}")
        if segment is not None and segment < 0:
            raise LmtrainError(f"--segment must be >= 0 (0: the whole text as one stream); got {segment}")
        _set_threads(ctx.obj)
        if data == "-":
            data = "/dev/stdin"
        numbers, notes = evaluate_checkpoint(checkpoint, data_file=data, split=split or "valid", batch_size=batch_size,
                                             device=_device(device), segment=segment)
        for note in notes:
            typer.echo(note, err=True)
        typer.echo(json.dumps(strict_json(numbers)) if as_json
                   else "  ".join(_format(key, value) for key, value in numbers.items()))


@diagnose_app.command(short_help="The vanishing gradient, measured.")
def gradients(
    ctx: typer.Context,
    checkpoint: Annotated[Optional[str], typer.Option(metavar="PATH", help="A trained checkpoint (.pt).")] = None,
    config: Annotated[Optional[str], typer.Option(
        metavar="CONFIG.yaml", help="Or a config: measure its freshly initialised model.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(
        metavar="KEY=VALUE", help="Overrides for --config.", show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option(
        metavar="FILE", help="Text to draw windows from (default: the validation split).")] = None,
    length: Annotated[int, typer.Option(callback=_whole, metavar="T", help="Window length T.")] = 64,
    count: Annotated[int, typer.Option(callback=_whole, metavar="N", help="Number of windows averaged.")] = 32,
    seed: Annotated[int, typer.Option(callback=_whole,
        metavar="S", help="Seed for choosing the windows.")] = 0,
    plot: Annotated[Optional[str], typer.Option(
        metavar="FILE.png", help="Also save a plot (PNG, SVG or PDF; needs matplotlib).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """The vanishing gradient: ‖∂L(T)/∂a(t)‖ of the top layer against the distance T - t."""
    from lmtrain.evaluation.diagnose import gradient_report, plot_rows
    from lmtrain.evaluation.plots import FIGURE_SUFFIXES
    from lmtrain.files import check_output

    with user_errors(ctx.obj):
        if plot is not None:  # before the measurement
            check_output("--plot", plot, suffixes=FIGURE_SUFFIXES)
        _set_threads(ctx.obj)
        description, rows = gradient_report(checkpoint=checkpoint, config_path=config, overrides=overrides or [],
                                            data_file=data, length=length, count=count, seed=seed)
        if plot is not None:
            plot_rows({description.split(": ", 1)[-1].split(",")[0]: rows}, plot)  # labelled e.g. "lstm 2x256"
        if as_json:
            typer.echo(json.dumps({"model": description, "rows": rows}))
            return
        typer.echo(f"{description}\n{'T - t':>6}  {'norm':>10}  {'relative':>10}")
        for row in rows:
            typer.echo(f"{row['distance']:>6}  {row['norm']:>10.3e}  {row['relative']:>10.3e}")
        if plot is not None:
            typer.echo(f"wrote {plot}")


@eval_app.command(short_help="Subject-verb agreement on minimal pairs.")
def agreement(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Option(metavar="PATH", help="Checkpoint file (.pt).")],
    data: Annotated[Optional[str], typer.Option(metavar="FILE", help="Minimal pairs: good<TAB>bad lines, JSON lines "
                                                "with "
                                                "sentence_good and sentence_bad (as BLiMP ships them), or lmtrain's "
                                                "TSV (default: corpora/agreement/pairs.tsv).")] = None,
    group_by: Annotated[Optional[str], typer.Option(metavar="FIELD", help="JSON lines only (refused for a TSV): the "
                                                    "field to group the report by (default: the first of phenomenon, "
                                                    "linguistics_term, UID, field).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Minimal pairs (Linzen et al. 2016's agreement, or a suite such as BLiMP): how often the model finds the
    good sentence more probable; a pair that scores the same both ways is a tie and counts neither way."""
    from lmtrain.evaluation.agreement import agreement_report, format_report

    with user_errors(ctx.obj):
        _set_threads(ctx.obj)
        report = agreement_report(checkpoint, data_file=data, device=_device(device), group_by=group_by)
        if report["unknown_tokens"]:
            typer.echo(f"warning: {report['unknown_tokens']} of {report['tokens']} tokens are scored as <unk>",
                       err=True)
        if report["ties_same_sentence"]:
            typer.echo(f"warning: {report['ties_same_sentence']} of {report['count']} pairs have the same sentence "
                       f"on both sides, as the model reads it; they count as ties", err=True)
        typer.echo(json.dumps(report) if as_json else format_report(report))


@data_app.command("download", short_help="Download a corpus into the cache.")
def data_download(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="tinyshakespeare or ptb")],
    directory: Annotated[Optional[Path], typer.Option(
        "--dir", metavar="DIR", help="Cache folder (default $LMTRAIN_CACHE, else $XDG_CACHE_HOME/lmtrain, else "
                                     "~/.cache/lmtrain).")] = None,
    base_url: Annotated[Optional[str], typer.Option(
        "--base-url", metavar="URL", help="Mirror holding each file under its public URL's path.")] = None,
) -> None:
    """Download a corpus into the cache: resumable, verified by sha256."""
    from lmtrain.data.corpora import download

    with user_errors(ctx.obj):
        # A bar on a terminal only: into a file or a pipe its carriage returns are noise.
        for path in download(name, directory=directory, base_url=base_url, progress=sys.stderr.isatty()):
            typer.echo(str(path))


@data_app.command("list", short_help="The known corpora and whether they are cached.")
def data_list(
    ctx: typer.Context,
    directory: Annotated[Optional[Path], typer.Option("--dir", metavar="DIR", help="Cache folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """The known corpora, their files, and whether they are cached."""
    from lmtrain.data.corpora import listing

    with user_errors(ctx.obj):
        rows = listing(directory=directory)
        if as_json:
            typer.echo(json.dumps(rows))
            return
        for row in rows:
            other = (f"  (not the corpus's: {', '.join(row['other'])}; lmtrain data download {row['name']} "
                     f"replaces {'them' if len(row['other']) > 1 else 'it'})" if row["other"] else "")
            typer.echo(f"{row['name']:<16} {'cached' if row['cached'] else 'not cached':<11} "
                       f"{', '.join(row['files'])}  "
                       f"{row['path']}{other}")


@kernels_app.command("build", short_help="Compile the kernels now.")
def kernels_build(ctx: typer.Context) -> None:
    """Compile the kernels now, e.g. while building a container image that later runs read-only; prints
    their folder. Tries again after a failed build."""
    from lmtrain.speed.kernels import build_now

    with user_errors(ctx.obj):
        typer.echo(build_now(announce=lambda line: typer.echo(line, err=True)))


@kernels_app.command("status", short_help="Whether and where the kernels are built.")
def kernels_status(ctx: typer.Context,
                   as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False) -> None:
    """Whether this lmtrain's kernels are built, where, and every build in the cache (all versions)."""
    from lmtrain.speed.kernels import status, status_lines

    with user_errors(ctx.obj):
        facts = status()
        typer.echo(json.dumps(facts) if as_json else "\n".join(status_lines(facts)))


@kernels_app.command("clear", short_help="Remove every build from the cache.")
def kernels_clear(ctx: typer.Context) -> None:
    """Remove every build from the cache (all versions; not one being built right now)."""
    from lmtrain.speed.kernels import clear

    with user_errors(ctx.obj):
        typer.echo("\n".join(clear()))


def _epochs(in_progress: int | None, completed: int | None) -> str:
    """`info`'s words for where a run stands in its epochs."""
    if in_progress is None and completed:
        return f"{completed} epoch{'s' * (completed != 1)} completed"
    return f"epoch {in_progress or 1} in progress ({completed or 0} completed)"


def _format(key: str, value: float | int) -> str:
    return f"{key} {value:,}" if isinstance(value, int) else f"{key} {value:.4f}"


def _device(name: str) -> str:
    """`--device` of sample and eval: the CPU unless CUDA is asked for (and present)."""
    from lmtrain.checkpoint import usable_device

    return str(usable_device(name, "--device"))


def _default_config() -> Path:
    if not DEFAULT_CONFIG.exists():
        raise LmtrainError("no config given and the bundled configs/quickstart.yaml is not installed here; "
                           "pass a config file: lmtrain train CONFIG.yaml")
    return DEFAULT_CONFIG


def drop_unusable_thread_setting(environment: dict[str, str] | os._Environ) -> str | None:
    """Remove an `OMP_NUM_THREADS` that is no thread count from 1 to MAX_THREADS (0, a word, a million)
    before torch loads: OpenMP would print its own complaint about it, or start that many threads.
    Returns the warning to print."""
    text = environment.get("OMP_NUM_THREADS")
    if text is None or (text.strip().isdecimal() and 1 <= int(text) <= MAX_THREADS):
        return None
    del environment["OMP_NUM_THREADS"]
    return (f"warning: OMP_NUM_THREADS={text!r} is not a thread count from 1 to {MAX_THREADS}: ignored, the "
            f"threads follow the free cores")


def run() -> None:
    """Console-script entry point. A mistake on the command line (an unknown option, a missing one, a
    value of the wrong type) is one `error:` line, like every other mistake; a command group given no
    command (`lmtrain`, `lmtrain eval`) prints its help and exits 0."""
    if (dropped := drop_unusable_thread_setting(os.environ)) is not None:  # before torch loads OpenMP
        print(dropped, file=sys.stderr)
    code = _exit_code()
    _end_at_once_on_ctrl_c(code)
    if "lmtrain.training.distributed" in sys.modules:  # a training process may hold a process group to the end
        from lmtrain.training.distributed import end_process

        end_process(code)
    sys.exit(code)


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
    try:
        code = app(prog_name="lmtrain", standalone_mode=False)
    except LmtrainError as error:  # raised before a command's user_errors (an eager option: --version)
        typer.echo(error_line(error), err=True)
        return getattr(error, "exit_code", None) or 2
    except Exception as error:  # the command-line parser's errors (click's, inside typer)
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


if __name__ == "__main__":
    sys.exit(run())
