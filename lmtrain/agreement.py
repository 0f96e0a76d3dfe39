"""Subject-verb agreement on minimal pairs (Linzen, Dupoux & Goldberg 2016, "Assessing the ability of
LSTMs to learn syntax-sensitive dependencies"): does the model prefer "the cats , which ... , were
full ." to "... was full ."? The pair differs only in the main verb, and attractors (nouns of the
other number between subject and verb) are the hard cases.

The model is credited when the correct sentence has the higher whole-sentence log-probability, every
token and `<eos>` counted. The prefix before the verb is identical, so this compares
log p(verb | prefix) plus the verb's effect on the rest of the sentence; Linzen et al. compare at the
verb alone. The whole sentence is the simpler, model-agnostic choice (it is what perplexity scores).
A `direction: bi` model is scored by its forward LM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import lmtrain
from lmtrain.checkpoint import load_model
from lmtrain.data import length_sorted_batches, pad_batch
from lmtrain.errors import LmtrainError
from lmtrain.model import LanguageModel
from lmtrain.tokenizer import ZERO_INPUT, Tokenizer, read_text, split_lines

HEADER = ("correct", "wrong", "distance", "attractors")
DEFAULT_PAIRS = Path(lmtrain.__file__).resolve().parent.parent / "corpora" / "agreement" / "pairs.tsv"
DISTANCE_BUCKETS = (("0", 0, 0), ("1-2", 1, 2), ("3-5", 3, 5), ("6-10", 6, 10), ("11+", 11, None))
ATTRACTOR_BUCKETS = (("0", 0, 0), ("1", 1, 1), ("2", 2, 2), ("3+", 3, None))
BATCH_SIZE = 64


@dataclass(frozen=True)
class Pair:
    correct: str
    wrong: str
    distance: int      # words between the subject's head noun and the verb
    attractors: int    # nouns of the other number among them


def read_pairs(path: str | Path) -> list[Pair]:
    """The pairs of a tab-separated file whose header is `correct wrong distance attractors`."""
    lines = split_lines(read_text(path))
    if not lines or tuple(lines[0].split("\t")) != HEADER:
        raise LmtrainError(f"{path}: the first line must be the header {' <tab> '.join(HEADER)}")
    pairs = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 4 or not fields[0].strip() or not fields[1].strip() \
                or not all(field.isdigit() for field in fields[2:]):
            raise LmtrainError(f"{path}: line {number}: expected 4 tab-separated fields: correct sentence, wrong "
                               f"sentence, distance and attractors as whole numbers >= 0")
        pairs.append(Pair(fields[0], fields[1], int(fields[2]), int(fields[3])))
    if not pairs:
        raise LmtrainError(f"{path}: no pairs after the header")
    return pairs


@torch.no_grad()
def sentence_log_probability(model: LanguageModel, tokenizer: Tokenizer, sentences: list[str], *,
                             sentence_start: bool, batch_size: int = BATCH_SIZE,
                             device: torch.device | str = "cpu") -> list[float]:
    """log p(sentence) of each sentence: the sum over its tokens and `<eos>`, each read from a zero
    state with x(1) = 0 (`sentence_start`, sentence-mode models) or after an `<eos>` (stream models)."""
    first = ZERO_INPUT if sentence_start else tokenizer.eos_id
    encoded = [tokenizer.encode(sentence.replace("\n", " ")) for sentence in sentences]
    if any(not ids for ids in encoded):
        raise LmtrainError("cannot score an empty sentence")
    sequences = [(torch.tensor([first, *ids[:-1]]), torch.tensor(ids)) for ids in encoded]
    was_training = model.training
    model.eval()
    totals = [0.0] * len(sentences)
    for batch in length_sorted_batches([len(ids) for ids in encoded], batch_size):
        inputs, targets = pad_batch([sequences[index] for index in batch])         # (B, T)
        logits, _ = model(inputs.to(device))                                       # (B, T, V)
        log_p = logits.double().log_softmax(-1)
        mask = targets >= 0                                                        # padding is IGNORE
        picked = log_p.gather(-1, targets.clamp(min=0).unsqueeze(-1).to(device)).squeeze(-1)
        for row, total in zip(batch, (picked * mask.to(device)).sum(1).tolist()):
            totals[row] = total
    model.train(was_training)
    return totals


def accuracy_by(pairs: list[Pair], right: list[bool], key: str,
                buckets: tuple[tuple[str, int, int | None], ...]) -> dict[str, tuple[float | None, int]]:
    """{bucket label: (accuracy, count)} over `pairs` grouped by `key`; accuracy None for no pairs."""
    table = {}
    for label, low, high in buckets:
        hits = [ok for pair, ok in zip(pairs, right)
                if low <= getattr(pair, key) and (high is None or getattr(pair, key) <= high)]
        table[label] = (sum(hits) / len(hits) if hits else None, len(hits))
    return table


def agreement_report(checkpoint: str | Path, data_file: str | Path | None = None,
                     device: str = "cpu") -> dict:
    """`lmtrain eval agreement`: accuracy on the minimal pairs, overall, by distance and by attractors."""
    if data_file is None:
        if not DEFAULT_PAIRS.exists():
            raise LmtrainError(f"the bundled {DEFAULT_PAIRS.relative_to(DEFAULT_PAIRS.parents[2])} is not "
                               f"installed here; pass a pairs file with --data")
        data_file = DEFAULT_PAIRS
    pairs = read_pairs(data_file)
    model, tokenizer, config = load_model(checkpoint, device)
    sentence_start = config.data.mode == "sentences"
    correct = sentence_log_probability(model, tokenizer, [pair.correct for pair in pairs],
                                       sentence_start=sentence_start, device=device)
    wrong = sentence_log_probability(model, tokenizer, [pair.wrong for pair in pairs],
                                     sentence_start=sentence_start, device=device)
    right = [good > bad for good, bad in zip(correct, wrong)]  # a tie counts as wrong
    unknown, total = tokenizer.count_unknown("\n".join(pair.correct for pair in pairs))
    return {"accuracy": sum(right) / len(right), "count": len(right), "unknown_tokens": unknown,
            "tokens": total, "by_distance": accuracy_by(pairs, right, "distance", DISTANCE_BUCKETS),
            "by_attractors": accuracy_by(pairs, right, "attractors", ATTRACTOR_BUCKETS)}


def format_report(report: dict) -> str:
    """A small text table: overall accuracy, then one row per distance and attractor bucket."""
    def cell(accuracy: float | None) -> str:
        return "-" if accuracy is None else f"{accuracy:.4f}"

    lines = [f"accuracy {cell(report['accuracy'])}  pairs {report['count']:,}", "",
             f"{'words between':<14}{'accuracy':>10}{'pairs':>8}"]
    lines += [f"{label:<14}{cell(accuracy):>10}{count:>8,}" for label, (accuracy, count) in report["by_distance"].items()]
    lines += ["", f"{'attractors':<14}{'accuracy':>10}{'pairs':>8}"]
    lines += [f"{label:<14}{cell(accuracy):>10}{count:>8,}" for label, (accuracy, count) in report["by_attractors"].items()]
    return "\n".join(lines)
