"""The compiled time loops with the per-step product's two register tiles, alternating in one job.

    python scripts/compare_tiles.py [--repeats 7] [--revision REV] [--sizes JSON] [--doc docs/benchmarks.md]

Builds lmtrain/speed/csrc/kernels.cpp with this CPU's flags (`lmtrain.speed.kernels.spec()`): as lmtrain
builds it (tiles of 6 rows by 32 columns with AVX-512, 12 sums; 4 rows by 16 columns with AVX2) and,
with AVX-512, with `-DLMTRAIN_SMALL_TILES` (AVX2's 4 by 16), and with `--revision` also the kernels of that git
revision (`git show REV:lmtrain/speed/csrc/...`), each into a folder of its own under the system's
temporary folder. Then times the RNN's and the LSTM's forward and backward loops alone (the recurrent
products and gate arithmetic of every step; no products over all steps, no Python) at each size
(B, T, H) of `--sizes` (default SIZES), the builds alternating, and prints medians, each build's time
against lmtrain's, and the loops' rate in GFLOP/s of their recurrent products (2 flops a multiply-add).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from comparison import allocator_settings, cpu_name, doc_file, layer_sizes, positive_integer, run_child
from doc_sections import write_section
from torch.utils.cpp_extension import load

from lmtrain.speed import kernels

SIZES = ((32, 64, 128), (20, 35, 200), (64, 128, 256), (64, 128, 512), (1, 256, 512))
ROOT = Path(__file__).resolve().parent.parent


def build(name: str, source: Path, defines: list[str]):
    spec = kernels.spec()
    folder = Path(tempfile.gettempdir()) / f"lmtrain-compare-tiles-{name}"
    folder.mkdir(exist_ok=True)
    return load(name=f"lmtrain_tiles_{name.replace('x', '_')}", sources=[str(source)],
                extra_cflags=[*spec.cflags, *defines], extra_ldflags=list(spec.ldflags), build_directory=str(folder))


CSRC = kernels.SOURCE.parent.relative_to(ROOT).as_posix()


def kernel_revision(text: str) -> str:
    """An argparse type: a git revision that has the kernels' sources, checked before any build."""
    if subprocess.run(["git", "cat-file", "-e", f"{text}:{CSRC}"], cwd=ROOT, capture_output=True).returncode:
        raise argparse.ArgumentTypeError(f"{text}: no such git revision, or no {CSRC} in it")
    return text


def sources_at(revision: str) -> Path:
    """The kernels' sources as they were at git `revision`, written to a temporary folder; their kernels.cpp."""
    folder = Path(tempfile.mkdtemp(prefix=f"lmtrain-kernels-{revision}-"))
    names = run_child(["git", "ls-tree", "--name-only", f"{revision}:{CSRC}"], cwd=ROOT).stdout.split()
    for name in names:
        source = run_child(["git", "show", f"{revision}:{CSRC}/{name}"], cwd=ROOT, text=False).stdout
        (folder / name).write_bytes(source)
    return folder / kernels.SOURCE.name


def loops(cell: str, B: int, T: int, H: int):
    """One forward and backward through time of `cell`'s compiled loops on random buffers, for a module."""
    torch.manual_seed(0)
    a, dA = torch.zeros(T + 1, B, H), torch.randn(T + 1, B, H)
    if cell == "rnn":
        z, W = torch.randn(T, B, H), torch.randn(H, H) / H ** 0.5
        return lambda module: (module.rnn_forward(z.clone(), a, W), module.rnn_backward(a, dA.clone(), W))
    gates, W = torch.randn(T, B, 4 * H), torch.randn(4 * H, H) / H ** 0.5
    c, tanh_c, dc = torch.zeros(T + 1, B, H), torch.empty(T, B, H), torch.zeros(B, H)

    def run(module):
        g = gates.clone()
        module.lstm_forward(g, a, c, tanh_c, W)
        module.lstm_backward(g, c, tanh_c, dA, dc, W)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_integer, default=7)
    parser.add_argument("--revision", type=kernel_revision, default=None,
                        help="also time the kernels of this git revision")
    parser.add_argument("--sizes", type=layer_sizes, default=SIZES, help='(B, T, H) each, e.g. "[[1, 256, 512]]"')
    parser.add_argument("--doc", type=doc_file, default=None, help="write the table into this file too")
    parser.add_argument("--title", default="The product's register tile", help="the section of --doc to write")
    args = parser.parse_args()
    native = "6x32" if kernels.spec().module.startswith("lmtrain_kernels_avx512") else "4x16"
    modules = {native: build(native, kernels.SOURCE, [])}
    if native != "4x16":
        modules["4x16"] = build("4x16", kernels.SOURCE, ["-DLMTRAIN_SMALL_TILES"])
    if args.revision:
        modules[args.revision] = build(args.revision, sources_at(args.revision), [])
    others = list(modules)[1:]
    lines = [f"`python scripts/compare_tiles.py {shlex.join(sys.argv[1:])}`".replace(" `", "`"), "",
             f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"build {kernels.spec().module}, "
             f"allocator: {allocator_settings()}; medians of {args.repeats} alternating runs", "",
             "| cell | B, T, H | " + " | ".join(f"{name} ms" for name in modules) + " | "
             + " | ".join(f"{native} / {name}" for name in others) + " | "
             + " | ".join(f"{name} GFLOP/s" for name in modules) + " |",
             "|---|---|" + "---:|" * (2 * len(modules) + len(others))]
    print("\n".join(lines), flush=True)
    for cell in ("rnn", "lstm"):
        for B, T, H in args.sizes:
            run = loops(cell, B, T, H)
            times: dict[str, list[float]] = {name: [] for name in modules}
            for module in modules.values():
                run(module)
            for _ in range(args.repeats):
                for name, module in modules.items():
                    begin = time.perf_counter()
                    run(module)
                    times[name].append(time.perf_counter() - begin)
            median = {name: statistics.median(values) for name, values in times.items()}
            flops = 2 * 2 * T * B * H * H * (4 if cell == "lstm" else 1)  # forward and backward products
            row = (f"| {cell} | {B}, {T}, {H} | " + " | ".join(f"{1e3 * median[name]:.2f}" for name in modules)
                   + " | " + " | ".join(f"{median[native] / median[name]:.2f}x" for name in others) + " | "
                   + " | ".join(f"{flops / median[name] / 1e9:.0f}" for name in modules) + " |")
            print(row, flush=True)
            lines.append(row)
    if args.doc:
        write_section(args.doc, args.title, "\n".join(lines))


if __name__ == "__main__":
    main()
