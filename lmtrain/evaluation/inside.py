"""Inside the cells: what every unit and gate of a trained model does on a text.

After Karpathy, Johnson and Fei-Fei, "Visualizing and Understanding Recurrent Networks" (2015): the
values of every unit at every step (a(t); c(t) for the LSTM; every gate), the model's next-token
guesses, how strongly each unit follows simple features of the text, and how often each gate is
saturated. `lmtrain visualize` draws them (`lmtrain.evaluation.visualize`); this module only computes.

The text is read the way `eval perplexity` reads it (`evaluation_sequences`): in stream mode as
segments of `train.eval_segment` tokens (or the whole text, `segment=0`), each from a(0) = 0; in
sentences mode each line from a(0) = 0 and x(1) = 0. Every step is the cell's own `forward`, the
lecture's equations; a σ gate is Γ = σ(W_Γ [a(t-1), x(t)] + b_Γ) of the same state and input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.functional import linear

from lmtrain.data.tokenizer import SPECIALS, ZERO_INPUT, Tokenizer
from lmtrain.errors import LmtrainError, os_reason
from lmtrain.model.cells import Cell, LSTMCell, combine
from lmtrain.model.language_model import LanguageModel

START = "<start>"  # how a position reads the lecture's x(1) = 0 at a sentence start
SATURATED = (0.1, 0.9)  # a gate below the first is left-saturated, above the second right-saturated
GUESSES = 5
GATE_NAMES = {"f": "forget gate Γ_f", "u": "update gate Γ_u", "o": "output gate Γ_o", "r": "relevance gate Γ_r"}


def quantities(cell: Cell) -> list[str]:
    """What a layer of this cell shows, by name: "a" (the output a(t)), "c" (the LSTM's memory c(t); the
    GRU's is its output), then its σ gates ("f", "u", "o"; "u", "r")."""
    return ["a", *(["c"] if isinstance(cell, LSTMCell) else []), *sigmoid_gates(cell)]


def sigmoid_gates(cell: Cell) -> list[str]:
    """The cell's gates that are σ of its state and input: all but the candidate c̃ and the RNN's own a."""
    return [gate for gate in cell.gates if gate not in ("a", "c")]


@dataclass
class Trace:
    """Every value of every layer at every position (a position: one input the model reads)."""

    tokens: list[str]                       # the token read at each position
    sequence_starts: list[int]              # the positions where a sequence starts from a(0) = 0
    values: list[dict[str, Tensor]]         # per layer: quantity -> (positions, H), float32
    guesses: list[list[tuple[str, float]]]  # per position: the top next tokens and their probabilities
    target_ids: Tensor                      # per position: the token that came next in the text
    logits: Tensor = field(repr=False)      # (positions, V): the model's output at each position
    came: list[tuple[str, float]] = field(default_factory=list)  # per position: the next token, its probability
    unknown: list[bool] = field(default_factory=list)  # per position: the token was read as <unk>


@torch.no_grad()
def trace(model: LanguageModel, tokenizer: Tokenizer, sequences: Sequence[tuple[Tensor, Tensor]],
          *, guesses: int = GUESSES) -> Trace:
    """Run `model` (its left-to-right LM, in evaluation mode) over `sequences` of (inputs, targets), each
    from a(0) = 0, step by step through each cell's `forward`, and keep everything."""
    was_training = model.training
    model.eval()
    try:
        device = model.projection.weight.device
        cells = [layer.cell for layer in model.rnn.layers]
        tokens, starts, target_ids, per_sequence = [], [], [], []
        for inputs, targets in sequences:
            starts.append(len(tokens))
            tokens.extend(START if index == ZERO_INPUT else tokenizer.tokens[index] for index in inputs.tolist())
            target_ids.append(targets)
            per_sequence.append(_run_cells(cells, model.embed(inputs.long().to(device))))
        values = [{name: torch.cat([sequence[layer][name] for sequence in per_sequence])
                   for name in per_sequence[0][layer]} for layer in range(len(cells))]
        logits = model.projection(values[-1]["a"]).float().cpu()
    finally:
        model.train(was_training)
    probabilities = logits.softmax(dim=-1)
    top = probabilities.topk(min(guesses, probabilities.size(1)), dim=-1)
    guess_lists = [[(tokenizer.tokens[index], round(float(p), 4)) for index, p in zip(row_ids, row_p)]
                   for row_ids, row_p in zip(top.indices.tolist(), top.values.tolist())]
    targets = torch.cat(target_ids).long()
    came = [(tokenizer.tokens[index], round(float(p), 4)) for index, p in
            zip(targets.tolist(), probabilities.gather(1, targets.unsqueeze(1)).squeeze(1).tolist())]
    unknown = [token == tokenizer.tokens[tokenizer.unk_id] for token in tokens]
    return Trace(tokens, starts, [{name: v.float().cpu() for name, v in layer.items()} for layer in values],
                 guess_lists, targets, logits, came, unknown)


def _run_cells(cells: list[Cell], x: Tensor) -> list[dict[str, Tensor]]:
    """Every layer over one sequence x (T, E) from a(0) = 0, by the cells' own `forward`: per layer,
    quantity -> (T, H)."""
    layers = []
    for cell in cells:
        state = cell.initial_state(1, device=x.device, dtype=x.dtype)
        outputs, states, previous = [], [], []
        for x_t in x.unsqueeze(1):                         # (1, E) each
            previous.append(state[0])
            a, state = cell(x_t, state)
            outputs.append(a)
            states.append(state)
        a_prev = torch.cat(previous)                       # (T, H): a(t-1), the GRU's c(t-1)
        layer = {"a": torch.cat(outputs)}
        if isinstance(cell, LSTMCell):
            layer["c"] = torch.cat([s[1] for s in states])
        for gate in sigmoid_gates(cell):                   # Γ = σ(W_Γ [a(t-1), x(t)] + b_Γ)
            layer[gate] = torch.sigmoid(linear(combine(a_prev, x), getattr(cell, f"W_{gate}"),
                                               getattr(cell, f"b_{gate}")))
        layers.append(layer)
        x = layer["a"]
    return layers


# -- features of the text ---------------------------------------------------------------------------------

OPENING, CLOSING = "([{", ")]}"
PTB_BRACKETS = {"-lrb-": 1, "-lsb-": 1, "-lcb-": 1, "-rrb-": -1, "-rsb-": -1, "-rcb-": -1}


def text_features(tokens: Sequence[str], *, level: str) -> dict[str, list[float]]:
    """Simple features of the text at each position (after reading its token), for finding the units
    that follow them. `<eos>`, a sentence start (`START`) and, for data.eos: none, "\\n" end a line.
    Character level: inside double quotes; inside brackets ( [ { and their depth; position in the line;
    characters left to the line end; start of a word. Word level: position in the sentence; words left
    to its end; inside quotes and brackets."""
    line_ends = [token in ("<eos>", START, "\n") for token in tokens]  # "\n": a model with data.eos: none
    position, left = _line_positions(line_ends)
    features: dict[str, list[float]] = {}
    quote = 0
    quotes = []
    depth, depths = 0, []
    for token in tokens:
        if token in SPECIALS or token == START:
            pass
        elif token in PTB_BRACKETS:  # Penn Treebank spells brackets -lrb- ... -rcb-
            depth = max(0, depth + PTB_BRACKETS[token])
        else:
            for character in token:
                if character == '"':
                    quote ^= 1
                elif character in OPENING:
                    depth += 1
                elif character in CLOSING and depth:
                    depth -= 1
        quotes.append(float(quote))
        depths.append(float(depth))
    features["inside quotes"] = quotes
    features["inside brackets"] = [float(d > 0) for d in depths]
    features["bracket depth"] = depths
    if level == "char":
        features["position in line"] = position
        features["characters to line end"] = left
        features["start of word"] = [float(_word_character(token) and (index == 0 or not _word_character(
            tokens[index - 1]))) for index, token in enumerate(tokens)]
    else:
        features["position in sentence"] = position
        features["words to sentence end"] = left
    return features


def _word_character(token: str) -> bool:
    return len(token) == 1 and (token.isalnum() or token == "'")


def _line_positions(line_ends: Sequence[bool]) -> tuple[list[float], list[float]]:
    """For every position: tokens read since the line began (0 at a line end, which begins the next
    line), and tokens left before the next line end."""
    position, count = [], 0
    for end in line_ends:
        count = 0 if end else count + 1
        position.append(float(count))
    left, count = [0.0] * len(line_ends), 0
    for index in range(len(line_ends) - 1, -1, -1):
        left[index] = float(count)
        count = 0 if line_ends[index] else count + 1
    return position, left


def read_labels(path: str, name: str, count: int) -> dict[str, list[float]]:
    """A feature the user gives, one label a line for each of the `count` positions (`lmtrain visualize
    --tokens` lists them): numbers as one feature; words as one 0/1 feature per distinct word (at most
    20); an empty line, "-" or "nan" leaves a position unlabelled."""
    try:
        with open(path, encoding="utf-8") as file:
            labels = [line.strip() for line in file.read().splitlines()]
    except OSError as error:
        raise LmtrainError(f"cannot read the feature file {path}: {os_reason(error)}") from None
    except UnicodeDecodeError:
        raise LmtrainError(f"the feature file {path} is not UTF-8 text") from None
    if len(labels) != count:
        raise LmtrainError(f"the feature file {path} has {len(labels)} labels, and the text {count} positions: one "
                           f"label a line for each (lmtrain visualize --tokens lists the positions)")
    missing = {"", "-", "nan", "NaN"}
    given = [label for label in labels if label not in missing]
    if not given:
        raise LmtrainError(f"the feature file {path} labels no position")
    try:
        numbers = [math.nan if label in missing else float(label) for label in labels]
    except ValueError:
        pass
    else:
        infinite = next((line for line, number in enumerate(numbers, 1) if math.isinf(number)), None)
        if infinite is not None:
            raise LmtrainError(f"the feature file {path} has an infinite label at line {infinite} "
                               f"({labels[infinite - 1]}): a label is a finite number, a word, or nan for none")
        return {name: numbers}
    kinds = sorted(set(given))
    if len(kinds) > 20:
        raise LmtrainError(f"the feature file {path} has {len(kinds)} different non-numeric labels; at most 20 "
                           f"(numbers are one feature)")
    return {f"{name}={kind}": [math.nan if label in missing else float(label == kind) for label in labels]
            for kind in kinds}


# -- which units follow a feature ------------------------------------------------------------------------

@dataclass(frozen=True)
class Match:
    layer: int        # 0-based
    quantity: str
    unit: int
    r: float          # Pearson correlation of the unit's values with the feature


def correlations(values: Tensor, feature: Sequence[float]) -> Tensor:
    """Pearson's r of every column of `values` (P, H) with `feature` (P values; NaN: left out), in float64;
    0 for a column or a feature that does not vary."""
    target = torch.tensor(feature, dtype=torch.float64)
    keep = ~torch.isnan(target)
    x, y = values.double()[keep], target[keep]
    if y.numel() < 3:
        return torch.zeros(values.size(1), dtype=torch.float64)
    y = y / y.abs().max().clamp(min=1e-300)  # r does not depend on the scale; labels near 1e300 would overflow
    x, y = x - x.mean(dim=0), y - y.mean()
    denominator = x.norm(dim=0) * y.norm()
    return torch.where(denominator > 0, (x * y.unsqueeze(1)).sum(dim=0) / denominator.clamp(min=1e-300),
                       torch.zeros_like(denominator))


def strongest_units(trace: Trace, feature: Sequence[float], *, count: int = 5) -> list[Match]:
    """The `count` units (over every layer and quantity) whose values follow `feature` most closely, by |r|;
    none for a feature that does not vary on the text."""
    labelled = [value for value in feature if not math.isnan(value)]
    if len(labelled) < 3 or len(set(labelled)) < 2:  # fewer than 3 points have no correlation to speak of
        return []
    found = []
    for layer, layer_values in enumerate(trace.values):
        for quantity, values in layer_values.items():
            r = correlations(values, feature)
            for unit in r.abs().topk(min(count, r.numel())).indices.tolist():
                found.append(Match(layer, quantity, unit, round(float(r[unit]), 4)))
    found.sort(key=lambda match: -abs(match.r))
    return found[:count]


# -- gate saturation ---------------------------------------------------------------------------------------

@dataclass
class Saturation:
    layer: int
    gate: str
    left: list[float]    # per unit: the fraction of positions with the gate below SATURATED[0]
    right: list[float]   # ... above SATURATED[1]

    def reading(self) -> str:
        """One line saying what the scatter of this gate shows."""
        units = len(self.left)
        mostly_right = sum(fraction > 0.5 for fraction in self.right)
        mostly_left = sum(fraction > 0.5 for fraction in self.left)
        free = sum(left + right < 0.1 for left, right in zip(self.left, self.right))
        name = GATE_NAMES.get(self.gate, self.gate)
        meaning = {"f": ("keep their memory", "erase it"), "u": ("write the new candidate in", "keep it out"),
                   "o": ("show their memory", "hide it"), "r": ("read the old memory", "ignore it")}.get(
                       self.gate, ("open", "closed"))
        return (f"layer {self.layer + 1}, {name}: {mostly_right} of {units} units are open (> {SATURATED[1]}) more "
                f"than half the time ({meaning[0]}), {mostly_left} closed (< {SATURATED[0]}) more than half the "
                f"time ({meaning[1]}); {free} are almost never saturated")


def saturation(trace: Trace, layers: Sequence[Cell]) -> list[Saturation]:
    """For each layer and σ gate, the fraction of positions each unit is left- and right-saturated."""
    found = []
    for layer, (cell, layer_values) in enumerate(zip(layers, trace.values)):
        for gate in sigmoid_gates(cell):
            values = layer_values[gate]
            found.append(Saturation(layer, gate, (values < SATURATED[0]).double().mean(dim=0).tolist(),
                                    (values > SATURATED[1]).double().mean(dim=0).tolist()))
    return found
