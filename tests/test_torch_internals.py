"""lmtrain.speed.torch_internals: every private torch entry point has a fallback, and each fallback gives the
same results (a torch that drops or renames one runs slower, never wrongly)."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest
import torch

from lmtrain.model.cells import LSTMCell
from lmtrain.model.layers import RecurrentLayer
from lmtrain.speed import kernels, route, torch_internals


def test_onednn_ops_are_looked_up_once_and_missing_ones_give_none(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert torch_internals._onednn_linear() is None

    class NoOps:
        def __getattr__(self, name):
            raise AttributeError(name)

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops, "mkldnn", NoOps())
    assert torch_internals._onednn_linear() is None


def layer_results(layer: RecurrentLayer, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    layer.zero_grad()
    outputs, (a, c) = layer(x)
    (outputs.square().sum() + c.sum()).backward()
    return [outputs, a, c, x.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.usefixtures("onednn_everywhere")
@pytest.mark.parametrize("compiled", [False, True], ids=["python-loops", "compiled-loops"])
def test_without_the_onednn_ops_the_products_are_addmm_with_the_same_values(monkeypatch, compiled):
    layer = RecurrentLayer(LSTMCell(16, 384), gradients="manual")  # above ONEDNN_FROM_WEIGHTS: oneDNN's route
    x = torch.randn(4, 9, 16)
    if not compiled:
        monkeypatch.setenv(kernels.SWITCH, "0")
    expected = layer_results(layer, x)
    monkeypatch.setattr(route, "ONEDNN_LINEAR", None)
    assert not route.choose(x).onednn
    actual = layer_results(layer, x)
    for want, got in zip(expected, actual, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_without_version_counters_nothing_is_cached_and_changes_are_seen(monkeypatch):
    monkeypatch.setattr(torch_internals, "INCREMENT_VERSION", None)
    assert torch_internals.version_key([torch.zeros(1)]) is None
    torch_internals.increment_version([torch.zeros(1)])  # a no-op, not an error
    cell = LSTMCell(3, 4)
    with torch.no_grad():
        first = cell.stacked_weights()[0].clone()
        # Written as a fused optimizer writes: in place, and the counter not bumped by anyone.
        cell.W_f.data.add_(1.0)
        second = cell.stacked_weights()[0]
    assert not torch.equal(first, second)
    assert torch.equal(second[: 4], cell.W_f[:, :4])


def test_with_version_counters_the_stack_is_cached_until_a_weight_changes():
    cell = LSTMCell(3, 4)
    with torch.no_grad():
        assert cell.stacked_weights() is cell.stacked_weights()
        before = cell.stacked_weights()
        cell.W_f.add_(1.0)  # bumps the version
        assert cell.stacked_weights() is not before


def test_cpu_capability_falls_back_to_the_default_build(monkeypatch):
    def missing():
        raise AttributeError("get_cpu_capability")

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", missing)
    assert torch_internals.cpu_capability() == "DEFAULT"
    spec = kernels.spec()
    assert spec.name == "lmtrain_kernels" and not any(flag.startswith("-mavx") for flag in spec.cflags)


def test_torch_logs_and_warnings_are_collected_not_printed(capfd):
    logger = logging.getLogger("torch.utils.cpp_extension")
    before = (logging.getLogger("torch.utils").propagate, list(logging.getLogger("torch.utils").handlers))
    with torch_internals.torch_logs_captured() as lines:
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        warnings.warn("something the loader thinks")
        print("No CUDA runtime is found (printed, as torch 2.6 did)", file=sys.stderr)
    assert lines == ["WARNING torch.utils.cpp_extension: No CUDA runtime is found, using CUDA_HOME='/usr/local'",
                     "UserWarning: something the loader thinks", "No CUDA runtime is found (printed, as torch 2.6 did)"]
    assert capfd.readouterr().err == ""
    after = logging.getLogger("torch.utils")
    assert (after.propagate, list(after.handlers)) == before
