"""Benchmark lmtrain's recurrent layers against torch.nn's, one training step at a time.

    python scripts/bench_cells.py [--cells rnn gru gru-lecture gru-simplified lstm] [--repeats 9] [--device cpu]
        [--sizes JSON] [--doc docs/benchmarks.md] [--title TITLE]

(`--doc` writes the table as the section "Layers against torch.nn" of that file, or "... on a GPU", or
TITLE.) "lmtrain manual" is the hand-written backward as `lmtrain train` runs it (oneDNN's products, and the
compiled loops of lmtrain.speed.kernels where they are built); "manual, ATen GEMM" the same with oneDNN
off, "manual, Python loops" with the compiled loops off.

Cells: `rnn`, `lstm`; `gru` is PyTorch's form (`model.gru_reset: after`), the same function as `nn.GRU`;
`gru-lecture` the lecture's full GRU (Γ_r before the product, lmtrain's default) and `gru-simplified` the
lecture's GRU without Γ_r, both against `nn.GRU` as the nearest torch.nn layer.

For each size (B, T, H) (input size = H) and cell: one training step = forward + backward of the sum of
the outputs, with gradients for the input too, fp32 on the CPU. The variants run alternately in one
process (these machines stall at times, for seconds), and the table reports medians of per-step times,
the ratio to torch.nn (smaller is faster), tokens/s (B*T per step) and the peak RSS of a process that
runs only that variant, above a process that only built the inputs. The allocator settings in effect
are printed, since glibc returning large buffers to the kernel costs a training step about 1.3x.
With `--device cuda` the reference is cuDNN, steps are timed to `torch.cuda.synchronize()`, and the
memory column is the peak of `torch.cuda.max_memory_allocated` during three steps instead of RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from comparison import allocator_settings, cpu_name, doc_file, layer_sizes, positive_integer, run_child
from doc_sections import write_section
from torch import nn

from lmtrain.model.layers import RecurrentStack
from lmtrain.speed import kernels
from lmtrain.speed.gemm import use_onednn

SIZES = ((32, 64, 128), (64, 128, 256), (64, 128, 512), (1, 256, 512), (64, 128, 1024))
VARIANTS = ("torch.nn", "lmtrain autograd", "lmtrain manual aten", "lmtrain manual python", "lmtrain manual")
REFERENCE = {"rnn": nn.RNN, "gru": nn.GRU, "gru-lecture": nn.GRU, "gru-simplified": nn.GRU, "lstm": nn.LSTM}
OPTIONS = {"gru": {"gru_reset": "after"}, "gru-lecture": {"gru_reset": "before"},
           "gru-simplified": {"gru_reset": "before", "relevance_gate": False}}
FOOTNOTE = """Times in ms per training step (forward + backward, input gradients on), fp32; ratio = lmtrain /
torch.nn (below 1: lmtrain is faster). The `gru` rows use `model.gru_reset: after`, PyTorch's
convention, so that both sides compute the same function; `gru-lecture` and `gru-simplified` are the
lecture's GRU with and without Γ_r against the same `nn.GRU`."""
MEMORY_NOTE = {"cpu": "Peak RSS is that of a fresh process running three steps, minus one that only built the input "
                      "(`/proc/self/status` VmHWM); with `--rss-processes N`, each the median of N such processes.",
               "cuda": "Peak CUDA memory is `torch.cuda.max_memory_allocated()` during three steps, less what was "
                       "allocated before them (the input)."}


def build(variant: str, cell: str, hidden: int) -> nn.Module:
    torch.manual_seed(0)
    if variant == "torch.nn":
        return REFERENCE[cell](hidden, hidden, batch_first=True)
    backward = variant.split()[1]  # "lmtrain manual aten": the manual backward with ATen's GEMMs
    # One layer, as the reference: RecurrentStack's default is the config's two.
    return RecurrentStack(cell.split("-")[0], hidden, hidden, num_layers=1, gradients=backward, **OPTIONS.get(cell, {}))


def step_function(module: nn.Module, x: torch.Tensor, *, onednn: bool = True, compiled: bool = True):
    """One training step; `onednn=False` runs lmtrain's products on ATen's GEMM (lmtrain.speed.gemm),
    `compiled=False` the Python loops instead of the compiled ones (lmtrain.speed.kernels)."""
    module.to(x.device)

    def step() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        with use_onednn(onednn), kernels.switched(compiled):
            output, _ = module(x)
            output.sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
    return step


def switches(variant: str) -> dict[str, bool]:
    return {"onednn": not variant.endswith("aten"), "compiled": not variant.endswith("python")}


def placement_medians(cell: str, size: tuple[int, int, int], repeats: int, device: str = "cpu",
                      variants: tuple[str, ...] = VARIANTS, placements: int = 1,
                      echo: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, list[float]]:
    """Each of `variants`' median seconds per training step, alternating, in each of `placements`
    placements: a fresh input and fresh layers, after a few small allocations kept alive have moved where
    the heap puts them. One placement's figure depends on where its buffers fell (docs/benchmarks.md,
    "Where a layer's buffers lie"); `echo(placement, medians)` hears each placement's."""
    B, T, H = size
    kept: list[torch.Tensor] = []
    medians: dict[str, list[float]] = {variant: [] for variant in variants}
    for placement in range(placements):
        kept.extend(torch.empty(1 + 1000 * placement) for _ in range(placement % 5))
        x = torch.randn(B, T, H, device=device, requires_grad=True)
        steps = {variant: step_function(build(variant, cell, H), x, **switches(variant)) for variant in variants}
        for step in steps.values():  # warm-up: first-call allocations and kernel selection
            step()
        times: dict[str, list[float]] = {variant: [] for variant in variants}
        for _ in range(repeats):
            for variant, step in steps.items():
                begin = time.perf_counter()
                step()
                times[variant].append(time.perf_counter() - begin)
        for variant in variants:
            medians[variant].append(statistics.median(times[variant]))
        if echo is not None:
            echo(placement, {variant: values[-1] for variant, values in medians.items()})
    return medians


def time_variants(cell: str, size: tuple[int, int, int], repeats: int, device: str = "cpu",
                  variants: tuple[str, ...] = VARIANTS, placements: int = 1) -> dict[str, float]:
    """Median seconds per training step of each of `variants`, alternating; over several `placements`,
    the median of their medians."""
    return {variant: statistics.median(values)
            for variant, values in placement_medians(cell, size, repeats, device, variants, placements).items()}


def peak_cuda_mb(variant: str, cell: str, size: tuple[int, int, int]) -> float:
    """Peak CUDA memory (MB) allocated during three steps of `variant`, above the input's."""
    B, T, H = size
    x = torch.randn(B, T, H, device="cuda", requires_grad=True)
    step = step_function(build(variant, cell, H), x)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(3):
        step()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_rss_mb(variant: str | None, cell: str, size: tuple[int, int, int], setup: str = "pass") -> float:
    """Peak RSS (MB) of a fresh process that runs 3 steps of `variant` (None: only builds the input),
    after the Python statement `setup` (run with this folder on the path)."""
    return process_memory(variant, cell, size, setup)["VmHWM"]


def process_memory(variant: str | None, cell: str, size: tuple[int, int, int], setup: str = "pass",
                   environment: dict[str, str] | None = None) -> dict[str, float]:
    """`/proc/self/status`'s VmHWM (peak RSS), RssAnon and RssFile (MB) of a fresh process, run with
    `environment` if given, after 3 steps of `variant` as `peak_rss_mb` runs them."""
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec from the forking parent,
    # so a child of this (large) process would report the parent's peak.
    code = ("import json, sys, torch; sys.path.insert(0, %r); from bench_cells import *; %s\n"
            "B, T, H = %r; x = torch.randn(B, T, H, requires_grad=True); v = %r\n"
            "if v: s = step_function(build(v, %r, H), x, **switches(v)); [s() for _ in range(3)]\n"
            "fields = [line.split() for line in open('/proc/self/status')]\n"
            "print(json.dumps({f[0][:-1]: int(f[1]) / 1024 for f in fields if f[0] in %r}))"
            % (str(Path(__file__).parent), setup, size, variant, cell, MEMORY_FIELDS))
    result = run_child([sys.executable, "-c", code], **({} if environment is None else {"env": environment}))
    return json.loads(result.stdout.strip().splitlines()[-1])


MEMORY_FIELDS = ("VmHWM:", "RssAnon:", "RssFile:")


def peak_rss_medians(cell: str, size: tuple[int, int, int], processes: int,
                     variants: tuple[str, ...] = VARIANTS) -> dict[str, float]:
    """Each variant's peak RSS over the input-only process's, medians of `processes` fresh processes
    taken in turn: one process's peak moves by a few (T, B, H) buffers from run to run, with where
    glibc's heaps happen to fit them."""
    return {variant: fields["VmHWM"] for variant, fields in memory_medians(cell, size, processes, variants).items()}


def memory_medians(cell: str, size: tuple[int, int, int], processes: int, variants: tuple[str, ...] = VARIANTS,
                   environment: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    """{variant: {field: MB}}: each of `process_memory`'s fields less the input-only process's, medians of
    `processes` fresh processes (run with `environment` if given) taken in turn."""
    runs: dict[str | None, list[dict[str, float]]] = {variant: [] for variant in (None, *variants)}
    for _ in range(processes):
        for variant in runs:
            runs[variant].append(process_memory(variant, cell, size, environment=environment))
    median = {variant: {field: statistics.median(run[field] for run in values) for field in values[0]}
              for variant, values in runs.items()}
    return {variant: {field: value - median[None][field] for field, value in median[variant].items()}
            for variant in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["rnn", "gru", "lstm"], choices=sorted(REFERENCE))
    parser.add_argument("--sizes", type=layer_sizes, default=None, help='e.g. "[[32, 64, 128]]"')
    parser.add_argument("--repeats", type=positive_integer, default=9)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rss-processes", type=positive_integer, default=1,
                        help="fresh processes a variant's peak RSS is the median of (CPU)")
    parser.add_argument("--doc", type=doc_file, default=None, help="write the markdown table here too")
    parser.add_argument("--title", default=None, help="the section of --doc to write")
    args = parser.parse_args()
    sizes = args.sizes or SIZES
    allocator = allocator_settings()
    header = [f"`python scripts/bench_cells.py {shlex.join(sys.argv[1:])}`".replace(" `", "`"),
              f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, allocator: {allocator}; medians of {args.repeats} alternating steps"
              + (f"; {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
                 if args.device == "cuda" else ""), "",
              "| cell | B, T, H | torch.nn ms | lmtrain autograd ms (ratio) | lmtrain manual, ATen GEMM ms (ratio) | "
              "lmtrain manual, Python loops ms (ratio) | lmtrain manual ms (ratio) | torch.nn tokens/s | "
              "lmtrain manual tokens/s | "
              f"peak {'CUDA' if args.device == 'cuda' else 'RSS'} MB torch.nn / autograd / manual ATen / "
              "manual Python / manual |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    print("\n".join(header), flush=True)
    rows = []
    for cell in args.cells:
        for size in sizes:
            B, T, _ = size
            median = time_variants(cell, size, args.repeats, args.device)
            if args.device == "cuda":
                rss = [peak_cuda_mb(variant, cell, size) for variant in VARIANTS]
            else:
                rss = list(peak_rss_medians(cell, size, args.rss_processes).values())
            reference = median["torch.nn"]
            timed = " | ".join(f"{1e3 * median[variant]:.1f} ({median[variant] / reference:.2f}x)"
                               for variant in VARIANTS[1:])
            row = (f"| {cell} | {B}, {T}, {size[2]} | {1e3 * reference:.1f} | {timed} | "
                   f"{B * T / reference:,.0f} | {B * T / median['lmtrain manual']:,.0f} | "
                   f"{' / '.join(f'{m:.0f}' for m in rss)} |")
            rows.append(row)
            print(row, flush=True)
    if args.doc:
        title = args.title or "Layers against torch.nn" + (" on a GPU" if args.device == "cuda" else "")
        write_section(args.doc, title, "\n".join(header + rows + ["", f"{FOOTNOTE} {MEMORY_NOTE[args.device]}"]))


if __name__ == "__main__":
    main()
