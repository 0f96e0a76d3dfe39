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

import json
from dataclasses import dataclass
from pathlib import Path

import torch

import lmtrain
from lmtrain.checkpoint import load_model
from lmtrain.data.dataset import length_sorted_batches, pad_batch
from lmtrain.data.tokenizer import ZERO_INPUT, Tokenizer, read_text, split_lines
from lmtrain.errors import LmtrainError
from lmtrain.model.language_model import LanguageModel

HEADER = ("correct", "wrong", "distance", "attractors")
DEFAULT_PAIRS = Path(lmtrain.__file__).resolve().parent.parent / "corpora" / "agreement" / "pairs.tsv"
DISTANCE_BUCKETS = (("0", 0, 0), ("1-2", 1, 2), ("3-5", 3, 5), ("6-10", 6, 10), ("11+", 11, None))
ATTRACTOR_BUCKETS = (("0", 0, 0), ("1", 1, 1), ("2", 2, 2), ("3+", 3, None))
BATCH_SIZE = 64
# The JSON-lines keys of published suites (BLiMP's among them), and the fields a report is grouped by,
# the first one present unless --group-by names another.
GOOD_KEYS, BAD_KEYS = ("sentence_good", "good", "correct"), ("sentence_bad", "bad", "wrong")
GROUP_KEYS = ("phenomenon", "linguistics_term", "UID", "field")


@dataclass(frozen=True)
class Pair:
    correct: str
    wrong: str
    distance: int | None = None    # words between the subject's head noun and the verb (lmtrain's TSV)
    attractors: int | None = None  # nouns of the other number among them
    group: str | None = None       # the phenomenon, from a JSON-lines suite


def read_pairs(path: str | Path, *, group_by: str | None = None) -> list[Pair]:
    """Minimal pairs in any of three forms: lmtrain's TSV (the header `correct wrong distance
    attractors`), a two-column `good<TAB>bad` file (a header row of such names is skipped), or JSON
    lines with `sentence_good` and `sentence_bad` (BLiMP's form; `good`/`bad` too), grouped by
    `group_by` or the first of GROUP_KEYS present (`group_by` is refused for a TSV)."""
    lines = split_lines(read_text(path, remedy="save the file as UTF-8"))
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise LmtrainError(f"{path}: no pairs (expected lmtrain's TSV with the header {' <tab> '.join(HEADER)}, "
                           f"good<TAB>bad lines, or JSON lines with sentence_good and sentence_bad)")
    if lines[0].lstrip().startswith("{"):
        pairs = _json_pairs(path, lines, group_by)
    elif group_by is not None:
        raise LmtrainError(f"{path}: --group-by names a field of JSON lines; a TSV of pairs has none to group by")
    elif tuple(lines[0].split("\t")) == HEADER:
        pairs = _lmtrain_pairs(path, lines)
    else:
        pairs = _plain_pairs(path, lines)
    if not pairs:
        raise LmtrainError(f"{path}: no pairs after the header")
    return pairs


def _lmtrain_pairs(path: str | Path, lines: list[str]) -> list[Pair]:
    pairs = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 4 or not fields[0].strip() or not fields[1].strip() \
                or not all(field.isdigit() for field in fields[2:]):
            raise LmtrainError(f"{path}: line {number}: expected 4 tab-separated fields: correct sentence, wrong "
                               f"sentence, distance and attractors as whole numbers >= 0")
        pairs.append(Pair(fields[0], fields[1], int(fields[2]), int(fields[3])))
    return pairs


def _plain_pairs(path: str | Path, lines: list[str]) -> list[Pair]:
    first = [field.strip().lower() for field in lines[0].split("\t")]
    start = 2 if len(first) == 2 and first[0] in GOOD_KEYS and first[1] in BAD_KEYS else 1
    pairs = []
    for number, line in enumerate(lines[start - 1:], start=start):
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise LmtrainError(f"{path}: line {number}: expected a good and a bad sentence separated by one tab "
                               f"(or lmtrain's header {' <tab> '.join(HEADER)})")
        pairs.append(Pair(fields[0], fields[1]))
    return pairs


def _json_pairs(path: str | Path, lines: list[str], group_by: str | None) -> list[Pair]:
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise LmtrainError(f"{path}: line {number}: not JSON ({getattr(error, 'msg', error)})") from None
        except RecursionError:
            raise LmtrainError(f"{path}: line {number}: nested too deeply to be a pair") from None
        good = next((record[key] for key in GOOD_KEYS if isinstance(record, dict) and key in record), None)
        bad = next((record[key] for key in BAD_KEYS if isinstance(record, dict) and key in record), None)
        if not (isinstance(good, str) and isinstance(bad, str) and good.strip() and bad.strip()):
            raise LmtrainError(f"{path}: line {number}: expected an object with the sentences sentence_good and "
                               f"sentence_bad")
        key = group_by or next((key for key in GROUP_KEYS if key in record), None)
        if group_by is not None and group_by not in record:
            raise LmtrainError(f"{path}: line {number}: no field {group_by!r} to group by (--group-by)")
        pairs.append(Pair(good, bad, group=None if key is None else str(record[key])))
    return pairs


def _encode(tokenizer: Tokenizer, sentence: str) -> list[int]:
    # One sentence is one line: a line break inside a JSON string would add an <eos> mid-sentence.
    return tokenizer.encode(sentence.replace("\n", " "))


def _tokens(tokenizer: Tokenizer, sentence: str) -> list[str]:
    """The sentence as the tokenizer splits it, before the vocabulary maps unknown tokens to `<unk>`."""
    sentence = sentence.replace("\n", " ")
    return sentence.split() if tokenizer.level == "word" else list(sentence)


def tie_reason(tokenizer: Tokenizer, pair: Pair) -> str | None:
    """Why the model cannot tell a pair's sentences apart: "same" when they are the same tokens (the same
    sentence, or one that differs only in spacing for a word model), "unknown" when they differ only in
    tokens outside the vocabulary, which all read as `<unk>`; None when their ids differ."""
    if _tokens(tokenizer, pair.correct) == _tokens(tokenizer, pair.wrong):
        return "same"
    return "unknown" if _encode(tokenizer, pair.correct) == _encode(tokenizer, pair.wrong) else None


@torch.no_grad()
def sentence_log_probability(model: LanguageModel, tokenizer: Tokenizer, sentences: list[str], *,
                             sentence_start: bool, batch_size: int = BATCH_SIZE,
                             device: torch.device | str = "cpu") -> list[float]:
    """log p(sentence) of each sentence: the sum over its tokens and `<eos>`, each read from a zero
    state with x(1) = 0 (`sentence_start`, sentence-mode models) or after an `<eos>` (stream models)."""
    first = ZERO_INPUT if sentence_start else tokenizer.eos_id
    encoded = [_encode(tokenizer, sentence) for sentence in sentences]
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


def accuracy_by(pairs: list[Pair], outcomes: list[bool | None], key: str,
                buckets: tuple[tuple[str, int, int | None], ...]) -> dict[str, tuple[float | None, int]]:
    """{bucket label: (accuracy, pairs)} over the pairs that are not ties, grouped by `key`; accuracy
    None where a bucket has none."""
    table = {}
    for label, low, high in buckets:
        hits = [ok for pair, ok in zip(pairs, outcomes) if ok is not None
                and low <= getattr(pair, key) and (high is None or getattr(pair, key) <= high)]
        table[label] = (sum(hits) / len(hits) if hits else None, len(hits))
    return table


def accuracy_by_group(pairs: list[Pair], outcomes: list[bool | None]) -> dict[str, tuple[float | None, int]]:
    groups: dict[str, list[bool]] = {}
    for pair, ok in zip(pairs, outcomes):
        groups.setdefault(pair.group, [])
        if ok is not None:
            groups[pair.group].append(ok)
    return {group: (sum(hits) / len(hits) if hits else None, len(hits)) for group, hits in sorted(groups.items())}


def agreement_report(checkpoint: str | Path, data_file: str | Path | None = None, device: str = "cpu",
                     group_by: str | None = None) -> dict:
    """`lmtrain eval agreement`: how often the model finds the correct sentence of a pair more probable.

    A pair whose two sentences score the same is a tie, neither right nor wrong: most often they differ
    only in words the model does not know, which both become <unk>. `accuracy` is over the other pairs
    (`scored`); the report counts the ties, those whose two sentences are the same as the model reads
    them (`ties_same_sentence`) and those that differ only in unknown words (`ties_unknown_words`). By
    distance and attractors for lmtrain's TSV, by group for a suite that names its phenomena."""
    if data_file is None:
        if not DEFAULT_PAIRS.exists():
            raise LmtrainError(f"the bundled {DEFAULT_PAIRS.relative_to(DEFAULT_PAIRS.parents[2])} is not "
                               f"installed here; pass a pairs file with --data")
        data_file = DEFAULT_PAIRS
    pairs = read_pairs(data_file, group_by=group_by)
    model, tokenizer, config = load_model(checkpoint, device)
    sentence_start = config.data.mode == "sentences"
    correct = sentence_log_probability(model, tokenizer, [pair.correct for pair in pairs],
                                       sentence_start=sentence_start, device=device)
    wrong = sentence_log_probability(model, tokenizer, [pair.wrong for pair in pairs],
                                     sentence_start=sentence_start, device=device)
    reasons = [tie_reason(tokenizer, pair) for pair in pairs]
    # Same ids are a tie even where batching leaves the two sums a rounding error apart.
    outcomes = [None if reason or good == bad else good > bad for reason, good, bad in zip(reasons, correct, wrong)]
    scored = [ok for ok in outcomes if ok is not None]
    unknown, total = tokenizer.count_unknown("\n".join(pair.correct + "\n" + pair.wrong for pair in pairs))
    report = {"accuracy": sum(scored) / len(scored) if scored else None, "scored": len(scored), "count": len(pairs),
              "ties": len(pairs) - len(scored), "ties_same_sentence": reasons.count("same"),
              "ties_unknown_words": reasons.count("unknown"), "unknown_tokens": unknown, "tokens": total}
    if all(pair.distance is not None for pair in pairs):
        report["by_distance"] = accuracy_by(pairs, outcomes, "distance", DISTANCE_BUCKETS)
        report["by_attractors"] = accuracy_by(pairs, outcomes, "attractors", ATTRACTOR_BUCKETS)
    if any(pair.group is not None for pair in pairs):
        report["by_group"] = accuracy_by_group(pairs, outcomes)
    return report


def _tie_reasons(report: dict) -> str:
    """" (N of them ...; M of them ...)" for the ties that the tokens explain, or "" where none do."""
    reasons = [f"{report[key]:,} of them {text}" for key, text in (
        ("ties_same_sentence", "have the same sentence on both sides, as the model reads it"),
        ("ties_unknown_words", "differ only in words the model does not know")) if report.get(key)]
    return f" ({'; '.join(reasons)})" if reasons else ""


def format_report(report: dict) -> str:
    """A small text table: the accuracy over the pairs that differ, the ties, then one row per distance,
    attractor or group bucket that holds pairs."""
    def cell(accuracy: float | None) -> str:
        return "-" if accuracy is None else f"{accuracy:.4f}"

    lines = [f"accuracy {cell(report['accuracy'])}  pairs {report['scored']:,}"
             + (f" of {report['count']:,}" if report["ties"] else "")]
    if report["ties"]:
        lines.append(f"ties: {report['ties']:,} pairs score the same and count neither way{_tie_reasons(report)}")
    for key, title in (("by_distance", "words between"), ("by_attractors", "attractors"), ("by_group", "group")):
        rows = [(label, accuracy, count) for label, (accuracy, count) in report.get(key, {}).items() if count]
        if rows:
            width = max(14, *(len(str(label)) + 2 for label, _, _ in rows))
            lines += ["", f"{title:<{width}}{'accuracy':>10}{'pairs':>8}"]
            lines += [f"{label:<{width}}{cell(accuracy):>10}{count:>8,}" for label, accuracy, count in rows]
    return "\n".join(lines)
