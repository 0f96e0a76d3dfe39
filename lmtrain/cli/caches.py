"""The caches a user manages by hand: `data download` and `data list` for the corpora, `kernels build`,
`status` and `clear` for the compiled kernels."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmtrain.cli.app import data_app, kernels_app, user_errors


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
