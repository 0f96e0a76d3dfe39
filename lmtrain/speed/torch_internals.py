"""The parts of torch that lmtrain's speed code reaches which are not torch's public API, in one place.

Each is looked up once, here, and each has a fallback that gives the same results by public means, so
a torch that renames or drops one runs slower, never wrongly (tests/test_torch_internals.py runs every
fallback):

- `torch.ops.mkldnn._linear_pointwise` and `_reorder_linear_weight`: oneDNN's linear with its weight
  packed once (`lmtrain.speed.gemm`). Fallback: `torch.addmm` (MKL, OpenBLAS), the same float32 sums.
- `Tensor._version` and `torch.autograd.graph.increment_version`: a parameter's in-place version, which
  the cells' stacked-weight cache keys on and torch's fused optimizers do not bump (`lmtrain.training.optim`).
  Fallback: no cache, the weights are stacked anew at every call.
- `torch.utils.cpp_extension.load`, public but noisy and with a lock file that outlives a killed
  process: `lmtrain.speed.kernel_build` calls it only inside a private folder of its own and keeps its log
  records off the terminal (`torch_logs_captured`).

Nothing here imports anything else of lmtrain.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout

import torch


class OneDNNLinear:
    """oneDNN's linear, `x Wᵀ (+ b or + add)` for W (N, K), through torch's `mkldnn` ops, with their
    positional arguments written once, here."""

    def __init__(self, linear: Callable, reorder_weight: Callable) -> None:
        self._linear, self._reorder_weight = linear, reorder_weight

    def __call__(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """x Wᵀ + b; W as it is (contiguous) or packed by `pack`."""
        return self._linear(x, W, b, "none", [], "")

    def plus(self, x: torch.Tensor, W: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
        """x Wᵀ + add for a (rows, N) `add`, summed inside the product (oneDNN's binary post-op)."""
        return self._linear.binary(x, add, W, None, "add")

    def pack(self, W: torch.Tensor, rows: int) -> torch.Tensor:
        """W in oneDNN's blocked layout for products with `rows` rows: packed once, used at every step."""
        return self._reorder_weight(W, rows)


def _onednn_linear() -> OneDNNLinear | None:
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return OneDNNLinear(torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight)
    except (AttributeError, RuntimeError):  # a torch built without these ops, or that renamed them
        return None


# oneDNN's linear, or None where torch lacks its ops.
ONEDNN_LINEAR = _onednn_linear()


def _onednn_bfloat16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# Whether oneDNN makes bfloat16 products on this CPU: it needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, and
# on an AVX2 CPU its bfloat16 linear fails ("bf16 path needs the cpu support ...").
ONEDNN_BFLOAT16 = ONEDNN_LINEAR is not None and _onednn_bfloat16()


def _version_counters() -> Callable[[Iterable[torch.Tensor]], None] | None:
    try:
        from torch.autograd.graph import increment_version
        _ = torch.zeros(1)._version  # the attribute must exist too
    except (ImportError, AttributeError):
        return None
    return increment_version


# Bumps the version counters of the given tensors; None where torch has no version counters to read.
INCREMENT_VERSION = _version_counters()


def version_key(tensors: Iterable[torch.Tensor]) -> tuple | None:
    """A key that changes whenever one of `tensors` is written in place, moved or cast; None when this
    torch has no version counters (then nothing may be cached on it)."""
    if INCREMENT_VERSION is None:
        return None
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)


def increment_version(tensors: list[torch.Tensor]) -> None:
    """Mark `tensors` as written in place (after a fused optimizer's step, which does not)."""
    if INCREMENT_VERSION is not None:
        INCREMENT_VERSION(tensors)


def cpu_capability() -> str:
    """The widest vector instructions torch's own CPU kernels use here: "AVX512", "AVX2" or "DEFAULT"."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "DEFAULT"


@contextmanager
def torch_logs_captured() -> Iterator[list[str]]:
    """Inside the block, log records of `torch.utils` (the C++ extension loader's "No CUDA runtime is
    found, using CUDA_HOME=...", compiler warnings), Python warnings and what Python code prints (older
    torch printed that line) are collected into the list yielded, not shown: the CLI's stderr carries
    lmtrain's own lines only."""
    lines: list[str] = []
    printed = io.StringIO()

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")

    logger = logging.getLogger("torch.utils")
    handler, propagate = Collect(level=logging.DEBUG), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught, redirect_stdout(printed), redirect_stderr(printed):
            warnings.simplefilter("always")
            try:
                yield lines
            finally:
                lines.extend(f"{w.category.__name__}: {w.message}" for w in caught)
                lines.extend(line for line in printed.getvalue().splitlines() if line.strip())
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
