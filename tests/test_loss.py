"""lmtrain.speed.loss: the output layer fused with its summed cross-entropy gives torch's value and gradients
(the compiled kernel in float32, odd vocabulary sizes, ignored targets, large logits, any upstream
gradient), is what training runs, does not depend on the number of threads, and propagates a non-finite
logit; without the kernel (float64) it is torch's cross_entropy itself."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmtrain.data.dataset import IGNORE
from lmtrain.evaluation.perplexity import perplexity
from lmtrain.model.language_model import LanguageModel
from lmtrain.speed import kernels
from lmtrain.speed.loss import projected_nll


def reference(x, W, b, targets):
    """The unfused loss: logits, then torch's log_softmax and NLL, summed over the kept targets."""
    logits = x @ W.t() + (0 if b is None else b)
    return F.cross_entropy(logits.reshape(-1, W.size(0)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")


def loss_and_gradients(function, x, W, b, targets, upstream: float = 1.0):
    leaves = [t.detach().requires_grad_() for t in (x, W, b) if t is not None]
    x, W, b = leaves[0], leaves[1], leaves[2] if b is not None else None
    total = function(x, W, b, targets)
    (upstream * total).backward()
    return [total.detach(), *(leaf.grad for leaf in leaves)]


def assert_close(expected, actual, tolerance: float = 1e-5):
    for want, got in zip(expected, actual, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * float(want.abs().max().clamp(min=1)))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("B, T, K, V", [(1, 1, 3, 2), (2, 5, 7, 17), (4, 9, 16, 65), (3, 11, 24, 1000)])
def test_compiled_value_and_gradients_equal_torch(compiled, bias, B, T, K, V):
    x, W = torch.randn(B, T, K), torch.randn(V, K) / math.sqrt(K)
    b = torch.randn(V) if bias else None
    targets = torch.randint(0, V, (B, T))
    expected = loss_and_gradients(reference, x, W, b, targets, upstream=0.37)
    actual = loss_and_gradients(projected_nll, x, W, b, targets, upstream=0.37)
    assert_close(expected, actual)


@pytest.mark.parametrize("rows_at_once", [1, 3, 7, 100])
def test_the_rows_go_through_in_chunks_with_the_same_value_and_gradients(compiled, monkeypatch, rows_at_once):
    """LOGITS_BUDGET bounds the logits held at once; chunks of 1, 3 (uneven) and 7 rows of 22, ignored
    targets among them, give what one pass gives."""
    from lmtrain.speed import loss

    B, T, K, V = 2, 11, 6, 50
    x, W, b = torch.randn(B, T, K), torch.randn(V, K) / math.sqrt(K), torch.randn(V)
    targets = torch.randint(0, V, (B, T))
    targets[0, 3:6] = IGNORE
    expected = loss_and_gradients(reference, x, W, b, targets, upstream=1.7)
    monkeypatch.setattr(loss, "LOGITS_BUDGET", rows_at_once * V)
    assert_close(expected, loss_and_gradients(projected_nll, x, W, b, targets, upstream=1.7))
    with torch.no_grad():  # evaluation: the loss alone, no gradient made
        assert_close([expected[0]], [projected_nll(x, W, b, targets)])


def test_the_compiled_kernel_is_what_runs(compiled, monkeypatch):
    x = torch.randn(2, 3, 4, requires_grad=True)
    total = projected_nll(x, torch.randn(5, 4), torch.randn(5), torch.randint(0, 5, (2, 3)))
    assert "ProjectedNLL" in total.grad_fn.name()
    with monkeypatch.context() as switch:
        switch.setenv(kernels.SWITCH, "0")
        plain = projected_nll(x, torch.randn(5, 4), torch.randn(5), torch.randint(0, 5, (2, 3)))
    assert "ProjectedNLL" not in plain.grad_fn.name()


@pytest.mark.parametrize("use_compiled", [True, False], ids=["compiled", "torch"])
def test_ignored_targets_are_left_out_and_get_no_gradient(compiled, use_compiled, monkeypatch):
    x, W, b = torch.randn(2, 4, 6), torch.randn(9, 6), torch.randn(9)
    targets = torch.tensor([[1, 2, IGNORE, IGNORE], [3, IGNORE, IGNORE, 8]])
    with monkeypatch.context() as switch:
        if not use_compiled:
            switch.setenv(kernels.SWITCH, "0")
        total, dx, dW, db = loss_and_gradients(projected_nll, x, W, b, targets)
    log_p = (x @ W.t() + b).log_softmax(-1)
    expected = -(log_p[0, 0, 1] + log_p[0, 1, 2] + log_p[1, 0, 3] + log_p[1, 3, 8])
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=0)
    assert (dx[0, 2:] == 0).all() and (dx[1, 1:3] == 0).all() and (dx[1, 3] != 0).any()


def test_all_targets_ignored_is_zero_with_zero_gradients(compiled):
    total, dx, dW, db = loss_and_gradients(projected_nll, torch.randn(1, 3, 4), torch.randn(5, 4), torch.randn(5),
                                           torch.full((1, 3), IGNORE))
    assert total.item() == 0.0 and not dx.any() and not dW.any() and not db.any()


@pytest.mark.parametrize("V", [2, 7, 50, 1000])
def test_uniform_logits_give_perplexity_vocab_size(compiled, V):
    for dtype in (torch.float32, torch.float64):  # the compiled kernel, then torch's cross_entropy
        x = torch.zeros(3, 5, 4, dtype=dtype)
        total = projected_nll(x, torch.randn(V, 4, dtype=dtype), None, torch.randint(0, V, (3, 5)))
        assert total.dtype == dtype
        assert perplexity(total.item() / 15) == pytest.approx(V, rel=1e-6 if dtype == torch.float32 else 1e-14)


def test_large_logits_stay_finite_and_exact(compiled):
    """Logits in the thousands: the kernel subtracts each row's maximum before e^x, as log-sum-exp must."""
    x, W, b = torch.randn(4, 6, 8) * 300, torch.randn(33, 8), torch.randn(33)
    targets = torch.randint(0, 33, (4, 6))
    expected = loss_and_gradients(reference, x, W, b, targets)
    actual = loss_and_gradients(projected_nll, x, W, b, targets)
    assert all(torch.isfinite(t).all() for t in actual)
    assert_close(expected, actual)


def test_a_non_finite_logit_makes_the_loss_non_finite(compiled):
    """So that training skips the step (train.max_bad_steps) rather than learn from a wrong loss."""
    x = torch.randn(2, 3, 4)
    x[1, 2, 0] = math.nan
    assert math.isnan(projected_nll(x, torch.randn(6, 4), None, torch.randint(0, 6, (2, 3))).item())


def test_an_out_of_range_target_is_an_error(compiled):
    with pytest.raises(RuntimeError, match="^target 4 is out of bounds for 4 classes$"):
        projected_nll(torch.randn(1, 2, 3), torch.randn(4, 3), None, torch.tensor([[0, 4]]))


def test_the_sum_does_not_depend_on_the_number_of_threads(compiled):
    x, W, targets = torch.randn(16, 35, 32), torch.randn(500, 32), torch.randint(0, 500, (16, 35))
    previous = torch.get_num_threads()
    try:
        totals = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            totals.append(projected_nll(x, W, None, targets).item())
    finally:
        torch.set_num_threads(previous)
    assert totals[0] == totals[1] == totals[2]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gradients_with_several_threads(compiled, threads):
    """Rows are shared among the threads, each summing its rows' bias gradient apart: the same gradients."""
    x, W, b = torch.randn(6, 35, 16), torch.randn(300, 16) / 4, torch.randn(300)
    targets = torch.randint(0, 300, (6, 35))
    targets[2, 5:9] = IGNORE
    expected = loss_and_gradients(reference, x, W, b, targets)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        actual = loss_and_gradients(projected_nll, x, W, b, targets)
    finally:
        torch.set_num_threads(previous)
    assert_close(expected, actual)


def test_a_bias_without_gradient_is_skipped(compiled):
    x, W, b = torch.randn(2, 3, 4, requires_grad=True), torch.randn(5, 4), torch.randn(5)
    targets = torch.randint(0, 5, (2, 3))
    projected_nll(x, W, b, targets).backward()
    expected = torch.autograd.grad(reference(x, W, b, targets), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


def test_float64_is_torch_cross_entropy_exactly():
    x, W, b = (torch.randn(*shape, dtype=torch.float64) for shape in ((2, 4, 6), (11, 6), (11,)))
    targets = torch.randint(0, 11, (2, 4))
    assert projected_nll(x, W, b, targets).item() == reference(x, W, b, targets).item()


@pytest.mark.parametrize("tie_weights", [False, True], ids=["untied", "tied"])
def test_the_model_with_targets_returns_the_loss_of_its_logits(compiled, tie_weights):
    """`model(tokens, targets=...)` is the cross-entropy of `model(tokens)`'s logits, gradients included
    (the tied matrix gets both its embedding and its output-layer share)."""
    model = LanguageModel(30, embed_size=12, hidden_size=12, num_layers=2, tie_weights=tie_weights)
    tokens, targets = torch.randint(0, 30, (3, 7)), torch.randint(0, 30, (3, 7))
    targets[0, :2] = IGNORE
    logits, _ = model(tokens)
    expected = F.cross_entropy(logits.reshape(-1, 30), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total, _ = model(tokens, targets=targets, ignore_index=IGNORE)
    total.backward()
    assert_close([expected.detach(), *expected_grads], [total.detach(), *(p.grad for p in model.parameters())])
