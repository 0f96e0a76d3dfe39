"""The LSTM's compiled time loops against the earlier per-step design, alternating in one process: the
current loops (`lmtrain/speed/csrc/kernels.cpp`: each thread makes its units' share of every step's
recurrent product itself) and the per-step ones (`lmtrain/csrc/lstm_loops.cpp` at commit 5390b09: one
oneDNN call per step, W packed once per sequence by `gemm.FixedProduct`), both built with the same flags.

    python scripts/compare_lstm_loops.py [--repeats 9]

Needs the git history (the old source is read with `git show`). Times one forward and one backward time
loop (the products over all steps, which both leave to `lmtrain.speed.gemm`, are not included) at each size,
the two implementations taking turns, and prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from comparison import allocator_settings, positive_integer, run_child

from lmtrain.speed import kernel_build, kernels
from lmtrain.speed.gemm import FixedProduct

ROOT = Path(__file__).resolve().parent.parent
OLD = ("5390b09", "lmtrain/csrc/lstm_loops.cpp")  # the path at that commit
SIZES = [(20, 35, 200), (32, 64, 256), (64, 128, 256), (128, 16, 512), (64, 128, 512)]  # (B, T, H)


def build_old(folder: Path):
    source = folder / "old_lstm_loops.cpp"
    source.write_text(run_child(["git", "show", f"{OLD[0]}:{OLD[1]}"], cwd=ROOT).stdout)
    current = kernels.spec()
    old = kernel_build.Spec(f"{current.name}_old_loops", (source,), cflags=current.cflags, ldflags=current.ldflags)
    module, reason = kernel_build.obtain(old, announce=print, wait_seconds=600, root=folder / "build")
    if module is None:
        raise SystemExit(f"the old loops could not be built: {reason}")
    return module


def old_arguments(product: FixedProduct) -> tuple[torch.Tensor, bool]:
    """What the per-step loops took: the packed W for oneDNN, or Wᵀ for mm."""
    return (product.W, True) if product.onednn else (product.W_t, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=positive_integer, default=9)
    args = parser.parse_args()
    new = kernels.load()
    if new is None:
        raise SystemExit(f"the compiled kernels are not available: {kernels.unavailable_reason()}")
    with tempfile.TemporaryDirectory() as folder:
        old = build_old(Path(folder))
    allocator = allocator_settings()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"allocator: {allocator}; medians of {args.repeats} alternating forward + backward time loops\n")
    print("| B, T, H | per-step oneDNN loops ms | current loops ms | ratio |")
    print("|---|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    for B, T, H in SIZES:
        W = torch.randn(4 * H, H, generator=generator) / H ** 0.5
        pre_activations = torch.randn(T, B, 4 * H, generator=generator)
        a, c, tanh_c = torch.zeros(T + 1, B, H), torch.zeros(T + 1, B, H), torch.empty(T, B, H)
        dA, dc = 0.1 * torch.randn(T + 1, B, H, generator=generator), torch.zeros(B, H)
        times: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.repeats):
            for which in times:
                gates = pre_activations.clone()
                begin = time.perf_counter()
                if which == "old":
                    old.lstm_forward(gates, a, c, tanh_c, *old_arguments(FixedProduct(W, B, T)))
                    old.lstm_backward(gates, c, tanh_c, dA, dc, *old_arguments(FixedProduct(W.t().contiguous(), B, T)))
                else:
                    new.lstm_forward(gates, a, c, tanh_c, W)
                    new.lstm_backward(gates, c, tanh_c, dA, dc, W)
                times[which].append(time.perf_counter() - begin)
        old_ms, new_ms = (1e3 * statistics.median(times[which]) for which in ("old", "new"))
        print(f"| {B}, {T}, {H} | {old_ms:.1f} | {new_ms:.1f} | {new_ms / old_ms:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
