#!/usr/bin/env python
"""A text and a feature file for `lmtrain visualize` on the bundled agreement corpus: does any unit carry
the number of the subject until its verb comes?

    python scripts/agreement_features.py corpora/agreement/pairs.tsv --sentences 400 \\
        --text agreement.txt --labels plural-subject.txt
    lmtrain visualize --checkpoint runs/quickstart/best.pt --text agreement.txt \\
        --feature plural-subject=plural-subject.txt -o agreement.html

The text is the correct sentence of each minimal pair, one a line. The labels follow the positions a
sentences-mode model reads (`lmtrain visualize --tokens`): for each sentence the start x(1) = 0, then
each word. A position is labelled 1 (plural subject) or 0 (singular) from the first word on, as long as
the model has yet to predict the main verb (the word where the pair differs); the start and the words
after the verb are left unlabelled ("-").
"""

from __future__ import annotations

import argparse
from pathlib import Path

SINGULAR = {"is", "was", "has", "does"}
PLURAL = {"are", "were", "have", "do"}


def subject_is_plural(verb: str) -> bool:
    """The number of a main verb of the corpus (is/are, was/were, has/have, does/do, sleeps/sleep ...)."""
    return verb in PLURAL or (verb not in SINGULAR and not verb.endswith("s"))


def labels(correct: str, wrong: str) -> tuple[list[str], list[str]]:
    """The words of the sentence, and the labels of its positions (the start, then one per word)."""
    words, other = correct.split(), wrong.split()
    verb = next(index for index, (word, swapped) in enumerate(zip(words, other)) if word != swapped)
    plural = "1" if subject_is_plural(words[verb]) else "0"
    # Position k has read k words and predicts words[k]: labelled while the verb is still to come (k <= verb).
    return words, ["-"] + [plural if k <= verb else "-" for k in range(1, len(words) + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", type=Path, help="corpora/agreement/pairs.tsv")
    parser.add_argument("--sentences", type=int, default=400, help="how many pairs to take, from the first")
    parser.add_argument("--with-attractors", action="store_true",
                        help="only pairs with a noun of the other number between subject and verb")
    parser.add_argument("--text", type=Path, required=True, help="the text file to write")
    parser.add_argument("--labels", type=Path, required=True, help="the feature file to write")
    args = parser.parse_args()
    rows = [line.split("\t") for line in args.pairs.read_text(encoding="utf-8").splitlines()[1:]]
    rows = [row for row in rows if not args.with_attractors or int(row[3]) > 0][: args.sentences]
    text, marks = [], []
    for correct, wrong, *_ in rows:
        words, sentence_labels = labels(correct, wrong)
        text.append(" ".join(words))
        marks.extend(sentence_labels)
    args.text.write_text("\n".join(text) + "\n", encoding="utf-8")
    args.labels.write_text("\n".join(marks) + "\n", encoding="utf-8")
    print(f"wrote {args.text} ({len(text)} sentences) and {args.labels} ({len(marks)} positions)")


if __name__ == "__main__":
    main()
