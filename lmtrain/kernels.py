"""lmtrain's compiled kernels (`lmtrain/csrc/kernels.cpp`): the LSTM's time loops and the output
layer's softmax cross-entropy.

- The Python loops of `lmtrain.backward.LSTMFunction` make, per time step, one matrix product and about
  seven separate elementwise tensor operations forward and five backward (after six passes over every
  step's buffers), each a call of its own, and run Python between them: at batch 32 and H = 256 those
  calls cost more than their arithmetic (docs/benchmarks.md). The compiled loops run the same equations
  in one parallel region for the whole sequence: each thread owns a slice of the hidden units, keeps its
  slice of W_aa packed in its cache, and makes its columns of each step's recurrent product and the gate
  arithmetic of its units together, with one barrier per step. The products over all T steps at once
  (W_ax x, the weight gradients) stay with `lmtrain.gemm`.
- The softmax cross-entropy (`lmtrain.loss`) makes the loss and its gradient with respect to the logits
  in one pass over each row, where torch's log_softmax, nll_loss and their backwards read or write a
  (rows, V) tensor six times.

They take float32 tensors on the CPU; everything else (float64, CUDA) runs the Python code, which
tests/test_kernels.py checks them against. With `train.precision: bfloat16` the LSTM loops make their
recurrent products with bfloat16 factors and float32 sums (AVX-512 BF16's VDPBF16PS, chosen at run time:
`bf16_products_supported()`; without it the Python loops run); tests/test_precision.py checks them.

The kernels are built once per machine, on first use, by torch's C++ extension loader (about 30 s;
cached under `$TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`). That needs a C++ compiler
with OpenMP and ninja (`pip install ninja`, or the system's). Without them, or if the build fails,
lmtrain says so in one line and keeps the Python code: slower, same results. `LMTRAIN_COMPILED=0`
skips the build; `LMTRAIN_COMPILED=1` makes it required (`lmtrain train` stops with the reason instead).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"
SWITCH = "LMTRAIN_COMPILED"

_enabled = True
_built: dict[str, object] = {}  # "module" and "reason", once the build was tried


def compiled(tensor: torch.Tensor) -> ModuleType | None:
    """The compiled kernels if they can run on `tensor` (float32 on the CPU) and are built (building
    them on first call); None means: use the Python code."""
    if not (_enabled and tensor.device.type == "cpu" and tensor.dtype == torch.float32):
        return None
    return load()


def load(announce=lambda line: print(line, file=sys.stderr)) -> ModuleType | None:
    """Build (first time on this machine) or load the compiled kernels; None, after one line through
    `announce` saying why, if they cannot be had."""
    if "module" not in _built:
        module, reason = _build(announce)
        _built.update(module=module, reason=reason)
        if reason is not None and os.environ.get(SWITCH) not in ("0", "1"):
            announce(f"lmtrain: the compiled kernels are not available ({reason}); using the Python code "
                     f"(same results, slower). {SWITCH}=0 silences this.")
    return _built["module"]


def unavailable_reason() -> str | None:
    """Why the compiled kernels are not in use, or None if they are (after `load`)."""
    return _built.get("reason")


def required() -> bool:
    """`LMTRAIN_COMPILED=1`: the user wants the compiled kernels or an error, not a silent fallback."""
    return os.environ.get(SWITCH) == "1"


@contextmanager
def use_compiled(enabled: bool) -> Iterator[None]:
    """Run the compiled kernels (where they can) or the Python code inside the block: for tests and
    benchmarks that compare the two."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


COMMON_FLAGS = ["-O3", "-fno-trapping-math", "-fopenmp"]


def _flags() -> tuple[str, list[str]]:
    """The build's name and compiler flags for this CPU: AVX-512 or AVX2 where torch found them (its own
    kernels choose the same way), the target's default otherwise. The name carries the
    choice so that a cache shared between machines never hands one a binary its CPU cannot run.
    `-fno-trapping-math` lets GCC vectorise the gate loops (their clamps and floors are branches to it
    otherwise); nothing here reads floating-point exception flags. `-fopenmp` makes ATen's `parallel_for`
    in the softmax kernel parallel (without it the header's OpenMP loop runs on one thread, measured 2x
    slower); at run time the kernels share the OpenMP runtime that torch loaded, and its threads."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":  # 512-bit vectors: the forward's gate pass took 0.7x AVX2's time in a trial run
        return "lmtrain_kernels_avx512", [*COMMON_FLAGS, "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw",
                                          "-mavx2", "-mfma", "-mprefer-vector-width=512"]
    if capability == "AVX2":
        return "lmtrain_kernels_avx2", [*COMMON_FLAGS, "-mavx2", "-mfma"]
    return "lmtrain_kernels", COMMON_FLAGS


def _find_ninja(cpp_extension) -> bool:
    """Whether torch's loader can run ninja. `pip install ninja` puts it beside this Python, which is not
    on PATH when lmtrain runs from a venv that was not activated: that folder is then added to PATH."""
    if cpp_extension.is_ninja_available():
        return True
    beside = Path(sys.executable).parent
    if not (beside / "ninja").exists():
        return False
    os.environ["PATH"] = f"{beside}{os.pathsep}{os.environ.get('PATH', '')}"
    return cpp_extension.is_ninja_available()


def _build(announce) -> tuple[ModuleType | None, str | None]:
    if os.environ.get(SWITCH) == "0":
        return None, f"{SWITCH}=0"
    try:
        from torch.utils import cpp_extension
    except ImportError as error:  # a torch without its C++ extension support
        return None, f"torch.utils.cpp_extension: {error}"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"no C++ compiler ({compiler}) on PATH"
    if not _find_ninja(cpp_extension):
        return None, "ninja is not installed: pip install ninja"
    name, flags = _flags()
    try:
        built = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
        if not built.exists():
            announce(f"lmtrain: compiling the kernels for this machine (once, about 30 s): {SOURCE.name}")
    except Exception:  # a private helper of torch's: only the announcement depends on it
        pass
    try:
        return cpp_extension.load(name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                  verbose=False), None
    except Exception as error:  # a compiler error, a read-only cache folder, ...
        lines = str(error).strip().splitlines() or [type(error).__name__]
        return None, f"build failed: {lines[0][:200]}"
