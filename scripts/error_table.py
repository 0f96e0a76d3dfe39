#!/usr/bin/env python
"""Write docs/errors.md: every case of tests/test_errors.py run through the real CLI, with the exit
code and the exact message it printed.

    python scripts/error_table.py                 # writes docs/errors.md
    python scripts/error_table.py -o /tmp/e.md    # elsewhere

The cases (files, command, expected outcome) live in tests/test_errors.py, so the test checks the
very messages this table shows. A case whose output does not (yet) meet its expectation is still
listed with what it printed, and named again under "Not yet as specified".
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_errors import CASES, RSS_BOUND_MB, WORKERS, Case, Result, check_case, command_line, run_cases  # noqa: E402

INTRO = """\
# Errors and odd input

What `lmtrain` does with bad or unusual input. A mistake ends in **one line on stderr** that starts
with `error:` and names the file, key or option, and a non-zero exit code; never a traceback. Odd
input that can be handled is handled, with at most a `warning:` line on stderr.

This file is generated: `python scripts/error_table.py` runs every case of
[`tests/test_errors.py`](../tests/test_errors.py) through the real CLI (`python -m lmtrain ...`, each
in a fresh folder) and writes what it printed. `pytest tests/test_errors.py` checks the same cases.

## Exit codes

| Code | Meaning |
|---|---|
| 0 | done (possibly with `warning:` lines on stderr) |
| 1 | a bug in lmtrain: `error: internal error <Type>: ... (rerun with lmtrain --debug ... for the traceback)` |
| 2 | a mistake in the input: a file, a config key or value, an option, a checkpoint |
| 130 | interrupted (Ctrl-C outside training) |
| 128 + N | training stopped by signal N (SIGINT: 130, SIGTERM: 143) after writing `last.pt`; `--resume` continues |

`lmtrain --debug COMMAND ...` prints the full traceback before the `error:` line (for bug reports);
the exit code stays the same.

## Policies

- **Text encoding.** Corpora are read as `data.encoding` (default UTF-8) and strictly: bytes that do
  not decode are an error naming the file and the byte offset of the first bad byte.
  `data.encoding_errors: replace` reads them as U+FFFD instead. Config files are always UTF-8.
- **Byte-order mark and CRLF.** A leading UTF-8 byte-order mark is dropped and CRLF line ends are read
  as LF, in corpora and in config files: neither `\\ufeff` nor `\\r` becomes a token (a lone `\\r` that is
  not followed by `\\n` is kept as a character).
- **Tokens unseen in training** (words at word level, characters at character level, including
  characters such as `é` or `☃` in evaluation data or in `--prime`) are mapped to `<unk>` (id 0), never
  dropped and never an error. `lmtrain eval perplexity` scores and counts them (so perplexity covers
  every token) and prints one warning with their number and rate. `lmtrain sample --prime` warns with
  their number; the prime is printed as typed, and a sampled `<unk>` prints as U+FFFD at character level
  and as `<unk>` at word level. Training warns (on stderr) when the validation or test split
  holds tokens unseen in the training split.
- **Long lines.** A corpus may be one line with no newline at all: at character level in stream mode
  a 50 MB line trains in bounded memory (the test's bound: {bound} MB of peak RSS){long_line}.
- **Checkpoints** are read with `torch.load(weights_only=True)` only: a file holding Python objects
  (a pickle that would run code) is refused, and its code never runs; a file whose parts fail their
  CRC-32, or whose weights are not finite, is refused as damaged.

## Cases

{summary}

| # | Input | Command | Exit | What lmtrain prints |
|---|---|---|---|---|
"""


def shorten(text: str, folder: Path, root: Path) -> str:
    """Absolute temporary paths -> relative to the case's folder (where the command ran)."""
    for base in {folder.resolve(), folder}:
        text = text.replace(f"{base}/", "").replace(str(base), ".")
    for base in {root.resolve(), root}:
        text = text.replace(f"{base}/", "…/")
    return text


def cell(text: str) -> str:
    """Markdown table cell: inline code with pipes escaped, and a file name's bytes that are no UTF-8
    (held by Python as lone surrogates) written as \\xNN."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def printed(case: Case, result: Result, folder: Path, root: Path) -> str:
    """The message column: stderr, one line each; for a run that works, what it ends with."""
    stderr = shorten(result.stderr.strip(), folder, root)
    lines = stderr.splitlines()
    if "Traceback" in stderr:
        frames = sum(1 for line in lines if line.lstrip().startswith("File "))
        return f"{cell(lines[0])} … ({len(lines)} lines, {frames} frames) … {cell(lines[-1])}"
    parts = [cell(line) for line in lines]
    if result.returncode == 0:
        stdout = shorten(result.stdout, folder, root)
        done = [line for line in stdout.splitlines() if line.startswith("done:")]
        if done:
            parts.append(f"stdout ends: {cell(done[-1])}")
        elif not parts:
            parts.append(f"stdout: {cell(stdout.strip().splitlines()[0] if stdout.strip() else '')}")
        if case.max_rss_mb is not None and result.max_rss_kb is not None:
            parts.append(f"peak RSS {result.max_rss_kb / 1024:.0f} MB (bound {case.max_rss_mb} MB)")
    if case.note:
        parts.append(f"checked: {case.note}")
    return "<br>".join(parts) if parts else "(nothing)"


def expectation(case: Case) -> str:
    if case.outcome == "ok":
        wanted = "exit 0" + (f", a warning naming {', '.join(map(repr, case.expect))}" if case.expect else
                             ", nothing on stderr")
    elif case.outcome == "debug":
        wanted = f"a traceback, then `error:` naming {', '.join(map(repr, case.expect))}, exit {case.exit_code}"
    else:
        wanted = f"exit {case.exit_code}, one `error:` line naming {', '.join(map(repr, case.expect))}"
    if case.forbid:
        wanted += f" and not {', '.join(map(repr, case.forbid))}"
    return wanted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "errors.md")
    parser.add_argument("-j", "--jobs", type=int, default=WORKERS, help="commands run at once")
    options = parser.parse_args()

    from lmtrain.data.encoding import LONG_LINE

    long_line = (f"; `data.split` cuts at line ends,\n  and inside a line only when that line is longer "
                 f"than {LONG_LINE:,} characters")

    begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmtrain-errors-") as scratch:
        root = Path(scratch)
        futures = run_cases(CASES, root, workers=options.jobs)
        rows, gaps = [], []
        for number, case in enumerate(CASES, 1):
            result = futures[case.name].result()
            folder = root / case.name
            try:
                check_case(case, result, folder)
                mark = ""
            except AssertionError as error:
                mark = " ⚠"
                reason = str(error).splitlines()[0]
                gaps.append(f"- **{case.name}** (row {number}): expected {expectation(case)}; "
                            f"{shorten(reason, folder, root)}")
            rows.append(f"| {number} | {case.what}{mark} | {cell(command_line(case))} | {result.returncode} | "
                        f"{printed(case, result, folder, root)} |")
            print(f"{case.name:40} exit {result.returncode}{'  NOT AS SPECIFIED' if mark else ''}", file=sys.stderr)
    count = {outcome: sum(case.outcome == outcome for case in CASES) for outcome in ("error", "ok", "debug")}
    summary = (f"{len(CASES)} cases: {count['error']} mistakes that end in one `error:` line, {count['ok']} odd "
               f"inputs that work (possibly with a warning) and {count['debug']} with `--debug`. Paths are shown "
               f"relative to the folder each command ran in; *checked* names what the test verifies besides "
               f"the exit code and the message.")
    text = INTRO.format(long_line=long_line, summary=summary, bound=RSS_BOUND_MB) + "\n".join(rows) + "\n"
    if gaps:
        text += ("\n## Not yet as specified\n\nRows marked ⚠ print what is shown above, which is not yet what "
                 "the test expects:\n\n" + "\n".join(gaps) + "\n")
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_bytes(text.encode("utf-8"))  # encoded first: a text that cannot be leaves the page whole
    print(f"wrote {options.output} ({len(CASES)} cases, {len(gaps)} not as specified, "
          f"{time.perf_counter() - begin:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
