"""`lmtrain visualize`: the numbers of `lmtrain.evaluation.inside` as one self-contained HTML page (the
text coloured by any unit, the model's guesses under every token, the units that follow features of
the text, the gates' saturation), as JSON for scripts, and as a PNG of one unit for papers and slides.

The page embeds everything (no network, no CDN): each layer's values as one 8-bit code per unit and
position, scaled to the unit's own range, decoded only when shown. The JSON holds the exact values.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmtrain.checkpoint import load_model
from lmtrain.data.tokenizer import UNK, ZERO_INPUT, Tokenizer, model_remedy, read_text
from lmtrain.errors import LmtrainError, os_reason
from lmtrain.evaluation.inside import (
    SATURATED,
    START,
    Match,
    Saturation,
    Trace,
    quantities,
    read_labels,
    saturation,
    strongest_units,
    text_features,
    trace,
)
from lmtrain.evaluation.perplexity import WHOLE_TEXT, evaluation_sequences
from lmtrain.files import printable_name, writing_output

if TYPE_CHECKING:
    from lmtrain.config import Config
    from lmtrain.model.language_model import LanguageModel

MAX_POSITIONS = 10_000
# Dots of the saturation plots, by layer: not the text's red and blue, which mean high and low.
LAYER_COLOURS = ("#333333", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00")


@dataclass(frozen=True)
class Unit:
    layer: int      # 1-based, as the lecture's a^[l]
    quantity: str   # "a", "c" or a gate
    unit: int       # 0-based index into the layer's vector


@dataclass
class Inside:
    """What `lmtrain visualize` found in one model on one text."""
    description: str
    level: str
    trace: Trace
    features: dict[str, list[float]]
    matches: dict[str, list[Match]]
    saturation: list[Saturation]
    quantities: list[str]
    hidden_size: int
    user_features: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # warnings for the user: unknown tokens, a text cut short
    chosen: Unit | None = None  # the unit to show first (`look_inside`)


def look_inside(checkpoint: str, text_file: str, *, features: dict[str, str] | None = None, segment: int | None = None,
                max_positions: int = MAX_POSITIONS, top: int = 5, device: str = "cpu",
                layer: int | None = None, quantity: str | None = None, unit: int | None = None) -> Inside:
    """Load the checkpoint, read the text as `eval perplexity` does (`segment` as its --segment), trace
    at most `max_positions` positions, and find the units that follow each feature (the text's own and
    `features`: name -> a file of one label a position). The unit to show (`Inside.chosen`): the one
    named by `layer`, `quantity` and `unit` (what is left out: the top layer, its a(t), unit 0), refused
    before the text is read if the model has none such; none named, the one that follows a feature best."""
    model, tokenizer, config = load_model(checkpoint, device)
    cells = [cell_layer.cell for cell_layer in model.rnn.layers]
    named = None
    if (layer, quantity, unit) != (None, None, None):
        named = Unit(len(cells) if layer is None else layer, quantity or "a", unit or 0)
        check_unit(named, layers=len(cells), quantities=quantities(cells[0]), hidden_size=config.model.hidden_size)
    if segment is not None:
        config = replace(config, train=replace(config.train, eval_segment=segment or WHOLE_TEXT))
    if Path(text_file).is_dir():
        raise LmtrainError(f"--text {text_file} is a directory, not a file")
    text = read_text(text_file, encoding=config.data.encoding, errors=config.data.encoding_errors,
                     remedy=model_remedy(config.data.encoding))
    traced, positions = _traced_as_written(model, tokenizer, text, config, max_positions)
    if traced is None:
        raise LmtrainError(f"{text_file} holds no tokens to read")
    notes = _warnings(traced, positions, max_positions)
    found = {}  # the user's features first: they are what the user came to ask about
    for name, path in (features or {}).items():
        found.update(read_labels(path, name, len(traced.tokens)))
    user_features = list(found)
    found.update({name: values for name, values in text_features(traced.tokens, level=config.data.level).items()
                  if name not in found})
    m = config.model
    description = (f"{m.cell} {m.num_layers}x{m.hidden_size}, {config.data.level} level, {printable_name(checkpoint)}"
                   + (" (its left-to-right LM)" if m.direction == "bi" else ""))
    inside = Inside(description, config.data.level, traced, found,
                    {name: strongest_units(traced, values, count=top) for name, values in found.items()},
                    saturation(traced, cells), quantities(cells[0]), m.hidden_size, user_features, notes)
    inside.chosen = named or default_unit(inside)
    return inside


def _traced_as_written(model: LanguageModel, tokenizer: Tokenizer, text: str, config: Config, max_positions: int
                       ) -> tuple[Trace | None, int]:
    """The model's trace of the first `max_positions` positions of `text`, read as `eval perplexity`
    reads it, with its tokens and next tokens as written (the model reads a token it never saw as <unk>);
    and how many positions the whole text holds. None for a text of no tokens."""
    text = text[: max_positions * 64]  # a token is at most a few dozen characters: only the start is read
    every = evaluation_sequences(tokenizer, text, config)
    sequences = _first_positions(every, max_positions)
    if not sequences:
        return None, 0
    traced = trace(model, tokenizer, sequences)
    # The same positions in a vocabulary of every token of the text, to show and measure the text as written.
    written = Tokenizer.fit(text, level=config.data.level, eos=config.data.eos)
    shown = _first_positions(evaluation_sequences(written, text, config), max_positions)
    traced.tokens = [START if index == ZERO_INPUT else written.tokens[index]
                     for inputs, _ in shown for index in inputs.tolist()]
    traced.came = [(written.tokens[index], p) for (_, p), index in
                   zip(traced.came, torch.cat([targets for _, targets in shown]).tolist(), strict=True)]
    if len(traced.tokens) != len(traced.unknown):
        raise RuntimeError("the text as written and as the model reads it gave different positions")
    # A literal <unk> in the text (Penn Treebank's) is the model's own token, as eval perplexity counts it.
    traced.unknown = [read_as_unk and token != UNK for read_as_unk, token in zip(traced.unknown, traced.tokens)]
    return traced, sum(inputs.numel() for inputs, _ in every)


def _warnings(traced: Trace, positions: int, max_positions: int) -> list[str]:
    """What `visualize` warns of: tokens read as <unk>, and a text longer than it reads."""
    notes = []
    if unknown := sum(traced.unknown):
        share = 100 * unknown / len(traced.unknown)
        notes.append(f"warning: {unknown} of {len(traced.unknown)} positions ({share:.2f}%) read a token the model "
                     f"never saw, as <unk>; they are shown as written and marked")
    if positions > max_positions:
        unit = "position" if max_positions == 1 else "positions"
        notes.append(f"warning: the text holds more than {max_positions:,} {unit}; read the first {max_positions:,} "
                     f"(--max-tokens)")
    return notes


def _first_positions(sequences: list, limit: int) -> list:
    kept, count = [], 0
    for inputs, targets in sequences:
        if count >= limit:
            break
        kept.append((inputs[: limit - count], targets[: limit - count]))
        count += kept[-1][0].numel()
    return kept


def check_unit(unit: Unit, *, layers: int, quantities: list[str], hidden_size: int) -> None:
    """Refuse, in one line, a layer, quantity or unit a model of `layers` layers of `hidden_size` units,
    showing `quantities`, does not have."""
    if not 1 <= unit.layer <= layers:
        allowed = "1 (the model has 1 layer)" if layers == 1 else f"1 to {layers} (the model has {layers} layers)"
        raise LmtrainError(f"--layer must be {allowed}; got {unit.layer}")
    if unit.quantity not in quantities:
        raise LmtrainError(f"--quantity must be one of {', '.join(quantities)} for this cell; got {unit.quantity!r}")
    if not 0 <= unit.unit < hidden_size:
        raise LmtrainError(f"--unit must be 0 to {hidden_size - 1}; got {unit.unit}")


def default_unit(inside: Inside) -> Unit:
    """The unit the page opens on: the one that follows the user's first feature most closely, else the
    one that follows any feature most closely."""
    asked = [matches for name in inside.user_features if (matches := inside.matches[name])]
    best = asked[0][0] if asked else max(
        (match for matches in inside.matches.values() for match in matches), key=lambda m: abs(m.r),
        default=Match(len(inside.trace.values) - 1, "a", 0, 0.0))
    return Unit(best.layer + 1, best.quantity, best.unit)


def values_of(inside: Inside, unit: Unit) -> list[float]:
    return inside.trace.values[unit.layer - 1][unit.quantity][:, unit.unit].tolist()


# -- JSON ---------------------------------------------------------------------------------------------------

def as_json(inside: Inside, units: list[Unit], *, all_values: bool = False) -> dict:
    """The numbers for scripts: tokens, guesses, the strongest units per feature with their r, the gates'
    saturation with its reading, and the exact values of `units` (every unit with `all_values`)."""
    shown = [Unit(layer + 1, quantity, unit) for layer, layer_values in enumerate(inside.trace.values)
             for quantity, values in layer_values.items() for unit in range(values.size(1))] if all_values else units
    return {
        "model": inside.description, "positions": len(inside.trace.tokens), "tokens": inside.trace.tokens,
        "sequence_starts": inside.trace.sequence_starts,
        "guesses": [[[token, p] for token, p in guesses] for guesses in inside.trace.guesses],
        "came": [[token, p] for token, p in inside.trace.came], "unknown": inside.trace.unknown,
        "features": {name: [{**asdict(match), "layer": match.layer + 1} for match in matches]
                     for name, matches in inside.matches.items()},
        "saturation": [{"layer": s.layer + 1, "gate": s.gate, "left": [round(v, 4) for v in s.left],
                        "right": [round(v, 4) for v in s.right], "reading": s.reading()} for s in inside.saturation],
        "values": [{**asdict(unit), "values": values_of(inside, unit)} for unit in dict.fromkeys(shown)],
    }


# -- the page --------------------------------------------------------------------------------------------

def page(inside: Inside, opened: Unit, *, title: str) -> str:
    """One HTML file that needs nothing else: data, script and style inline."""
    layers = []
    for layer_values in inside.trace.values:
        layers.append({name: _encoded(values) for name, values in layer_values.items()})
    data = {
        "title": title, "model": inside.description, "level": inside.level, "tokens": inside.trace.tokens,
        "start": START, "guesses": inside.trace.guesses, "came": inside.trace.came,
        "unknown": [int(flag) for flag in inside.trace.unknown], "layers": layers, "quantities": inside.quantities,
        "layerColours": [LAYER_COLOURS[layer % len(LAYER_COLOURS)] for layer in range(len(inside.trace.values))],
        "hiddenSize": inside.hidden_size, "opened": asdict(opened),
        "features": [{"name": name, "units": [{**asdict(m), "layer": m.layer + 1} for m in matches]}
                     for name, matches in inside.matches.items()],
        "saturation": [{"gate": gate, "svg": _scatter([s for s in inside.saturation if s.gate == gate]),
                        "readings": [s.reading() for s in inside.saturation if s.gate == gate]}
                       for gate in dict.fromkeys(s.gate for s in inside.saturation)],
    }
    template = resources.files("lmtrain.evaluation").joinpath("visualize.html").read_text(encoding="utf-8")
    # No "<" inside the script element, so no text (a "</script>" or "<!--" in a token) can end or bend it.
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return template.replace("{{title}}", html.escape(title)).replace("{{data}}", payload)


def _encoded(values: torch.Tensor) -> dict:
    """(P, H) values as one byte per value, unit by unit (unit u's P codes together), each unit scaled to
    its own [low, high]: value = low + code / 255 * (high - low)."""
    low, high = values.min(dim=0).values, values.max(dim=0).values
    span = (high - low).clamp(min=1e-12)
    codes = ((values - low) / span * 255).round().clamp(0, 255).to(torch.uint8).t().flatten()
    data = bytearray(codes.numel())  # the bytes through a tensor over them: no NumPy needed
    if data:
        torch.frombuffer(data, dtype=torch.uint8).copy_(codes)
    return {"low": [round(v, 6) for v in low.tolist()], "high": [round(v, 6) for v in high.tolist()],
            "codes": base64.b64encode(bytes(data)).decode("ascii")}


def _scatter(gates: list[Saturation], size: int = 220) -> str:
    """The paper's saturation plot for one gate: a dot per unit at (fraction left-saturated, fraction
    right-saturated), coloured by layer; inline SVG."""
    margin, inner = 34, size - 44
    x = lambda f: margin + f * inner  # noqa: E731
    y = lambda f: 10 + (1 - f) * inner  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" role="img">',
             f'<rect x="{margin}" y="10" width="{inner}" height="{inner}" fill="none" stroke="#999"/>',
             f'<text x="{margin + inner / 2}" y="{size - 4}" font-size="10" text-anchor="middle">'
             f'fraction left-saturated (&lt; {SATURATED[0]})</text>',
             f'<text x="10" y="{10 + inner / 2}" font-size="10" text-anchor="middle" '
             f'transform="rotate(-90 10 {10 + inner / 2})">fraction right-saturated (&gt; {SATURATED[1]})</text>',
             f'<text x="{margin - 3}" y="{y(0) + 3}" font-size="9" text-anchor="end">0</text>',
             f'<text x="{margin - 3}" y="{y(1) + 8}" font-size="9" text-anchor="end">1</text>',
             f'<text x="{x(1)}" y="{y(0) + 11}" font-size="9" text-anchor="end">1</text>']
    for saturation_of_layer in gates:
        colour = LAYER_COLOURS[saturation_of_layer.layer % len(LAYER_COLOURS)]
        for left, right in zip(saturation_of_layer.left, saturation_of_layer.right):
            parts.append(f'<circle cx="{x(left):.1f}" cy="{y(right):.1f}" r="2.2" fill="{colour}" fill-opacity="0.6"/>')
    return "".join(parts) + "</svg>"


NOT_VARYING = "does not vary on the positions read (or labels fewer than 3)"


def write_page(path: str, text: str) -> None:
    """Write the page whole or not at all."""
    try:
        with writing_output(path) as handle:
            handle.write(text.encode("utf-8"))
    except OSError as error:
        raise LmtrainError(f"cannot write {path}: {os_reason(error)}") from None


# -- a picture of one unit -----------------------------------------------------------------------------------

def unit_png(inside: Inside, unit: Unit, path: str, *, positions: int = 600, columns: int = 100) -> None:
    """The first `positions` tokens coloured by one unit, as the paper's figures draw them (needs matplotlib)."""
    from lmtrain.evaluation.plots import pyplot, save_figure

    plt = pyplot()
    values = values_of(inside, unit)[:positions]
    tokens = inside.trace.tokens[:positions]
    scale = _scale(unit.quantity, values)
    cells = _layout(tokens, inside.level, columns)
    rows = max((row for row, _, _ in cells), default=0) + 1
    width = max(max((column + len(label) for _, column, label in cells), default=1), 60)
    figure = plt.figure(figsize=(width * 0.08 + 0.4, rows * 0.22 + 0.7))  # a monospace character at 8 pt
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(-0.5, width + 0.5)
    axes.set_ylim(rows + 1.2, -0.5)
    axes.axis("off")
    for (row, column, label), value in zip(cells, values):
        axes.add_patch(plt.Rectangle((column, row), max(len(label), 1), 1, color=_colour(value, scale), lw=0))
        axes.text(column + 0.05, row + 0.78, label, family="monospace", fontsize=8)
    middle = (scale[0] + scale[1]) / 2
    axes.text(0, rows + 0.9, f"layer {unit.layer}, {unit.quantity}, unit {unit.unit}: {inside.description}; "
              f"blue {scale[0]:.2f}, white {middle:.2f}, red {scale[1]:.2f}", fontsize=8, color="#444")
    save_figure(plt, figure, path, dpi=150)


def _layout(tokens: list[str], level: str, columns: int) -> list[tuple[int, int, str]]:
    """(row, column, label) for each token: lines break at `<eos>` and sentence starts, and at `columns`."""
    cells, row, column = [], 0, 0
    for token in tokens:
        label = "↵" if token == "<eos>" else "▸" if token == START else token
        width = len(label) + (level == "word")
        if token == START and column:
            row, column = row + 1, 0
        if column + width > columns:
            row, column = row + 1, 0
        cells.append((row, column, label))
        column += width
        if token == "<eos>":
            row, column = row + 1, 0
    return cells


def _scale(quantity: str, values: list[float]) -> tuple[float, float]:
    """The colour range: [0, 1] for a gate, symmetric about 0 for a(t) and c(t)."""
    if quantity not in ("a", "c"):
        return 0.0, 1.0
    largest = max((abs(v) for v in values), default=1.0) or 1.0
    return -largest, largest


def _colour(value: float, scale: tuple[float, float]) -> tuple[float, float, float]:
    """White at the middle of the scale, blue below, red above (the paper's colours)."""
    low, high = scale
    t = 0.0 if math.isnan(value) else max(-1.0, min(1.0, (2 * (value - low) / (high - low)) - 1))
    return (1.0, 1 - t * 0.75, 1 - t * 0.75) if t >= 0 else (1 + t * 0.75, 1 + t * 0.6, 1.0)


def printable_token(token: str) -> str:
    """A position's token on a line of its own (`--tokens`): whitespace named, control characters escaped."""
    from lmtrain.evaluation.sampling import printable

    return {" ": "<space>", "\t": "<tab>", "\u3000": "<ideographic space>"}.get(token, printable(token))
