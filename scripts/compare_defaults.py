"""A config that sets only the data keys (what a user writes from docs/config.md) against the
gallery's tuned config for the same corpus, at equal steps: how much the defaults leave on the table.

    python scripts/compare_defaults.py PATH/TO/tinyshakespeare/input.txt [--steps 1000]
        [--quickstart-steps 5000] [--doc docs/results.md]

Two corpora: the bundled one (corpora/agreement, word level, one sentence a line) against
configs/quickstart.yaml, and Tiny Shakespeare (character level, stream) against
configs/tinyshakespeare-char.yaml. Each is trained with the defaults (`model.init: auto`, which is
torch.nn's initialisation with the default optimizer, Adam), with the defaults lmtrain had before
(`model.init: zaremba`, `model.forget_bias: 1`), and with the gallery config (which names its own
initialisation), each for the same number of steps (the gallery's own step or time limit replaced by
it), one process at a time, and scored once at the end on the whole validation split.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from comparison import ROOT, doc_file, positive_integer, provenance, run_lmtrain, text_file
from doc_sections import write_section

OLD_DEFAULTS = ["model.init=zaremba", "model.forget_bias=1.0"]


def data_only_config(folder: Path, data: dict[str, str]) -> str:
    path = folder / f"defaults-{len(list(folder.iterdir()))}.yaml"
    path.write_text("data:\n" + "".join(f"  {key}: {value}\n" for key, value in data.items()), encoding="utf-8")
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tinyshakespeare", type=text_file, help="Tiny Shakespeare's input.txt")
    parser.add_argument("--steps", type=positive_integer, default=1000, help="Tiny Shakespeare steps")
    parser.add_argument("--quickstart-steps", type=positive_integer, default=5000,
                        help="bundled corpus steps (the quickstart's)")
    parser.add_argument("--doc", type=doc_file, default=None, help="write the table into this file's section "
                        "\"What the defaults learn\"")
    args = parser.parse_args()
    agreement = ROOT / "corpora" / "agreement"
    rows = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        corpora = [
            ("bundled corpus, word level", args.quickstart_steps, "configs/quickstart.yaml", [],
             {"train": agreement / "train.txt", "valid": agreement / "valid.txt", "test": agreement / "test.txt",
              "level": "word", "mode": "sentences"}),
            ("Tiny Shakespeare, character level", args.steps, "configs/tinyshakespeare-char.yaml",
             [f"data.path={args.tinyshakespeare.resolve()}", "train.max_seconds=null"],
             {"path": args.tinyshakespeare.resolve(), "level": "char"})]
        for corpus, steps, gallery, gallery_settings, data in corpora:
            limits = [f"train.max_steps={steps}", "train.max_seconds=null", "train.max_epochs=null"]
            defaults = data_only_config(folder, data)
            variants = [("data keys only (the defaults)", defaults, limits),
                        ("data keys only, with init: zaremba and forget_bias: 1", defaults,
                         limits + OLD_DEFAULTS),
                        (f"`{gallery}`", str(ROOT / gallery), gallery_settings + limits)]
            results = {}
            for label, config, settings in variants:
                result = run_lmtrain(config, settings, [], folder / f"run-{len(rows)}-{len(results)}")
                results[label] = result
                print(f"{corpus}: {label}: valid {result['valid_loss']:.4f} after {result['steps']} steps", flush=True)
            tuned = results[variants[-1][0]]["valid_loss"]
            rows += [(corpus, steps, label, result["valid_loss"], result["valid_loss"] / tuned)
                     for label, result in results.items()]
    lines = [f"`python scripts/compare_defaults.py {shlex.join(sys.argv[1:])}` ({provenance()})", "",
             "| corpus | steps | config | valid loss (nats/token) | / the gallery config's |",
             "|---|---:|---|---:|---:|"]
    lines += [f"| {corpus} | {steps:,} | {label} | {loss:.4f} | {ratio:.3f} |"
              for corpus, steps, label, loss, ratio in rows]
    print("\n".join(lines))
    if args.doc:
        write_section(args.doc, "What the defaults learn", "\n".join(lines))


if __name__ == "__main__":
    main()
