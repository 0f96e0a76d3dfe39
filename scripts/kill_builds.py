"""Kill `lmtrain train` while it compiles the kernels, at random moments, and check that the next run
trains: the reproduction of a build that once wedged every later run, repeated.

    python scripts/kill_builds.py [--runs 10] [--seed 0] [--doc docs/running.md]

Each run starts from an empty kernel cache (its own TORCH_EXTENSIONS_DIR): `lmtrain train` on a tiny
generated corpus is sent SIGKILL or SIGHUP (alternately) after a random delay within the build (a
build takes about 25-30 s on 2 cores), and its compiler processes are left running as a real kill would
leave them; then `lmtrain train` runs again with a 300 s limit. The table shows what the cache held at
the kill, whether the second run trained, whether it said it was waiting, and how long it took.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from comparison import doc_file, positive_integer, positive_number, provenance
from doc_sections import write_section

CONFIG = ("data: {path: corpus.txt, level: char, cache: false}\n"
          "model: {cell: lstm, embed_size: 8, hidden_size: 16, num_layers: 1}\n"
          "train: {batch_size: 4, bptt: 8, max_steps: 3, eval_every: 3, final_samples: 0, device: cpu}\n")


def cache_state(root: Path) -> str:
    folder = root / "lmtrain"
    if any(folder.glob("*/*.so")):
        return "published"
    building = list(folder.glob(".building-*"))
    if not building:
        return "not started"
    made = {path.suffix for path in building[0].iterdir()}
    return "linked, not published" if ".so" in made else "compiling" if ".o" not in made else "linking"


def one_run(folder: Path, number: int, delay: float) -> dict:
    extensions = folder / "extensions"
    environment = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONWARNINGS": "ignore"}
    environment.pop("LMTRAIN_COMPILED", None)
    command = [sys.executable, "-m", "lmtrain", "train", str(folder / "config.yaml"), "--no-progress"]
    victim = subprocess.Popen([*command, f"train.out_dir={folder / 'killed'}"], env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))  # even under nohup
    time.sleep(delay)
    state = cache_state(extensions)
    victim.send_signal(number)
    victim.wait()
    began = time.monotonic()
    second = subprocess.run([*command, f"train.out_dir={folder / 'second'}"], env=environment, capture_output=True,
                            text=True, timeout=300)
    seconds = time.monotonic() - began
    try:
        os.killpg(victim.pid, signal.SIGKILL)  # the orphaned compiler, if it still runs
    except ProcessLookupError:
        pass
    return {"signal": signal.Signals(number).name, "delay": delay, "state": state,
            "trained": second.returncode == 0 and (folder / "second" / "last.pt").exists(),
            "waited": "waiting for another process" in second.stderr, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=positive_integer, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--longest-delay", type=positive_number, default=28.0)
    parser.add_argument("--doc", type=doc_file, default=None, help="write the table into this file's section "
                        "\"A build killed at any moment\"")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = []
    for index in range(args.runs):
        with tempfile.TemporaryDirectory() as name:
            folder = Path(name)
            (folder / "corpus.txt").write_text("the cat sat on the mat\nthe dog ran\n" * 40, encoding="utf-8")
            (folder / "config.yaml").write_text(CONFIG)
            number = signal.SIGKILL if index % 2 == 0 else signal.SIGHUP
            row = one_run(folder, number, round(rng.uniform(1.0, args.longest_delay), 1))
        rows.append(row)
        print(row, flush=True)
    lines = [f"`python scripts/kill_builds.py {shlex.join(sys.argv[1:])}` ({provenance()})",
             f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; each run from an empty "
             "kernel cache", "",
             "| run | signal | after s | the cache then | next run trained | it waited | next run s |",
             "|---:|---|---:|---|---|---|---:|"]
    for index, row in enumerate(rows, 1):
        lines.append(f"| {index} | {row['signal']} | {row['delay']:.1f} | {row['state']} | "
                     f"{'yes' if row['trained'] else 'NO'} | {'yes' if row['waited'] else 'no'} | "
                     f"{row['seconds']:.0f} |")
    print("\n".join(lines))
    if args.doc:
        write_section(args.doc, "A build killed at any moment", "\n".join(lines))
    if not all(row["trained"] for row in rows):
        sys.exit("some run did not train after a killed build")


if __name__ == "__main__":
    main()
