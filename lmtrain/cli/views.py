"""The commands that draw: `plot`'s loss curves of runs and `visualize`'s page of the cells' units and
gates on a text."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from lmtrain.cli.app import app, check_segment, chosen_device, set_threads, user_errors, whole
from lmtrain.errors import LmtrainError

if TYPE_CHECKING:
    from lmtrain.evaluation.visualize import Inside


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
    layer: Annotated[Optional[int], typer.Option(callback=whole,
        metavar="L", help="The layer shown first (and drawn by --png), from 1 (default: the top one). Without "
                          "--layer, --quantity and --unit: the unit that follows a feature most closely.")] = None,
    quantity: Annotated[Optional[str], typer.Option(
        metavar="a|c|f|u|o|r", help="a(t), the LSTM's c(t), or a gate (default: a).")] = None,
    unit: Annotated[Optional[int], typer.Option(callback=whole,
        metavar="U", help="The unit, from 0 (default: 0).")] = None,
    feature: Annotated[Optional[list[str]], typer.Option(
        metavar="NAME=FILE", help="A feature of your own: one label a line for each position (see --tokens); "
                                  "repeatable.")] = None,
    tokens: Annotated[bool, typer.Option(
        "--tokens", help="Print the positions, one token a line, to label them for --feature.")] = False,
    segment: Annotated[Optional[int], typer.Option(callback=whole,
        metavar="N", help="As for eval perplexity: stream mode reads segments of N tokens from a zero state "
                          "(default: the run's train.eval_segment); 0: the whole text, the state carried.")] = None,
    max_tokens: Annotated[int, typer.Option(callback=whole,
        metavar="N", help="Read at most this many positions.")] = 10_000,
    top: Annotated[int, typer.Option(callback=whole, metavar="N", help="Units listed per feature.")] = 5,
    all_values: Annotated[bool, typer.Option("--all-values", help="With --json: every unit's values, not only "
                                             "the chosen unit's and the listed ones'.")] = False,
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """What each unit and gate does on a text (Karpathy, Johnson and Fei-Fei 2015): the text coloured by any
    unit with the model's next-token guesses, the units that follow features of the text, and the gates'
    saturation, in one HTML file that works offline."""
    from lmtrain.evaluation import visualize as view
    from lmtrain.files import check_output, printable_name

    with user_errors(ctx.obj):
        if not text:
            raise LmtrainError("--text needs a file name")
        if max_tokens < 1:
            raise LmtrainError(f"--max-tokens must be >= 1; got {max_tokens}")
        if top < 1:
            raise LmtrainError(f"--top must be >= 1; got {top}")
        check_segment(segment)
        if tokens and (output is not None or as_json or png is not None):
            raise LmtrainError("--tokens prints the positions and nothing else: leave out -o, --json and --png")
        if all_values and not as_json:
            raise LmtrainError("--all-values goes with --json")
        labels = _feature_files(feature or [])
        page_path = output if output is not None else None if as_json or png or tokens else "visualize.html"
        for option, path, suffixes in (("-o", page_path, (".html", ".htm")), ("--png", png, (".png",))):
            if path is not None:  # before the work, and before either is written
                check_output(option, path, suffixes=suffixes, inputs=[checkpoint, text, *labels.values()])
        set_threads(ctx.obj)
        inside = view.look_inside(checkpoint, text, features=labels, segment=segment, max_positions=max_tokens,
                                  top=top, device=chosen_device(device), layer=layer, quantity=quantity, unit=unit)
        for note in inside.notes:
            typer.echo(note, err=True)
        if tokens:
            typer.echo("\n".join(view.printable_token(token) for token in inside.trace.tokens))
            return
        chosen = inside.chosen
        if png is not None:
            view.unit_png(inside, chosen, png)
        if page_path is not None:
            view.write_page(page_path, view.page(inside, chosen, title=f"Inside {printable_name(checkpoint)} on "
                                                                      f"{printable_name(text)}"))
        if as_json:
            listed = [view.Unit(m.layer + 1, m.quantity, m.unit) for ms in inside.matches.values() for m in ms]
            typer.echo(json.dumps(view.as_json(inside, [chosen, *listed], all_values=all_values)))
            return
        typer.echo("\n".join([*_summary(inside), *(f"wrote {written}" for written in (page_path, png)
                                                     if written is not None)]))


def _feature_files(given: list[str]) -> dict[str, str]:
    """`--feature NAME=FILE` options as {name: file}, each name once."""
    labels: dict[str, str] = {}
    for item in given:
        name, separator, path = item.partition("=")
        if not separator or not name or not path:
            raise LmtrainError(f"--feature takes NAME=FILE; got {item!r}")
        if name in labels:
            raise LmtrainError(f"--feature {name} is given twice")
        labels[name] = path
    return labels


def _summary(inside: Inside) -> list[str]:
    """What `visualize` prints without --json: the text's positions, and for each feature the unit that
    follows it most closely."""
    from lmtrain.evaluation.visualize import NOT_VARYING

    count = len(inside.trace.tokens)
    lines = [f"{inside.description}: {count:,} position{'s' * (count != 1)}"]
    for name, matches in inside.matches.items():
        best = matches[0] if matches else None
        lines.append(f"  {name}: " + (f"layer {best.layer + 1} {best.quantity} unit {best.unit}, r = {best.r:+.3f}"
                                      if best is not None else NOT_VARYING))
    return lines
