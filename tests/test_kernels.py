"""lmtrain.speed.kernels: every cell's compiled time loops (the LSTM, the GRU in both forms with and without
the relevance gate, the RNN) give the Python loops' values and gradients (float32, either GEMM, reversed,
odd sizes, saturated gates), really run when they can, and stay out of float64;
without them lmtrain says why in one line and falls back, or stops when LMTRAIN_COMPILED=1 asks for them.
(The compiled softmax cross-entropy has its tests in test_loss.py.)

The build takes most of a minute the first time on a machine (conftest.py starts it before the tests); where it
cannot run (no compiler, no ninja) the tests that need it are skipped, unless LMTRAIN_COMPILED=1 (as in
.ci/run) makes that a failure."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from lmtrain.errors import LmtrainError
from lmtrain.model.cells import GRUCell, LSTMCell, RNNCell
from lmtrain.model.layers import RecurrentLayer
from lmtrain.speed import kernels
from lmtrain.speed.gemm import use_onednn
from lmtrain.speed.route import choose
from lmtrain.training.trainer import train

CELLS = {  # every time loop that exists compiled
    "lstm": LSTMCell,
    "gru": GRUCell,                                                           # the lecture's: Γ_r before the product
    "gru-simplified": lambda E, H: GRUCell(E, H, relevance_gate=False),
    "gru-after": lambda E, H: GRUCell(E, H, gru_reset="after"),                  # PyTorch's
    "rnn": RNNCell,
}
LOOPS = {"lstm": "lstm", "gru": "gru", "gru-simplified": "gru", "gru-after": "gru_after", "rnn": "rnn"}


def random_state(cell, B: int, scale: float = 1.0) -> tuple:
    return tuple(scale * torch.randn(B, cell.hidden_size) for _ in cell.state_type._fields)


def run_layer(layer: RecurrentLayer, x: torch.Tensor, state: tuple, *, compiled: bool):
    """Outputs, final state and every gradient of one forward and backward, with the loops asked for."""
    x, state = x.detach().requires_grad_(), tuple(s.detach().requires_grad_() for s in state)
    layer.zero_grad()
    with kernels.switched(compiled):
        outputs, final = layer(x, state)
    weights = torch.randn(outputs.shape, generator=torch.Generator().manual_seed(1))
    loss = (outputs * weights).sum() + final[0].square().sum() + sum((2 * s).sum() for s in final[1:])
    loss.backward()
    return [outputs, *final, x.grad, *(s.grad for s in state), *(p.grad for p in layer.parameters())]


def assert_same(expected: list[torch.Tensor], actual: list[torch.Tensor], tolerance: float = 2e-5) -> None:
    """Each tensor equal up to `tolerance` of its largest value: the compiled exp is not ATen's."""
    for want, got in zip(expected, actual, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=tolerance * float(want.detach().abs().max().clamp(min=1)))


@pytest.mark.usefixtures("onednn_everywhere")
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "aten"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("B, T, E, H", [(1, 4, 3, 5), (3, 7, 4, 13), (8, 33, 16, 128), (4, 9, 40, 300)])
def test_same_values_and_gradients_as_the_python_loops(compiled, cell, onednn, reverse, B, T, E, H):
    layer = RecurrentLayer(CELLS[cell](E, H), reverse=reverse, gradients="manual")
    x, state = torch.randn(B, T, E), random_state(layer.cell, B)
    with use_onednn(onednn):
        assert_same(run_layer(layer, x, state, compiled=False), run_layer(layer, x, state, compiled=True))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("B, H", [(5, 13), (5, 40), (5, 64), (5, 300), (13, 37), (20, 300), (64, 40)])
def test_threads_share_the_rows_or_the_units_and_give_the_same_result(compiled, cell, threads, B, H):
    """With a register tile of rows for each thread (B >= 6 threads with AVX-512, 4 threads otherwise) the
    threads split the batch's rows, each with every unit, unevenly here (13 rows as 6 + 7 on two threads,
    20 as 6 + 7 + 7 on three); with fewer (5 rows; 13 on three threads) each owns blocks of 16 hidden
    units of every row (the last cut at H): H = 40 splits as 16 + 24 on two threads and 16 + 16 + 8 on
    three, H = 13 runs on one. All give the Python loops' values."""
    layer = RecurrentLayer(CELLS[cell](7, H), gradients="manual")
    x, state = torch.randn(B, 9, 7), random_state(layer.cell, B)
    expected = run_layer(layer, x, state, compiled=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        actual = run_layer(layer, x, state, compiled=True)
    finally:
        torch.set_num_threads(previous)
    assert_same(expected, actual)


@pytest.mark.parametrize("cell", CELLS)
def test_every_batch_size_a_tile_can_leave_gives_the_python_loops_values(compiled, cell):
    """The per-step product takes the rows in tiles of 4 (6 with AVX-512) and the rest in one smaller tile
    whose sums are split among the inputs k: batches 1 to 13 leave every rest, and 37 hidden units make
    inputs (37 forward, 37 G backward) that are not a multiple of the split."""
    for B in range(1, 14):
        layer = RecurrentLayer(CELLS[cell](3, 37), gradients="manual")
        x, state = torch.randn(B, 6, 3), random_state(layer.cell, B)
        assert_same(run_layer(layer, x, state, compiled=False), run_layer(layer, x, state, compiled=True))


@pytest.mark.parametrize("cell", CELLS)
def test_saturated_gates_match_and_stay_finite(compiled, cell):
    """Pre-activations of ±100 and more: σ and tanh must saturate to 0, ±1 as torch's do, without
    overflow in the compiled exp. A gradient through a saturated gate is ill-conditioned in float32
    (1 - tanh² of a tanh rounded near 1), so each loop is held to the float64 truth: the compiled one
    may be off by twice what the Python loops are off, not by more (and never non-finite)."""
    layer = RecurrentLayer(CELLS[cell](4, 6), gradients="manual")
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.mul_(300)
    x, state = 10 * torch.randn(3, 5, 4), random_state(layer.cell, 3, scale=50)
    python_loops, compiled_loops = (run_layer(layer, x, state, compiled=choice) for choice in (False, True))
    truth = run_layer(copy.deepcopy(layer).double(), x.double(), tuple(s.double() for s in state), compiled=False)
    for exact, want, got in zip(truth, python_loops, compiled_loops, strict=True):
        exact, want, got = exact.detach(), want.detach(), got.detach()
        assert torch.isfinite(got).all()
        python_error = float((want.double() - exact).abs().max())
        scale = float(exact.abs().max().clamp(min=1))
        assert float((got.double() - exact).abs().max()) <= 2 * python_error + 2e-5 * scale


@pytest.mark.parametrize("cell", CELLS)
def test_the_compiled_loops_are_what_runs(compiled, monkeypatch, cell):
    """A float32 CPU layer calls them once forward and once backward; with LMTRAIN_COMPILED=0, for
    fewer than 4 steps (gemm.PACK_FROM), or in float64, it does not."""
    calls = []

    class Counting:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(compiled, name)

    monkeypatch.setitem(kernels._built, "module", Counting())
    layer = RecurrentLayer(CELLS[cell](3, 4), gradients="manual")
    layer(torch.randn(2, 5, 3))[0].sum().backward()
    expected = [f"{LOOPS[cell]}_forward", f"{LOOPS[cell]}_backward"]
    assert calls == expected
    with kernels.switched(False):
        layer(torch.randn(2, 5, 3))[0].sum().backward()
    layer(torch.randn(2, 3, 3))[0].sum().backward()  # 3 steps: fewer than packing W repays
    layer.double()(torch.randn(2, 5, 3, dtype=torch.float64))[0].sum().backward()
    assert calls == expected


def test_kernels_reject_what_they_cannot_read(compiled):
    """A float64 or non-contiguous buffer is an error in C++, not a wrong result (lmtrain/backprop/lstm.py never
    passes one; this guards the boundary)."""
    T, B, H = 2, 3, 4
    gates, a, c, tanh_c = (torch.zeros(T, B, 4 * H), torch.zeros(T + 1, B, H), torch.zeros(T + 1, B, H),
                           torch.zeros(T, B, H))
    W = torch.zeros(4 * H, H)
    with pytest.raises(RuntimeError, match="a must be a contiguous float32 CPU tensor"):
        compiled.lstm_forward(gates, a.double(), c, tanh_c, W)
    with pytest.raises(RuntimeError, match="gates must be"):
        compiled.lstm_forward(gates.transpose(0, 1), a, c, tanh_c, W)
    with pytest.raises(RuntimeError, match="W must be a contiguous"):
        compiled.lstm_forward(gates, a, c, tanh_c, W.t())
    with pytest.raises(RuntimeError, match=r"W must be \(4H, H\)"):
        compiled.lstm_backward(gates, c, tanh_c, a, c[0], W[:, :3].contiguous())


def call_arguments(text: str, start: int) -> list[str]:
    """The arguments of the call whose opening parenthesis is text[start], split at its own commas (not
    those inside a string literal or a nested call)."""
    arguments, current, depth, quoted = [], "", 0, False
    for position in range(start, len(text)):
        character = text[position]
        if character == '"' and text[position - 1] != "\\":
            quoted = not quoted
        if not quoted:
            if character == "(":
                depth += 1
                if depth == 1:
                    continue
            elif character == ")":
                depth -= 1
                if depth == 0:
                    return [*arguments, current.strip()]
            elif character == "," and depth == 1:
                arguments.append(current.strip())
                current = ""
                continue
        current += character
    raise AssertionError(f"no closing parenthesis for the call at {start}")


def test_no_check_in_the_kernels_writes_values_into_an_ostream():
    """A TORCH_CHECK message is one string literal; a message with values goes through `fail` (common.h)
    and std::to_string. TORCH_CHECK writes values into an ostream, and with torch 2.11's CUDA wheels
    and Ubuntu 24.04's GCC an extension doing so crashed the process instead of raising."""
    checked = 0
    for source in sorted((Path(kernels.__file__).parent / "csrc").glob("*.[ch]*")):
        text = source.read_text(encoding="utf-8")
        for match in re.finditer(r"\bTORCH_CHECK\s*\(", text):
            condition, *message = call_arguments(text, match.end() - 1)
            assert len(message) == 1 and re.fullmatch(r'("[^"]*"\s*)+', message[0]), (source.name, condition, message)
            checked += 1
    assert checked > 10


def test_gru_and_rnn_kernels_reject_what_they_cannot_read(compiled):
    """Wrong widths or dtypes are errors in C++ that name the buffer, not reads past its end."""
    T, B, H = 2, 3, 4
    c = torch.zeros(T + 1, B, H)
    with pytest.raises(RuntimeError, match=r"gates must be \(T, B, G H\) and W \(G H, H\), G = 2 or 3"):
        compiled.gru_forward(torch.zeros(T, B, 4 * H), c, torch.zeros(4 * H, H))
    with pytest.raises(RuntimeError, match="dA shaped like c"):
        compiled.gru_backward(torch.zeros(T, B, 3 * H), c, c[1:].contiguous(), torch.zeros(3 * H, H))
    with pytest.raises(RuntimeError, match=r"p \(T, B, H\)"):
        compiled.gru_after_forward(torch.zeros(T, B, 3 * H), c, torch.zeros(T, B, 2 * H), torch.zeros(3 * H, H),
                                   torch.zeros(H))
    with pytest.raises(RuntimeError, match="b_cc must be a contiguous float32"):
        compiled.gru_after_forward(torch.zeros(T, B, 3 * H), c, torch.zeros(T, B, H), torch.zeros(3 * H, H),
                                   torch.zeros(H, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"W must be \(H, H\)"):
        compiled.rnn_forward(torch.zeros(T, B, H), c, torch.zeros(H, H + 1))
    with pytest.raises(RuntimeError, match="a must be a contiguous float32"):
        compiled.rnn_backward(c.double(), c, torch.zeros(H, H))


def fresh_build(monkeypatch, build_result=None):
    """Forget any earlier build; `build_result` (module, reason) replaces the real build."""
    monkeypatch.setattr(kernels, "_built", {})
    if build_result is not None:
        monkeypatch.setattr(kernels, "_build", lambda announce: build_result)


def test_switched_off_quietly(monkeypatch):
    fresh_build(monkeypatch)
    monkeypatch.setenv(kernels.SWITCH, "0")
    lines = []
    assert kernels.load(announce=lines.append) is None
    assert kernels.unavailable_reason() == "LMTRAIN_COMPILED=0" and lines == []
    assert choose(torch.zeros(1)).loops is None


def test_no_compiler_is_one_line_and_the_python_loops(monkeypatch):
    fresh_build(monkeypatch)
    monkeypatch.delenv(kernels.SWITCH, raising=False)
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    lines = []
    assert kernels.load(announce=lines.append) is None
    assert lines == ["lmtrain: the compiled kernels are not available (no C++ compiler (no-such-compiler-here) "
                     "on PATH); using the Python code (same results, slower). LMTRAIN_COMPILED=0 silences this."]
    assert kernels.load(announce=lines.append) is None and len(lines) == 1  # said once per process
    layer = RecurrentLayer(LSTMCell(3, 4), gradients="manual")
    layer(torch.randn(2, 5, 3))[0].sum().backward()  # the Python loops run


def test_required_but_unavailable_stops_training_with_one_line(monkeypatch, tmp_path, config_factory):
    fresh_build(monkeypatch, (None, "ninja is not installed: pip install ninja"))
    monkeypatch.setenv(kernels.SWITCH, "1")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat\nthe dog ran\n" * 20, encoding="utf-8")
    config = config_factory(**{"data.path": str(corpus), "model.cell": "lstm", "train.out_dir": str(tmp_path / "run"),
                               "data.cache": False})
    with pytest.raises(LmtrainError, match=r"^LMTRAIN_COMPILED=1, but the compiled kernels are not available: "
                                           r"ninja is not installed: pip install ninja$"):
        train(config)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_every_cpu_run_builds_before_training(monkeypatch, tmp_path, config_factory):
    """Every cell's loss uses the compiled softmax cross-entropy, so a GRU or an autograd LSTM asks for
    the build too: once per process, from the trainer, before its first step (and its clock)."""
    asked = []
    fresh_build(monkeypatch)
    monkeypatch.delenv(kernels.SWITCH, raising=False)
    monkeypatch.setattr(kernels, "_build", lambda announce: asked.append(1) or (None, "test"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat\nthe dog ran\n" * 20, encoding="utf-8")
    for index, overrides in enumerate(({"model.cell": "gru"}, {"model.cell": "lstm", "model.gradients": "autograd"})):
        config = config_factory(**{"data.path": str(corpus), "train.out_dir": str(tmp_path / f"run{index}"),
                                   "train.max_steps": 1, "data.cache": False, **overrides})
        train(config)
    assert asked == [1]


def test_ninja_beside_python_is_found_when_not_on_path(monkeypatch, tmp_path):
    """`pip install ninja` in a venv that was not activated: the loader still finds it."""
    beside = Path(sys.executable).parent
    if not (beside / "ninja").exists():
        pytest.skip("ninja is not installed beside this Python")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert kernels._ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == str(beside)


def test_no_ninja_anywhere_is_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert not kernels._ninja_on_path()
    (tmp_path / "c++").symlink_to(shutil.which("c++") or "/bin/true")
    assert kernels.build_obstacle() == "ninja is not installed: pip install ninja"


@pytest.mark.parametrize("value", ["abc", "-1", "inf", "nan"])
def test_a_bad_wait_bound_is_named(monkeypatch, value):
    monkeypatch.setenv(kernels.WAIT, value)
    with pytest.raises(LmtrainError,
                       match=rf"^LMTRAIN_KERNELS_WAIT must be a number of seconds, 0 or more; got '{value}'$"):
        kernels.wait_seconds()
    monkeypatch.setenv(kernels.WAIT, "2.5")
    assert kernels.wait_seconds() == 2.5


def test_the_switches_read_blank_as_unset_and_ignore_spaces(monkeypatch):
    monkeypatch.setenv(kernels.WAIT, "")
    assert kernels.wait_seconds() == kernels.DEFAULT_WAIT_SECONDS
    monkeypatch.setenv(kernels.WAIT, " 5 ")
    assert kernels.wait_seconds() == 5.0
    monkeypatch.setenv(kernels.SWITCH, " 1")
    assert kernels.switch() == "1"
    monkeypatch.setenv(kernels.SWITCH, "")
    assert kernels.switch() == ""


def test_clear_refuses_a_mistyped_switch_as_every_command_does(monkeypatch):
    monkeypatch.setenv(kernels.SWITCH, "2")
    with pytest.raises(LmtrainError, match=r"^LMTRAIN_COMPILED must be 0 .* got '2'$"):
        kernels.clear()


def test_required_but_unavailable_stops_any_run_not_only_training(monkeypatch):
    fresh_build(monkeypatch, (None, "ninja is not installed: pip install ninja"))
    monkeypatch.setenv(kernels.SWITCH, "1")
    with pytest.raises(LmtrainError, match=r"^LMTRAIN_COMPILED=1, but the compiled kernels are not available: "):
        choose(torch.zeros(2, 3))
    monkeypatch.delenv(kernels.SWITCH)
    assert choose(torch.zeros(2, 3)).loops is None  # unset: the Python loops, after one line


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_the_source_compiles_without_the_x86_bfloat16_instructions():
    """Where AVX-512 BF16 cannot be built (ARM), the kernels still compile; the bfloat16 products are
    then the Python loops' (`bf16_products_supported()` is false). A syntax check: no library is made."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{path}" for path in (*include_paths(), sysconfig.get_paths()["include"])]
    for standard in ("c++20", "c++17"):  # torch's headers need C++20 from 2.14 on; an older compiler may lack it
        result = subprocess.run([os.environ.get("CXX", "c++"), f"-std={standard}", "-fsyntax-only", "-fopenmp",
                                 "-DTORCH_EXTENSION_NAME=lmtrain_kernels", "-DLMTRAIN_NO_X86", *includes,
                                 str(kernels.SOURCE)], capture_output=True, text=True, timeout=600)
        if f"-std={standard}" not in result.stderr:  # the compiler knew the standard
            break
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 0 and not errors, "\n".join(errors[:20])


# -- a kernel cache this user cannot read or change --------------------------------------------------

def as_a_user(command: list[str]) -> list[str]:
    """`command` as a user runs it, without root's power to read and change every file: under setpriv where
    the tests run as root (skipped where setpriv cannot drop it), as it is otherwise."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return command
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    if shutil.which("setpriv") is None or subprocess.run([*drop, "true"], capture_output=True).returncode != 0:
        pytest.skip("runs as root, and setpriv cannot drop root's power over files here")
    return [*drop, *command]


def fake_cache(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A cache folder holding this lmtrain's build (a stand-in library: nothing here loads it), and the
    environment of an lmtrain process that uses it."""
    root = tmp_path / "extensions" / "lmtrain"
    folder = root / kernels.spec().module
    folder.mkdir(parents=True)
    (folder / f"{folder.name}.so").write_bytes(b"")
    (root / f"{folder.name}.lock").write_bytes(b"")
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root.parent), "TMPDIR": str(tmp_path / "tmp"),
           "PYTHONWARNINGS": "ignore"}
    env.pop(kernels.SWITCH, None)
    return root, env


def lmtrain(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(as_a_user([sys.executable, "-m", "lmtrain", *args]), env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("closed", ["build", "cache"])
def test_a_cache_that_cannot_be_read_is_a_state_not_a_traceback(tmp_path, closed):
    """An image built as root and run as another user, a cache folder with mode 000: `--version` and
    `kernels status` say that the kernels are unusable, and why."""
    root, env = fake_cache(tmp_path)
    shut = root / kernels.spec().module if closed == "build" else root
    shut.chmod(0)
    try:
        version, status = lmtrain(env, "--version"), lmtrain(env, "kernels", "status")
    finally:
        shut.chmod(0o755)
    unusable = f"unusable (cannot read the kernel cache {root}: permission denied)"
    assert version.returncode == 0 and version.stderr == "", version.stderr
    assert version.stdout.endswith(f", compiled kernels: {unusable}\n")
    assert status.returncode == 0 and status.stderr == "", status.stderr
    assert status.stdout.splitlines()[0] == f"kernels: {unusable}"
    seen = f"  {shut.name}  unreadable (permission denied)" if closed == "build" else \
        f"cache {root}: cannot be read: permission denied"
    assert any(line.startswith(seen) for line in status.stdout.splitlines()), status.stdout


def test_the_state_of_a_cache_that_cannot_be_read_in_process(monkeypatch, tmp_path):
    """The same, wherever the permission itself cannot be taken away (a root without setpriv)."""
    root, env = fake_cache(tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", env["TORCH_EXTENSIONS_DIR"])
    monkeypatch.setattr(tempfile, "tempdir", env["TMPDIR"])  # the private fallback: empty, as fake_cache's env has it
    monkeypatch.delenv(kernels.SWITCH, raising=False)
    assert kernels.status()["state"] == "built"
    real_open = os.open

    def refusing(path, *args, **kwargs):
        if str(path).startswith(str(root)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)
    unusable = f"unusable (cannot read the kernel cache {root}: permission denied)"
    assert kernels.status()["state"] == unusable and kernels.state() == unusable


def test_clear_of_a_read_only_cache_removes_nothing_and_says_so(tmp_path):
    root, env = fake_cache(tmp_path)
    (root / "lmtrain_kernels_0123456789abcdef.failed").write_text("error: an older build\n")
    before = sorted(root.rglob("*"))
    root.chmod(0o555)
    try:
        cleared = lmtrain(env, "kernels", "clear")
        after = sorted(root.rglob("*"))
    finally:
        root.chmod(0o755)
    assert cleared.returncode == 2 and cleared.stdout == ""
    assert cleared.stderr == f"error: cannot clear the kernel cache {root}: permission denied; nothing was removed\n"
    assert after == before


def test_clear_names_what_it_could_not_remove_and_what_it_removed(tmp_path):
    root, env = fake_cache(tmp_path)
    stuck = root / "lmtrain_kernels_0123456789abcdef"
    stuck.mkdir()
    (stuck / "lmtrain_kernels_0123456789abcdef.so").write_bytes(b"")
    stuck.chmod(0o555)  # its library cannot be removed
    try:
        cleared = lmtrain(env, "kernels", "clear")
    finally:
        stuck.chmod(0o755)
    built = root / kernels.spec().module
    assert cleared.returncode == 2 and cleared.stdout == ""
    assert cleared.stderr == f"error: cannot remove {stuck}: permission denied; removed {built}\n"
    assert not built.exists() and (stuck / "lmtrain_kernels_0123456789abcdef.so").exists()
