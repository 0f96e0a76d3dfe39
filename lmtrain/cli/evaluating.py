"""The commands that read a checkpoint and print numbers or text: `sample`, `info`, `eval perplexity`,
`eval agreement` and `diagnose gradients`."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from lmtrain.cli.app import app, check_segment, chosen_device, diagnose_app, eval_app, set_threads, user_errors, whole
from lmtrain.errors import LmtrainError


@app.command(short_help="Sample sentences from a checkpoint.")
def sample(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Option(metavar="PATH", help="Checkpoint file (.pt).")],
    num: Annotated[int, typer.Option(callback=whole, metavar="N", help="Number of samples, one a line.")] = 1,
    prime: Annotated[str, typer.Option(metavar="TEXT", help="Text to start every sample with.")] = "",
    temperature: Annotated[float, typer.Option(metavar="T", help="Softmax temperature; 0 is greedy.")] = 1.0,
    top_k: Annotated[Optional[int], typer.Option(callback=whole,
        metavar="K", help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(
        metavar="P", help="Nucleus sampling: the smallest set reaching p.")] = None,
    max_tokens: Annotated[int, typer.Option(callback=whole,
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
        set_threads(ctx.obj)
        samples, notes = sample_checkpoint(checkpoint, num=num, prime=prime, temperature=temperature, top_k=top_k,
                                           top_p=top_p, max_tokens=max_tokens, seed=seed, device=chosen_device(device))
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


@eval_app.command(short_help="Loss, perplexity and bits per character.")
def perplexity(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Option(metavar="PATH", help="Checkpoint file (.pt).")],
    data: Annotated[Optional[str], typer.Option(
        metavar="FILE", help="Text file to score, - for standard input (default: the checkpoint corpus's "
                             "--split).")] = None,
    split: Annotated[Optional[str], typer.Option(
        metavar="valid|test", help="valid or test split of the checkpoint's corpus (default: valid).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(callback=whole,
        metavar="N", help="Sequences scored at once (the result does not depend on it, up to float rounding).")] = None,
    segment: Annotated[Optional[int], typer.Option(callback=whole,
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
        if data == "":
            raise LmtrainError("--data needs a file name (or - for standard input)")
        if split is not None and data is not None:
            raise LmtrainError("give --data FILE or --split, not both: --data scores that file instead of a split")
        if batch_size is not None and batch_size < 1:
            raise LmtrainError(f"--batch-size must be >= 1; got {batch_size}")
        check_segment(segment)
        set_threads(ctx.obj)
        if data == "-":
            data = "/dev/stdin"
        numbers, notes = evaluate_checkpoint(checkpoint, data_file=data, split=split or "valid", batch_size=batch_size,
                                             device=chosen_device(device), segment=segment)
        for note in notes:
            typer.echo(note, err=True)
        typer.echo(json.dumps(strict_json(numbers)) if as_json
                   else "  ".join(_format(key, value) for key, value in numbers.items()))


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
        set_threads(ctx.obj)
        report = agreement_report(checkpoint, data_file=data, device=chosen_device(device), group_by=group_by)
        if report["unknown_tokens"]:
            typer.echo(f"warning: {report['unknown_tokens']} of {report['tokens']} tokens are scored as <unk>",
                       err=True)
        if report["ties_same_sentence"]:
            typer.echo(f"warning: {report['ties_same_sentence']} of {report['count']} pairs have the same sentence "
                       f"on both sides, as the model reads it; they count as ties", err=True)
        typer.echo(json.dumps(report) if as_json else format_report(report))


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
    length: Annotated[int, typer.Option(callback=whole, metavar="T", help="Window length T.")] = 64,
    count: Annotated[int, typer.Option(callback=whole, metavar="N", help="Number of windows averaged.")] = 32,
    seed: Annotated[int, typer.Option(callback=whole,
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
            check_output("--plot", plot, suffixes=FIGURE_SUFFIXES,
                         inputs=[path for path in (checkpoint, config, data) if path is not None])
        set_threads(ctx.obj)
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


def _epochs(in_progress: int | None, completed: int | None) -> str:
    """`info`'s words for where a run stands in its epochs."""
    if in_progress is None and completed:
        return f"{completed} epoch{'s' * (completed != 1)} completed"
    return f"epoch {in_progress or 1} in progress ({completed or 0} completed)"


def _format(key: str, value: float | int) -> str:
    return f"{key} {value:,}" if isinstance(value, int) else f"{key} {value:.4f}"
