"""Shared test fixtures: small, CPU-only, no files outside `tmp_path`."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings

# torch warns at import when NumPy is absent; lmtrain does not use NumPy (as lmtrain/cli/app.py does).
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

# Training in stream mode writes the token cache: into a temporary folder, never ~/.cache/lmtrain. Set
# here, before the test modules are imported, because test_cli copies os.environ for its subprocesses.
os.environ["LMTRAIN_CACHE"] = tempfile.mkdtemp(prefix="lmtrain-test-cache-")
atexit.register(shutil.rmtree, os.environ["LMTRAIN_CACHE"], ignore_errors=True)

# The models here are tiny: one thread is many times faster than several fighting over 2 busy cores. Set
# before torch loads, for this process and the lmtrain processes the tests start, so that every run here
# has a fixed thread count (train.threads: auto follows the load; tests/test_threads.py tests it).
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from lmtrain.config import Config, build_config  # noqa: E402
from lmtrain.data.tokenizer import Tokenizer  # noqa: E402

torch.set_num_threads(1)

# The suite tests the CPU on every machine: where there is a GPU, `train.device: auto` would train on it,
# and the tests expect what the CPU does (the kernels' build and warnings, peak RSS). Only
# tests/test_cuda.py, which names the device, uses the GPU. CUDA reads CUDA_VISIBLE_DEVICES once, as it
# starts: it starts here, the GPU visible to this process, and the variable then hides it from the lmtrain
# processes the tests start (the test modules copy os.environ for them as they load).
CUDA_PRESENT = torch.cuda.is_available()
os.environ["CUDA_VISIBLE_DEVICES"] = ""

SMALL_TEXT = "the cat sat\nthe dog ran\na cat ran\n\nthe end\n"


def pytest_sessionstart(session) -> None:
    """Build (first time on this machine, most of a minute) or load the compiled kernels before any test,
    so that no test's timing or captured output includes the build or its one-line announcement."""
    from lmtrain.speed import kernels

    kernels.load()


@pytest.fixture
def compiled():
    """The compiled kernels (`lmtrain.speed.kernels`), or a skip (a failure under LMTRAIN_COMPILED=1, as in
    .ci/run) saying why they are missing."""
    from lmtrain.speed import kernels

    module = kernels.load(announce=lambda line: None)
    if module is None:
        message = f"compiled kernels unavailable: {kernels.unavailable_reason()}"
        if kernels.required():
            pytest.fail(message)
        pytest.skip(message)
    return module


@pytest.fixture
def onednn_everywhere(monkeypatch) -> None:
    """oneDNN makes float32 products on this CPU too (lmtrain leaves them to MKL on AVX2 CPUs, where MKL is
    faster), so that its paths are tested on every host."""
    from lmtrain.speed import route

    monkeypatch.setattr(route, "ONEDNN_FLOAT32", True)


@pytest.fixture(autouse=True)
def _the_gpu_only_where_named(request, monkeypatch) -> None:
    """`torch.cuda.is_available()` is false outside tests/test_cuda.py, so `auto` means the CPU."""
    if CUDA_PRESENT and request.module.__name__ != "test_cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same torch RNG state, so it is deterministic on its own."""
    torch.manual_seed(0)


@pytest.fixture
def small_text() -> str:
    return SMALL_TEXT


@pytest.fixture
def char_tokenizer() -> Tokenizer:
    return Tokenizer.fit(SMALL_TEXT, level="char", eos="line")


@pytest.fixture
def word_tokenizer() -> Tokenizer:
    return Tokenizer.fit(SMALL_TEXT, level="word", eos="line")


def make_config(**values) -> Config:
    """A valid Config from dotted keys (`make_config(**{"model.cell": "gru"})`) over a minimal base."""
    base = {"data.path": "/nonexistent/corpus.txt", "train.max_steps": 10}
    return build_config({**base, **values})


@pytest.fixture
def config_factory():
    return make_config


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Imports of matplotlib fail, as on a machine without the optional extra."""
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
