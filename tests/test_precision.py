"""Mixed precision, `train.precision: bfloat16`: on a route chosen under `torch.autocast(..., bfloat16)`
every product of the recurrences and the output layer takes bfloat16 factors and float32 sums, and nothing
else changes; a backward runs on its forward's route.

Checked exactly where the arithmetic is defined (the library products against torch's bfloat16 mm; the
compiled LSTM loops against the same equations with bfloat16-rounded factors summed in float64), and
loosely where it is not (gradients within bfloat16's 2^-8 of float32's; a short training run)."""

from __future__ import annotations

import pytest
import torch

from lmtrain.backprop import gru
from lmtrain.backprop.gru import (
    _gru_after_backward_loop,
    _gru_after_forward_loop,
    _gru_backward_loop,
    _gru_forward_loop,
)
from lmtrain.backprop.lstm import _lstm_backward_loop, _lstm_forward_loop
from lmtrain.backprop.rnn import _rnn_backward_loop, _rnn_forward_loop
from lmtrain.config import ConfigError, build_config
from lmtrain.model.cells import GRUCell, LSTMCell, RNNCell
from lmtrain.model.layers import manual_layer
from lmtrain.speed import gemm, kernels, route
from lmtrain.speed.route import Route, choose
from lmtrain.training.trainer import train

BF16 = torch.bfloat16


def rounded(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s values rounded to bfloat16, in float64: exact factors for a float64 reference sum."""
    return tensor.detach().to(BF16).double()


def test_the_route_takes_its_product_dtype_from_autocast():
    x = torch.zeros(2, 3)
    assert choose(x).product_dtype is None
    with torch.autocast("cpu", dtype=BF16):
        assert choose(x).product_dtype is BF16
        assert choose(x.to(BF16)).product_dtype is None  # mixed precision is for float32 models
        with torch.autocast("cpu", enabled=False):
            assert choose(x).product_dtype is None
    assert choose(x).product_dtype is None


@pytest.mark.usefixtures("onednn_everywhere")
@pytest.mark.parametrize("has_bfloat16", [True, False], ids=["onednn-bfloat16", "no-onednn-bfloat16"])
def test_onednn_makes_bfloat16_products_only_where_it_has_them(monkeypatch, has_bfloat16):
    """On an AVX2 CPU oneDNN has no bfloat16 linear (it raises): torch's addmm makes those products."""
    if route.ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(route, "ONEDNN_BFLOAT16", has_bfloat16)
    x = torch.zeros(2, 3)
    with gemm.use_onednn(True):
        assert choose(x).onednn
        with torch.autocast("cpu", dtype=BF16):
            assert choose(x).onednn is has_bfloat16
        assert choose(x.to(BF16)).onednn is has_bfloat16


def test_mm_and_linear_are_torchs_bfloat16_products_returned_as_float32():
    a, b, W, bias = torch.randn(37, 24), torch.randn(24, 19), torch.randn(19, 24), torch.randn(19)
    route = Route(product_dtype=BF16)
    product, projected, unbiased = gemm.mm(a, b, route), gemm.linear(a, W, bias, route), gemm.linear(a, W, None, route)
    assert product.dtype == projected.dtype == unbiased.dtype == torch.float32
    assert torch.equal(product, torch.mm(a.to(BF16), b.to(BF16)).float())
    assert torch.equal(unbiased, torch.mm(a.to(BF16), W.to(BF16).t()).float())
    assert torch.equal(projected, bias + torch.mm(a.to(BF16), W.to(BF16).t()))
    assert not torch.equal(product, a @ b)  # bfloat16 really made it: float32's product differs
    torch.testing.assert_close(product, a @ b, rtol=0, atol=2e-2 * float((a @ b).abs().max()))


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "aten"])
@pytest.mark.parametrize("uses", [1, 8], ids=["unpacked", "packed"])
def test_fixed_product_rounds_its_factors_and_adds_in_float32(onednn, uses):
    W, x, add = torch.randn(512, 256), torch.randn(6, 256), torch.randn(6, 512)  # past ONEDNN_FROM_WEIGHTS
    with gemm.use_onednn(onednn), torch.autocast("cpu", dtype=BF16):
        route = choose(W, compiled=False)
    product = gemm.FixedProduct(W, 6, uses, route)
    plain, added = product(x), product(x, add)
    expected = torch.mm(x.to(BF16), W.to(BF16).t())
    assert plain.dtype == added.dtype == torch.float32
    assert torch.equal(plain, expected.float())
    assert torch.equal(added, add + expected)


def test_a_backward_makes_its_products_in_its_forwards_precision():
    """The projection's forward under autocast, its backward called after the block has ended: the
    weight gradient is still the bfloat16 product (the route kept in the context)."""
    x, W = torch.randn(4, 5, 16, requires_grad=True), torch.randn(11, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16):
        logits = gemm.projection(x, W)
    grad = torch.randn_like(logits)
    logits.backward(grad)
    rows = grad.reshape(-1, 11)
    assert torch.equal(W.grad, torch.mm(rows.t().to(BF16), x.detach().reshape(-1, 16).to(BF16)).float())
    assert torch.equal(x.grad, torch.mm(rows.to(BF16), W.detach().to(BF16)).float().view_as(x))


class RoundedProduct:
    """A FixedProduct (`add + x Wᵀ`) in float64 with both factors rounded to bfloat16: what the compiled
    loops' products compute with float32 sums."""

    def __init__(self, W, rows=None, uses=None, route=None):
        self.W_t = rounded(W).t()

    def __call__(self, x, add=None):
        product = rounded(x) @ self.W_t
        return product if add is None else add + product


def compiled_loops_in_bfloat16(compiled, cell, x, state, W_recurrent, W_input, b, dA, dc_T):
    """One cell's compiled loops, forward then backward, with bfloat16 products. Returns the float32
    results and, in the same order, the bfloat16 copies the loops made of their factors."""
    T, (B, H) = x.size(1), state.shape
    buffer = torch.empty(T + 1, B, H)
    buffer[0] = state
    inputs = (x.transpose(0, 1) @ W_input.t() + b).contiguous()           # W_x x(t) + b, time-major
    low = torch.empty(T + 1, B, H, dtype=BF16)
    gradients_low = torch.empty_like(inputs, dtype=BF16)
    if cell == "lstm":
        c, tanh_c = torch.empty(T + 1, B, H), torch.empty(T, B, H)
        c[0] = state.flip(-1)
        compiled.lstm_forward(inputs, buffer, c, tanh_c, W_recurrent, low)
        dz, da, dc = compiled.lstm_backward(inputs, c, tanh_c, dA, dc_T, W_recurrent, gradients_low)
        return [buffer, c, inputs, dz, da, dc], [low, gradients_low], [buffer, dz]
    if cell == "rnn":
        compiled.rnn_forward(inputs, buffer, W_recurrent, low)
        dz, da = compiled.rnn_backward(buffer, dA.clone(), W_recurrent, gradients_low)
        return [buffer, dz, da], [low, gradients_low], [buffer, dz]
    if cell == "gru-after":
        p = torch.empty(T, B, H)
        compiled.gru_after_forward(inputs, buffer, p, W_recurrent, b[:H], low)
        dr, dz_c, dc = compiled.gru_after_backward(inputs, buffer, p, dA.clone(), W_recurrent, gradients_low)
        return [buffer, inputs, p, dr, dz_c, dc], [low, gradients_low], [buffer, dr]
    compiled.gru_forward(inputs, buffer, W_recurrent, low)                 # the lecture's, with or without Γ_r
    dz, dc = compiled.gru_backward(inputs, buffer, dA, W_recurrent, gradients_low)
    return [buffer, inputs, dz, dc], [low, gradients_low], [buffer, dz]


def emulated_loops(cell, x, state, W_recurrent, W_input, b, dA, dc_T, monkeypatch):
    """The same loops in float64, the Python loops with every recurrent product's factors rounded to
    bfloat16 (`RoundedProduct`): the results `compiled_loops_in_bfloat16` returns first."""
    T, (B, H) = x.size(1), state.shape
    buffer = torch.zeros(T + 1, B, H, dtype=torch.float64)
    buffer[0] = state
    inputs = (x.double().transpose(0, 1) @ W_input.double().t() + b.double()).contiguous()
    dA = dA.double()
    if cell == "lstm":
        c, tanh_c = torch.zeros_like(buffer), torch.empty_like(buffer[1:])
        c[0] = state.flip(-1)
        _lstm_forward_loop(inputs, buffer, c, tanh_c, RoundedProduct(W_recurrent))
        dz, da, dc = _lstm_backward_loop(inputs, c, tanh_c, dA, dc_T.double(), RoundedProduct(W_recurrent.t()))
        return [buffer, c, inputs, dz, da, dc]
    if cell == "rnn":
        _rnn_forward_loop(inputs, buffer, RoundedProduct(W_recurrent))
        return [buffer, *_rnn_backward_loop(buffer, dA, RoundedProduct(W_recurrent.t()))]
    if cell == "gru-after":
        p = torch.empty_like(buffer[1:])
        _gru_after_forward_loop(inputs, buffer, p, RoundedProduct(W_recurrent), b[:H].double())
        return [buffer, inputs, p, *_gru_after_backward_loop(inputs, buffer, p, dA, RoundedProduct(W_recurrent.t()))]
    monkeypatch.setattr(gru, "FixedProduct", RoundedProduct)                # the lecture's loops make their own
    relevance_gate = W_recurrent.size(0) == 3 * H
    _gru_forward_loop(inputs, buffer, W_recurrent, relevance_gate, None)
    return [buffer, inputs, *_gru_backward_loop(inputs, buffer, dA, W_recurrent, relevance_gate, None)]


GATES = {"lstm": 4, "rnn": 1, "gru-after": 3, "gru": 3, "gru-simplified": 2}


# On three threads, B = 3, 5 and 8 split the units (each thread rounds its units, then all meet); B = 25
# splits the rows (8 or 9 each, every unit). One thread takes every row and unit.
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("B, T, E, H", [(3, 5, 4, 16), (5, 9, 7, 40), (8, 6, 16, 130), (25, 6, 8, 48)])
def test_compiled_loops_in_bfloat16_are_the_rounded_products(compiled, cell, threads, B, T, E, H, monkeypatch):
    if not compiled.bf16_products_supported():
        pytest.skip("this CPU has no AVX-512 BF16")
    G = GATES[cell]
    x, state = torch.randn(B, T, E), torch.randn(B, H)
    W_recurrent, W_input, b = torch.randn(G * H, H) / H ** 0.5, torch.randn(G * H, E) / E ** 0.5, torch.randn(G * H)
    dA, dc_T = torch.randn(T + 1, B, H), torch.randn(B, H)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, copies, copied = compiled_loops_in_bfloat16(compiled, cell, x, state, W_recurrent, W_input, b, dA, dc_T)
    finally:
        torch.set_num_threads(previous)
    want = emulated_loops(cell, x, state, W_recurrent, W_input, b, dA, dc_T, monkeypatch)
    # Not bit for bit: where float32's a(t) and float64's straddle a bfloat16 rounding boundary, the next
    # factor differs by one bfloat16 step (2^-8 relative) and the difference travels on. So most values agree
    # to float32's sums (over 40 draws a cell, at least 81% within 1e-5 of the largest, and all within 1e-3),
    # where float32 products agree in at most 45% and miss by up to 9e-3.
    for got_one, expected in zip(got, want, strict=True):
        scale = float(expected.abs().max())
        torch.testing.assert_close(got_one.double(), expected, rtol=0, atol=2e-3 * scale)
        assert float(((got_one.double() - expected).abs() <= 1e-5 * scale).double().mean()) >= 0.75
    # the bfloat16 copies are torch's own rounding of the float32 values, bit for bit
    for copy, values in zip(copies, copied, strict=True):
        assert torch.equal(copy, values.to(BF16))


def run_layer(cell, x, state, dtype, compiled=True):
    """Outputs and every gradient of a manual layer under products in `dtype` (None: float32)."""
    x, state = x.detach().requires_grad_(), tuple(s.detach().requires_grad_() for s in state)
    cell.zero_grad()
    with torch.autocast("cpu", dtype=dtype or BF16, enabled=dtype is not None):
        outputs, final = manual_layer(cell, x, state, route=choose(x, compiled=compiled))
    loss = (outputs * torch.linspace(-1, 1, outputs.size(-1))).sum() + final[0].square().sum()
    loss.backward()
    return [outputs, x.grad, *(s.grad for s in state), *(p.grad for p in cell.parameters())]


@pytest.mark.parametrize("compiled_loops", [True, False], ids=["compiled", "python"])
@pytest.mark.parametrize("make_cell, H", [(LSTMCell, 48), (LSTMCell, 13), (GRUCell, 48), (RNNCell, 48)],
                         ids=["lstm", "lstm-odd-H", "gru", "rnn"])
def test_bfloat16_values_and_gradients_are_within_its_rounding_of_float32(make_cell, H, compiled_loops):
    cell = make_cell(10, H)
    x, state = torch.randn(4, 12, 10), tuple(torch.randn(4, H) for _ in cell.initial_state(1))
    exact = run_layer(cell, x, state, None, compiled_loops)
    mixed = run_layer(cell, x, state, BF16, compiled_loops)
    differs = False
    for want, got in zip(exact, mixed, strict=True):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        relative = float((got - want).detach().norm() / want.detach().norm())
        assert relative < 2e-2, relative                    # bfloat16 keeps 8 bits: about 0.4% per factor
        differs |= relative > 0
    assert differs


LOOPS = ("lstm_forward", "lstm_backward", "gru_forward", "gru_backward", "gru_after_forward", "gru_after_backward",
         "rnn_forward", "rnn_backward")


@pytest.mark.parametrize("make_cell, H, instructions", [(LSTMCell, 32, False), (GRUCell, 32, False),
                                                        (RNNCell, 32, False), (LSTMCell, 13, True),
                                                        (GRUCell, 13, True), (RNNCell, 13, True)],
                         ids=["lstm", "gru", "rnn", "lstm-odd-H", "gru-odd-H", "rnn-odd-H"])
def test_where_bfloat16_pairs_cannot_be_made_the_compiled_loops_make_float32_products(
        compiled, make_cell, H, instructions, monkeypatch):
    """On a CPU without AVX-512 BF16, or at an odd hidden size (the loops' bfloat16 factors come in pairs),
    the compiled loops still run, with float32 per-step products (no bfloat16 buffers), and only the
    products over all time steps take bfloat16 factors: values within bfloat16's rounding of float32's."""
    if instructions and not compiled.bf16_products_supported():
        pytest.skip("this CPU has no AVX-512 BF16")
    monkeypatch.setattr(compiled, "bf16_products_supported", lambda: instructions)
    low_buffers = []
    for name in LOOPS:
        monkeypatch.setattr(compiled, name, lambda *arguments, loop=getattr(compiled, name):
                            low_buffers.append(arguments[-1]) or loop(*arguments))
    cell, x = make_cell(6, H), torch.randn(3, 8, 6)
    state = tuple(torch.randn(3, H) for _ in cell.initial_state(1))
    mixed = run_layer(cell, x, state, BF16, compiled=True)
    assert len(low_buffers) == 2 and low_buffers == [None, None]  # the compiled forward and backward ran
    exact = run_layer(cell, x, state, None, compiled=True)
    for want, got in zip(exact, mixed, strict=True):
        relative = float((got - want).detach().norm() / want.detach().norm())
        assert 0 < relative < 2e-2, relative  # the products over all steps rounded their factors


def test_the_compiled_loops_reject_a_mismatched_bfloat16_buffer(compiled):
    if not compiled.bf16_products_supported():
        pytest.skip("this CPU has no AVX-512 BF16")
    T, B, H = 4, 2, 8
    gates, a, c = torch.randn(T, B, 4 * H), torch.zeros(T + 1, B, H), torch.zeros(T + 1, B, H)
    with pytest.raises(RuntimeError, match=r"^a_low must be a contiguous bfloat16 CPU tensor shaped like \(5, 2, 8\)$"):
        compiled.lstm_forward(gates, a, c, torch.empty(T, B, H), torch.randn(4 * H, H),
                              torch.empty(T, B, H, dtype=BF16))
    with pytest.raises(RuntimeError, match="a_low must be a contiguous bfloat16"):
        compiled.lstm_forward(gates, a, c, torch.empty(T, B, H), torch.randn(4 * H, H), torch.empty(T + 1, B, H))


def test_bfloat16_needs_the_manual_backward():
    with pytest.raises(ConfigError, match="train.precision: bfloat16 needs model.gradients: manual"):
        build_config({"data.path": "x.txt", "train.max_steps": 1, "train.precision": "bfloat16",
                      "model.gradients": "autograd"})
    with pytest.raises(ConfigError, match="train.precision must be one of float32, bfloat16"):
        build_config({"data.path": "x.txt", "train.max_steps": 1, "train.precision": "float16"})


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_training_in_bfloat16_learns_like_float32(tmp_path, cell):
    """The same tiny run in both precisions: both learn, to validation losses within 0.05 nats of each other, and the
    checkpoint records the precision it was trained in."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"the {word} sat on the mat\n" for word in ("cat", "dog", "bird", "fox") * 60))
    results = {}
    for precision in ("float32", "bfloat16"):
        config = build_config({"data.path": str(corpus), "model.cell": cell, "model.hidden_size": 32,
                               "model.embed_size": 16, "train.batch_size": 8, "train.bptt": 16,
                               "train.max_steps": 120, "train.lr": 0.01, "train.eval_every": 120,
                               "train.final_samples": 0, "train.precision": precision,
                               "train.out_dir": str(tmp_path / precision)})
        results[precision] = train(config)
    exact, mixed = results["float32"].valid_loss, results["bfloat16"].valid_loss
    assert exact < 1.5 and mixed < 1.5  # from ln(vocabulary) = 2.9
    assert abs(mixed - exact) < 0.05  # nats; measured under 0.001 for each cell
    saved = torch.load(tmp_path / "bfloat16" / "last.pt", weights_only=True)
    assert saved["config"]["train"]["precision"] == "bfloat16"


def test_training_in_bfloat16_without_the_instructions_warns(tmp_path, compiled, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\n" * 40)
    monkeypatch.setattr(compiled, "bf16_products_supported", lambda: False)
    warnings = []
    config = build_config({"data.path": str(corpus), "model.hidden_size": 16, "model.embed_size": 8,
                           "train.batch_size": 4, "train.bptt": 8, "train.max_steps": 2, "train.final_samples": 0,
                           "train.precision": "bfloat16", "train.out_dir": str(tmp_path / "run")})
    train(config, warn=warnings.append)
    assert any("no AVX-512 BF16" in line for line in warnings), warnings


def test_training_in_bfloat16_with_an_odd_hidden_size_warns(tmp_path, compiled):
    """The compiled loops take bfloat16 values in pairs: at an odd hidden size their per-step products stay
    float32, and the run says so."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\n" * 40)
    warned = {}
    for hidden_size in (16, 15):
        warnings = []
        config = build_config({"data.path": str(corpus), "model.hidden_size": hidden_size, "model.embed_size": 8,
                               "train.batch_size": 4, "train.bptt": 8, "train.max_steps": 1, "train.final_samples": 0,
                               "train.precision": "bfloat16", "train.out_dir": str(tmp_path / str(hidden_size))})
        train(config, warn=warnings.append)
        warned[hidden_size] = [line for line in warnings if "model.hidden_size is odd (15)" in line]
    assert not warned[16]
    assert len(warned[15]) == (1 if compiled.bf16_products_supported() else 0)


def test_a_bfloat16_run_may_go_on_in_float32(tmp_path):
    """train.precision is how the products are made, not what is learned: --resume accepts a change (a run
    started on a CPU with AVX-512 BF16 may go on on one without), and the run continues from its step."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\n" * 40)
    values = {"data.path": str(corpus), "model.hidden_size": 16, "model.embed_size": 8, "train.batch_size": 4,
              "train.bptt": 8, "train.final_samples": 0, "train.out_dir": str(tmp_path / "run")}
    train(build_config({**values, "train.max_steps": 3, "train.precision": "bfloat16"}))
    resumed = train(build_config({**values, "train.max_steps": 6, "train.precision": "float32"}), resume=True)
    assert resumed.progress.step == 6
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["config"]["train"]["precision"] == "float32"



@pytest.mark.usefixtures("onednn_everywhere")
@pytest.mark.parametrize("dtype", [None, BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("make_cell", [LSTMCell, GRUCell, RNNCell], ids=["lstm", "gru", "rnn"])
def test_a_backward_runs_on_its_forwards_route_whatever_changes_between(make_cell, dtype, monkeypatch):
    """Forward with the compiled kernels and oneDNN (H = 256: past ONEDNN_FROM_WEIGHTS), under autocast
    or not; before the backward, autocast has ended, the kernels are switched off and (in float32) so is
    oneDNN: the gradients are bit for bit those of a backward run with nothing changed. (torch's own
    bfloat16 mm takes another kernel when oneDNN is off: that switch is left alone under bfloat16.)"""
    H = 256
    cell, x = make_cell(6, H), torch.randn(3, 8, 6)
    state = tuple(torch.randn(3, H) for _ in cell.initial_state(1))

    def gradients(change_between: bool):
        cell.zero_grad()
        with torch.autocast("cpu", dtype=dtype or BF16, enabled=dtype is not None):
            outputs, _ = manual_layer(cell, x, state)
        with monkeypatch.context() as switches:
            if change_between:
                switches.setenv(kernels.SWITCH, "0")
                if dtype is None:
                    switches.setattr(torch.backends.mkldnn, "enabled", False)
            (outputs * torch.linspace(-1, 1, H)).sum().backward()
        return [parameter.grad.clone() for parameter in cell.parameters()]

    for unchanged, changed in zip(gradients(False), gradients(True), strict=True):
        assert torch.equal(unchanged, changed)
