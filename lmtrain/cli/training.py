"""`lmtrain train`: a config and its overrides, one process or several (DDP), the run's summary."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from lmtrain.cli.app import app, user_errors, whole
from lmtrain.errors import LmtrainError

if TYPE_CHECKING:
    from lmtrain.config import Config

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


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
    nproc: Annotated[int, typer.Option(callback=whole, metavar="N", help="Processes on this machine, training one "
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
        if not resume:
            _check_not_written_over(path, resolved)
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
        echo(f"done: {result.progress.step:,} steps ({result.stopped_by}), best valid loss "
             f"{'none finite' if best is None else f'{best:.4f}'}, checkpoints in {result.out_dir}")
        if result.samples:
            from lmtrain.evaluation.sampling import printable

            echo("samples:\n" + "\n".join(map(printable, result.samples)))


def _default_config() -> Path:
    if not DEFAULT_CONFIG.exists():
        raise LmtrainError("no config given and the bundled configs/quickstart.yaml is not installed here; "
                           "pass a config file: lmtrain train CONFIG.yaml")
    return DEFAULT_CONFIG


def _check_not_written_over(path: Path, config: Config) -> None:
    """Refuse a new run whose config file is the `config.yaml` it is about to write in `train.out_dir`,
    when that file is the user's own: its comments and relative paths would be gone. A run's own
    config.yaml (a run stopped before its first checkpoint), the resolved config as lmtrain writes it,
    may be read back, with overrides too."""
    from lmtrain.config import load_config, to_yaml
    from lmtrain.files import same_file

    if not same_file(path, Path(config.train.out_dir) / "config.yaml"):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said once already, by the load with the overrides
            as_written = to_yaml(load_config(path))
    except LmtrainError:  # not a whole config without the overrides: no file lmtrain wrote
        as_written = None
    if path.read_text(encoding="utf-8", errors="replace") != as_written:
        raise LmtrainError(f"{path} is the config.yaml a run writes in train.out_dir {config.train.out_dir}: "
                           f"it would be replaced by the resolved config; keep the config outside train.out_dir or "
                           f"choose another train.out_dir")
