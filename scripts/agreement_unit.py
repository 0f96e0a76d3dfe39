#!/usr/bin/env python
"""One unit of a model at the verb of each agreement sentence: does its value tell the subject's number?

    lmtrain visualize --checkpoint runs/quickstart/best.pt --text agreement.txt --json \\
        --layer 1 --quantity c --unit 88 > unit-88.json
    python scripts/agreement_unit.py corpora/agreement/pairs.tsv unit-88.json --sentences 400

`agreement.txt` is `scripts/agreement_features.py`'s text of the same first pairs. Prints, for singular
and plural subjects with and without an attractor (a noun of the other number between subject and verb),
the unit's mean and standard deviation at the position that predicts the verb, and how many sentences a
threshold halfway between the two means sorts by number.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from agreement_features import subject_is_plural


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", type=Path, help="corpora/agreement/pairs.tsv")
    parser.add_argument("numbers", type=Path, help="lmtrain visualize --json output with --layer/--quantity/--unit")
    parser.add_argument("--sentences", type=int, default=400, help="the first pairs, as agreement_features.py took")
    args = parser.parse_args()
    numbers = json.loads(args.numbers.read_text(encoding="utf-8"))
    shown = numbers["values"][0]
    values = shown["values"]
    rows = [line.split("\t") for line in args.pairs.read_text(encoding="utf-8").splitlines()[1:]][: args.sentences]
    groups: dict[tuple[str, str], list[float]] = {}
    at_verb = []
    for (correct, wrong, _, attractors), start in zip(rows, numbers["sequence_starts"], strict=True):
        words = correct.split()
        verb = next(i for i, (word, other) in enumerate(zip(words, wrong.split())) if word != other)
        plural = subject_is_plural(words[verb])
        value = values[start + verb]  # the position that has read `verb` words and predicts the verb
        groups.setdefault(("plural" if plural else "singular", "attractor" if int(attractors) else "none"),
                          []).append(value)
        at_verb.append((plural, value))
    print(f"layer {shown['layer']} {shown['quantity']} unit {shown['unit']} at the verb:")
    for (number, attractor), group in sorted(groups.items()):
        print(f"  {number:8} subject, {attractor:9}: {len(group):4} sentences, "
              f"{statistics.mean(group):+.2f} ± {statistics.pstdev(group):.2f}")
    plural_mean = statistics.mean(v for plural, v in at_verb if plural)
    singular_mean = statistics.mean(v for plural, v in at_verb if not plural)
    threshold = (plural_mean + singular_mean) / 2
    right = sum((value > threshold) == (plural == (plural_mean > singular_mean)) for plural, value in at_verb)
    print(f"  a threshold at {threshold:+.3f} sorts {right} of {len(at_verb)} sentences by number")


if __name__ == "__main__":
    main()
