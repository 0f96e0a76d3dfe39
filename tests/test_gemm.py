"""lmtrain.speed.gemm: oneDNN's products equal ATen's to float32 rounding, and the hand-written backward
gives the same values and gradients whichever runs them (float32, where oneDNN takes over)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_backprop import CELL_CASES, gradients, make_cell, random_inputs

from lmtrain.model.layers import RecurrentLayer
from lmtrain.speed import gemm, route
from lmtrain.speed.gemm import FixedProduct, linear, times_weight, use_onednn
from lmtrain.speed.route import choose

pytestmark = pytest.mark.usefixtures("onednn_everywhere")


def onednn_runs(tensor: torch.Tensor) -> bool:
    """Whether a route chosen for `tensor` now lets oneDNN make the products."""
    return choose(tensor, compiled=False).onednn


needs_onednn = pytest.mark.skipif(route.ONEDNN_LINEAR is None, reason="this torch has no oneDNN")
FLOAT32 = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("add", [None, "bias", "matrix", "strided"])
def test_fixed_product_is_x_w_transposed_plus_add(add, monkeypatch):
    rows, K, N = 5, 7, 6
    x, W = torch.randn(rows, K), torch.randn(N, K)
    monkeypatch.setattr(gemm, "ONEDNN_FROM_WEIGHTS", 1)  # these small sizes too
    wide = torch.randn(rows, 2 * N)
    other = {None: None, "bias": torch.randn(N), "matrix": torch.randn(rows, N), "strided": wide[:, N:]}[add]
    expected = x.double() @ W.double().t() + (0 if other is None else other.double())
    for onednn in (True, False):
        with use_onednn(onednn):
            product = FixedProduct(W, rows, 8, choose(W, compiled=False))
            assert product.onednn == (onednn and onednn_runs(W))
            torch.testing.assert_close(product(x, other).double(), expected, **FLOAT32)


def test_linear_matches_float64():
    x, W, b = torch.randn(9, 4), torch.randn(3, 4), torch.randn(3)
    for onednn in (True, False):
        with use_onednn(onednn):
            torch.testing.assert_close(linear(x, W, b, choose(x, compiled=False)).double(),
                                       x.double() @ W.double().t() + b.double(), **FLOAT32)
            torch.testing.assert_close(linear(x, W, None, choose(x, compiled=False)).double(),
                                       x.double() @ W.double().t(), **FLOAT32)


@pytest.mark.parametrize("rows", [3, 6, 11], ids=["fewer-rows", "as-many-rows", "more-rows"])
def test_times_weight_is_x_w_by_the_cheaper_product(rows, monkeypatch):
    """x W (the input gradient, W as stored) in float32 and float64; oneDNN's linear, which needs a
    copy of Wᵀ, makes it only when the rows are at least the weight's (N = 6), torch.mm otherwise."""
    calls = []
    monkeypatch.setattr(gemm, "linear", lambda *arguments: calls.append(arguments) or linear(*arguments))
    for dtype in (torch.float32, torch.float64):
        x, W = torch.randn(rows, 6, dtype=dtype), torch.randn(6, 4, dtype=dtype)
        for onednn in (True, False):
            calls.clear()
            with use_onednn(onednn):
                route_ = choose(x, compiled=False)
                torch.testing.assert_close(times_weight(x, W, route_).double(), x.double() @ W.double(), **FLOAT32)
            by_onednn = route_.onednn and rows >= 6
            assert gemm.times_weight_by_onednn(rows, 6, route_) is by_onednn
            assert len(calls) == by_onednn
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision: torch.mm of bfloat16 factors
        assert not gemm.times_weight_by_onednn(rows, 6, choose(torch.zeros(1), compiled=False))


def test_float64_and_switched_off_stay_with_aten():
    W64 = torch.randn(1024, 256, dtype=torch.float64)
    assert not FixedProduct(W64, 2, 8, choose(W64, compiled=False)).onednn
    assert not FixedProduct(W64, 2, 8, choose(torch.zeros(1), compiled=False)).onednn  # W's own dtype counts too
    # small: MKL's addmm is faster
    assert not FixedProduct(torch.randn(3, 3), 2, 8, choose(torch.zeros(1), compiled=False)).onednn
    assert (FixedProduct(torch.randn(1024, 256), 2, 8, choose(torch.zeros(1), compiled=False)).onednn
            == onednn_runs(torch.zeros(1)))
    with use_onednn(False):
        assert not onednn_runs(torch.zeros(1))


def test_onednn_makes_float32_products_except_on_avx2_cpus():
    """MKL's addmm is the faster on an x86 CPU with AVX2 and no AVX-512; elsewhere oneDNN stays."""
    assert route.onednn_for_float32("AVX512")
    assert not route.onednn_for_float32("AVX2")
    assert route.onednn_for_float32("DEFAULT")  # not measured: as before


@needs_onednn
@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
def test_the_route_follows_the_cpus_float32_choice(monkeypatch, capability):
    """The route asks oneDNN for float32 products as `ONEDNN_FLOAT32` says; bfloat16 products follow
    oneDNN's own capability, float64 and the switched-off case never use it."""
    monkeypatch.setattr(route, "ONEDNN_FLOAT32", route.onednn_for_float32(capability))
    x = torch.zeros(2, 3)
    with use_onednn(True):
        assert choose(x).onednn is (capability == "AVX512")
        assert choose(x.double()).onednn is False
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert choose(x).onednn is route.ONEDNN_BFLOAT16
    with use_onednn(False):
        assert choose(x).onednn is False


@needs_onednn
@pytest.mark.parametrize("name", sorted(CELL_CASES))
@pytest.mark.parametrize("reverse", [False, True])
def test_manual_layer_same_with_either_gemm(name, reverse, monkeypatch):
    """float32 values and every gradient agree between oneDNN and ATen products (and with float64)."""
    monkeypatch.setattr(gemm, "ONEDNN_FROM_WEIGHTS", 1)
    torch.manual_seed(0)
    cell = make_cell(name, torch.float32)
    x, state = random_inputs(cell, steps=7, dtype=torch.float32)
    layer = RecurrentLayer(cell, reverse=reverse, gradients="manual")
    results = {}
    for onednn in (True, False):
        with use_onednn(onednn):
            results[onednn] = gradients(copy.deepcopy(layer), x, state)
    reference = gradients(copy.deepcopy(layer).double(), x.double(), tuple(s.double() for s in state))
    for result in results.values():
        torch.testing.assert_close(result[0].double(), reference[0], **FLOAT32)
        for name_, gradient in result[2].items():
            torch.testing.assert_close(gradient.double(), reference[2][name_], **FLOAT32, msg=name_)


@needs_onednn
def test_one_use_is_not_packed(monkeypatch):
    monkeypatch.setattr(gemm, "ONEDNN_FROM_WEIGHTS", 1)
    # sampling: one product per weight
    assert not FixedProduct(torch.randn(3, 3), 2, 1, choose(torch.zeros(1))).W.is_mkldnn
    assert FixedProduct(torch.randn(3, 3), 2, 8, choose(torch.zeros(1), compiled=False)).W.is_mkldnn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_projection_is_linear_with_its_gradients(dtype, bias):
    """gemm.projection (oneDNN forward for float32) against F.linear: values and all three gradients,
    on a (B, T, K) input as the language model's output layer sees it."""
    x, W = torch.randn(3, 5, 7, dtype=dtype), torch.randn(11, 7, dtype=dtype)
    b = torch.randn(11, dtype=dtype) if bias else None
    ours = [t.clone().requires_grad_() if t is not None else None for t in (x, W, b)]
    theirs = [t.clone().requires_grad_() if t is not None else None for t in (x, W, b)]
    weights = torch.randn(3, 5, 11, dtype=dtype)
    out, expected = gemm.projection(*ours), torch.nn.functional.linear(*theirs)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, expected, **tolerance)
    for mine, reference in zip(ours, theirs):
        if mine is not None:
            torch.testing.assert_close(mine.grad, reference.grad, **tolerance)


def test_projection_with_a_tied_weight_sums_both_gradients():
    """Weight tying: the embedding matrix is also the projection; its gradient is the sum of both uses."""
    embedding = torch.randn(6, 4, requires_grad=True)
    tokens = torch.tensor([[0, 3, 5], [2, 2, 1]])
    loss = gemm.projection(embedding[tokens].tanh(), embedding, None).logsumexp(-1).sum()
    loss.backward()
    reference = embedding.detach().clone().requires_grad_()
    torch.nn.functional.linear(reference[tokens].tanh(), reference).logsumexp(-1).sum().backward()
    torch.testing.assert_close(embedding.grad, reference.grad, rtol=1e-5, atol=1e-6)
