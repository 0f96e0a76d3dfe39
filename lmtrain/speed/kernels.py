"""lmtrain's compiled kernels (`lmtrain/speed/csrc/kernels.cpp`): every cell's time loops (LSTM, GRU in both
forms, RNN) and the output layer's softmax cross-entropy.

- The Python loops of `lmtrain.backprop.lstm.LSTMFunction` make, per time step, one matrix product and about
  seven separate elementwise tensor operations forward and five backward (after six passes over every
  step's buffers), each a call of its own, and run Python between them: at batch 32 and H = 256 those
  calls cost more than their arithmetic (docs/benchmarks.md). The compiled loops run the same equations
  in one parallel region for the whole sequence, W_aa packed once: each thread owns some of the batch's
  rows (a register tile's worth or more) and makes their share of each step's recurrent product and gate
  arithmetic together, with no barrier between steps, since each row's recurrence is its own; with fewer
  rows, each thread owns a slice of the hidden units of every row, its slice of W_aa packed in its cache,
  and the threads meet at a barrier each step. The products over all T steps at once
  (W_ax x, the weight gradients) stay with `lmtrain.speed.gemm`. The GRU's and RNN's loops
  (`lmtrain.backprop.gru`, `lmtrain.backprop.rnn`) are compiled the same way.
- The softmax cross-entropy (`lmtrain.speed.loss`) makes the loss and its gradient with respect to the logits
  in one pass over each row, where torch's log_softmax, nll_loss and their backwards read or write a
  (rows, V) tensor six times.

They take float32 tensors on the CPU; everything else (float64, CUDA) runs the Python code, which
tests/test_kernels.py checks them against. With `train.precision: bfloat16` every cell's time loops make
their recurrent products with bfloat16 factors and float32 sums (AVX-512 BF16's VDPBF16PS, chosen at run
time: `bf16_products_supported()`; without it, or for an odd hidden size, in float32);
tests/test_precision.py checks them.

The kernels are built once per machine, on first use (most of a minute), by torch's C++ extension loader
inside `lmtrain.speed.kernel_build`, which names the build by its sources, flags and versions and makes sure
that a killed build never blocks a later one; `lmtrain kernels build|status|clear` builds ahead of time,
shows and clears the cache (docs/running.md). That needs a C++ compiler with OpenMP and ninja (`pip
install ninja`, or the system's). Without them, or if the build fails, lmtrain says so in one line and
keeps the Python code: slower, same results. `LMTRAIN_COMPILED=0` skips the build; `LMTRAIN_COMPILED=1`
makes it required (`lmtrain train` stops with the reason instead). `LMTRAIN_KERNELS_WAIT` bounds, in
seconds (default 600), the wait for another process that is compiling them.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from lmtrain.errors import LmtrainError, os_reason
from lmtrain.speed import kernel_build, kernel_cache
from lmtrain.speed.torch_internals import cpu_capability

SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"
SWITCH = "LMTRAIN_COMPILED"
WAIT = "LMTRAIN_KERNELS_WAIT"
DEFAULT_WAIT_SECONDS = 600.0

_built: dict[str, object] = {}  # "module" and "reason", once the build was tried: a memo, not a switch


def switch() -> str:
    """`LMTRAIN_COMPILED` as the user set it: "" (unset), "0" or "1". Any other value is refused: a typo
    must not silently mean "unset"."""
    value = os.environ.get(SWITCH, "").strip()
    if value not in ("", "0", "1"):
        raise LmtrainError(f"{SWITCH} must be 0 (the Python code) or 1 (the compiled kernels, or stop); got {value!r}")
    return value


def load(announce=lambda line: print(line, file=sys.stderr)) -> ModuleType | None:
    """Build (first time on this machine) or load the compiled kernels; None, after one line through
    `announce` saying why, if they cannot be had."""
    if "module" not in _built:
        module, reason = _build(announce)
        _built.update(module=module, reason=reason)
        if reason is not None and switch() == "":
            announce(f"lmtrain: the compiled kernels are not available ({reason}); using the Python code "
                     f"(same results, slower). {SWITCH}=0 silences this.")
    return _built["module"]


def load_for_a_run(announce=lambda line: print(line, file=sys.stderr)) -> ModuleType | None:
    """`load` for a run about to use the kernels (training, sampling, evaluation): where
    `LMTRAIN_COMPILED=1` asks for them and they cannot be had, stop with the reason instead."""
    module = load(announce)
    if module is None and required():
        raise LmtrainError(f"{SWITCH}=1, but the compiled kernels are not available: {unavailable_reason()}")
    return module


def bfloat16_obstacle(module: ModuleType, hidden_size: int) -> str | None:
    """Why the compiled loops cannot make their per-step products in bfloat16 here, or None: they multiply
    pairs of bfloat16 values with AVX-512 BF16's VDPBF16PS, so they need that instruction and an even width."""
    if not module.bf16_products_supported():
        return "this CPU has no AVX-512 BF16 (its bfloat16 products are emulated, likely slower than float32)"
    if hidden_size % 2:
        return f"model.hidden_size is odd ({hidden_size}) and the compiled loops take bfloat16 values in pairs"
    return None


def load_for_training(*, bfloat16: bool, hidden_size: int, warn) -> None:
    """Build or load the kernels before a CPU training starts (`load_for_a_run`); warn where bfloat16 was
    asked and the compiled loops make their per-step products in float32 (`bfloat16_obstacle`)."""
    module = load_for_a_run(announce=warn)
    if module is None or not bfloat16 or (obstacle := bfloat16_obstacle(module, hidden_size)) is None:
        return
    warn(f"warning: train.precision is bfloat16 but {obstacle}: their per-step products stay float32 and only the "
         "products over all time steps take bfloat16 factors (scripts/bench_precision.py measures the step "
         "against float32's)")


def unavailable_reason() -> str | None:
    """Why the compiled kernels are not in use, or None if they are (after `load`)."""
    return _built.get("reason")


def required() -> bool:
    """`LMTRAIN_COMPILED=1`: the user wants the compiled kernels or an error, not a silent fallback."""
    return switch() == "1"


@contextmanager
def switched(on: bool) -> Iterator[None]:
    """`LMTRAIN_COMPILED` as the user sets it, inside the block: unset (the kernels where they run) or
    "0" (the Python loops). For the tests and benchmarks that compare the two; routes chosen inside the
    block follow it, and a backward follows its forward's route wherever it runs."""
    previous = os.environ.pop(SWITCH, None)
    if not on:
        os.environ[SWITCH] = "0"
    try:
        yield
    finally:
        os.environ.pop(SWITCH, None)
        if previous is not None:
            os.environ[SWITCH] = previous


COMMON_FLAGS = ("-O3", "-fno-trapping-math", "-fopenmp")


def spec() -> kernel_build.Spec:
    """The build for this CPU: AVX-512 or AVX2 where torch found them (its own kernels choose the same
    way), the target's default otherwise; the name carries the choice, so that a cache shared between
    machines never hands one a binary its CPU cannot run. `-fno-trapping-math` lets GCC vectorise the
    gate loops (their clamps and floors are branches to it otherwise); nothing here reads floating-point
    exception flags. `-fopenmp` makes ATen's `parallel_for` in the softmax kernel parallel (without it
    the header's OpenMP loop runs on one thread); at run time the kernels share the OpenMP runtime that
    torch loaded, and its threads."""
    capability = cpu_capability()
    if capability == "AVX512":
        name, flags = "lmtrain_kernels_avx512", ("-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mavx2",
                                                 "-mfma", "-mprefer-vector-width=512")
    elif capability == "AVX2":
        name, flags = "lmtrain_kernels_avx2", ("-mavx2", "-mfma")
    else:
        name, flags = "lmtrain_kernels", ()
    return kernel_build.Spec(name, (SOURCE,), cflags=(*COMMON_FLAGS, *flags), ldflags=("-fopenmp",),
                             headers=tuple(sorted(SOURCE.parent.glob("*.h"))))


def wait_seconds() -> float:
    """How long to wait for another process's build (`LMTRAIN_KERNELS_WAIT`)."""
    text = os.environ.get(WAIT, "").strip()
    if not text:  # unset or empty, as for LMTRAIN_COMPILED
        return DEFAULT_WAIT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise LmtrainError(f"{WAIT} must be a number of seconds, 0 or more; got {text!r}")
    return seconds


def build_obstacle() -> str | None:
    """Why a build cannot start on this machine (no compiler, no ninja), or None."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    if not _ninja_on_path():
        return "ninja is not installed: pip install ninja"
    return None


def _ninja_on_path() -> bool:
    """Whether torch's loader can run ninja, putting it there if need be: `pip install ninja` puts it beside
    this Python, which is not on PATH when lmtrain runs from a venv that was not activated, so that folder
    is added to this process's PATH (torch's loader runs ninja by name)."""
    if shutil.which("ninja") is not None:
        return True
    beside = Path(sys.executable).parent
    if not (beside / "ninja").exists():
        return False
    os.environ["PATH"] = f"{beside}{os.pathsep}{os.environ.get('PATH', '')}"
    return shutil.which("ninja") is not None


def _build(announce, *, retry_failed: bool = False, root: Path | None = None) -> tuple[ModuleType | None, str | None]:
    """The kernels' module, loaded or built (in `root` alone, where given), or None and the reason."""
    if switch() == "0":
        return None, f"{SWITCH}=0"
    try:
        return kernel_build.obtain(spec(), announce=announce, wait_seconds=wait_seconds(), retry_failed=retry_failed,
                                   can_build=build_obstacle, root=root,
                                   building="lmtrain: compiling the kernels for this machine (once, under a minute): "
                                            "{sources}")
    except OSError as error:  # the sources missing from an installation, a folder that cannot be written
        return None, _os_problem(error)


def _os_problem(error: OSError) -> str:
    return f"{os_reason(error)}: {error.filename or ''}".rstrip(": ")


# -- `lmtrain kernels build | status | clear` ------------------------------------------------------

def build_now(announce) -> str:
    """Build the kernels if they are not built (trying again after an earlier failure); the folder they
    are in. For `lmtrain kernels build`: ahead of time, e.g. in a container image that runs read-only."""
    if switch() == "0":
        raise LmtrainError(f"{SWITCH}=0 turns the compiled kernels off; unset it to build them")
    # Into the cache folder wherever it can be written, as a container image's build must be, even with a
    # build in the private fallback already (a run once made where the cache folder was read-only).
    cache = kernel_build.default_root()
    module, reason = _build(announce, retry_failed=True, root=cache if kernel_build.writable(cache) else None)
    if module is None:
        raise LmtrainError(f"the compiled kernels could not be built: {reason}")
    _built.update(module=module, reason=None)
    return str(kernel_build.published(spec()).folder)


def state() -> str:
    """This lmtrain's kernels in a few words (`lmtrain --version`): built, failed, not built, off, or
    unusable and why; never an error for a cache that cannot be read."""
    try:
        return _state(kernel_build.look(spec()))
    except OSError as error:  # the sources missing from an installation
        return f"unusable ({_os_problem(error)})"


def _state(found: kernel_build.Look) -> str:
    """The state, in the order a run meets it (`kernel_build.obtain`)."""
    if switch() == "0":
        return f"off ({SWITCH}=0)"
    if found.published is not None:
        return "built"
    if found.failed is not None:
        return "failed"
    if found.unreadable:
        root, reason = next(iter(found.unreadable.items()))
        return f"unusable (cannot read the kernel cache {root}: {reason.lower()})"
    return "not built (the first run on this CPU builds them, or `lmtrain kernels build`)"


def status() -> dict:
    """What `lmtrain kernels status` shows: this lmtrain's build and its state, what a build would need,
    and every build in the cache folders (other versions' included)."""
    this = spec()
    found = kernel_build.look(this)
    paths, failed, state = found.published, found.failed, _state(found)
    return {"state": state, "module": this.module, "folder": str(paths.folder) if paths else None,
            "failure_log": str(failed.failure) if failed and not paths else None,
            "compiler": shutil.which(this.compiler), "ninja": shutil.which("ninja") if _ninja_on_path() else None,
            "wait_seconds": wait_seconds(), "bfloat16_products": _bfloat16_products(state),
            "caches": [_cache(root) for root in kernel_build.roots()]}


def _cache(root: Path) -> dict:
    """One cache folder's builds for `status`; where the folder cannot be read, why (`error`)."""
    try:
        return {"root": str(root), "builds": kernel_cache.builds(root), "error": None}
    except OSError as error:
        return {"root": str(root), "builds": [], "error": f"cannot be read: {os_reason(error).lower()}"}


def _bfloat16_products(state: str) -> bool | None:
    """Whether the built kernels make bfloat16 products here (the CPU has AVX-512 BF16); None while
    there is no build to ask. Loads a published build, never starts one."""
    if state != "built":
        return None
    module = load(announce=lambda line: None)
    return None if module is None else bool(module.bf16_products_supported())


BFLOAT16_LINES = {  # what `train.precision: bfloat16` runs, by `bfloat16_products`
    True: "bfloat16 products in the compiled loops too, with AVX-512 BF16 (for an even model.hidden_size)",
    False: "emulated bfloat16, likely slower than float32 (this CPU has no AVX-512 BF16)",
    None: "the Python loops' bfloat16 products while the compiled kernels are not in use",
}


def status_lines(facts: dict) -> list[str]:
    lines = [f"kernels: {facts['state']}", f"this lmtrain's build: {facts['module']}"]
    if facts["folder"]:
        lines.append(f"folder: {facts['folder']}")
    if facts["failure_log"]:
        lines.append(f"failure log: {facts['failure_log']}")
    lines.append(f"compiler: {facts['compiler'] or 'none found'}; ninja: {facts['ninja'] or 'none found'}")
    lines.append(f"train.precision bfloat16: {BFLOAT16_LINES[facts['bfloat16_products']]}")
    for cache in facts["caches"]:
        if cache.get("error"):
            lines.append(f"cache {cache['root']}: {cache['error']}")
        if not cache["builds"]:
            continue
        total, count = sum(build["bytes"] for build in cache["builds"]), len(cache["builds"])
        lines.append(f"cache {cache['root']}: {count} {'entry' if count == 1 else 'entries'}, {total / 1e6:.1f} MB")
        for build in cache["builds"]:
            record = build.get("record") or {}
            made = f"  lmtrain {record['lmtrain']}, torch {record['torch']}" if "lmtrain" in record else ""
            mine = "  (this lmtrain)" if build["module"] == facts["module"] else ""
            why = f" ({build['reason'].lower()})" if build["state"] == "unreadable" else ""
            lines.append(f"  {build['module']}  {build['state']}{why}  {build['bytes'] / 1e6:.1f} MB{made}{mine}")
    return lines


def clear() -> list[str]:
    """Remove every build in the cache folders but those being built now; lines saying what went. What
    could not be removed is an LmtrainError naming it, and what was removed all the same."""
    switch()  # a mistyped LMTRAIN_COMPILED is refused here too, as by every other command
    lines, removed, failed = [], [], {}
    for root in kernel_build.roots():
        cleared = kernel_cache.clear(root)
        removed += cleared.removed
        failed.update(cleared.failed)
        lines += [f"removed {path}" for path in cleared.removed]
        lines += [f"kept {path} (being built now)" for path in cleared.kept]
    if failed:
        raise LmtrainError(_not_cleared(failed, removed, [str(root) for root in kernel_build.roots()]))
    return lines or ["nothing to clear"]


def _not_cleared(failed: dict[str, str], removed: list[str], roots: list[str]) -> str:
    """One line for a clear that could not remove everything: the first path and why, the others, and
    what was removed nonetheless."""
    (path, reason), others = next(iter(failed.items())), list(failed)[1:]
    line = f"cannot {'clear the kernel cache' if path in roots else 'remove'} {path}: {reason.lower()}"
    if others:
        line += f"; nor {', '.join(others)}"
    return line + (f"; removed {', '.join(removed)}" if removed else "; nothing was removed")
