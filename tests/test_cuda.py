"""On a CUDA machine: the hand-written backward gives CPU float64's values and gradients; training with
`train.device: cuda` resumes exactly (CUDA RNG included, through dropout); its checkpoint samples and
evaluates on the CPU. Skipped without CUDA; `scripts/gpu_check.sh` runs them on a GPU machine."""

from __future__ import annotations

import copy

import pytest
import torch
from test_backprop import CELL_CASES, gradients, make_cell, random_inputs
from test_train import corpus, load_payload, make_config  # noqa: F401  (corpus is a fixture)

from lmtrain.evaluation.perplexity import evaluate_checkpoint
from lmtrain.evaluation.sampling import sample_checkpoint
from lmtrain.model.layers import RecurrentLayer
from lmtrain.training.trainer import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("name", sorted(CELL_CASES))
def test_manual_backward_on_cuda_matches_cpu_float64(name):
    torch.manual_seed(0)
    cell = make_cell(name, torch.float32)
    x, state = random_inputs(cell, steps=7, dtype=torch.float32)
    layer = RecurrentLayer(cell, gradients="manual")
    on_cuda = gradients(copy.deepcopy(layer).cuda(), x.cuda(), tuple(s.cuda() for s in state))
    reference = gradients(copy.deepcopy(layer).double(), x.double(), tuple(s.double() for s in state))
    torch.testing.assert_close(on_cuda[0].double().cpu(), reference[0], rtol=1e-5, atol=1e-5)
    for key, gradient in on_cuda[2].items():
        torch.testing.assert_close(gradient.double().cpu(), reference[2][key], rtol=1e-4, atol=1e-5, msg=key)


def test_cuda_training_resumes_exactly_and_loads_on_cpu(tmp_path, corpus):  # noqa: F811
    settings = dict(train__device="cuda", model__num_layers=2, model__dropout=0.3, train__schedule="constant")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(make_config(corpus, straight, train__max_steps=12, **settings), progress_bar=False)
    train(make_config(corpus, stopped, train__max_steps=5, **settings), progress_bar=False)
    train(make_config(corpus, stopped, train__max_steps=12, **settings), resume=True, progress_bar=False)
    a, b = load_payload(straight / "last.pt"), load_payload(stopped / "last.pt")
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert a["rng"].get("cuda"), "the CUDA RNG state is saved"

    # Saved from CUDA, used on a CPU-only path.
    assert all(tensor.device.type == "cpu" for tensor in a["model"].values())
    samples, _ = sample_checkpoint(str(straight / "last.pt"), num=2, seed=1, device="cpu")
    assert len(samples) == 2
    numbers, _ = evaluate_checkpoint(str(straight / "last.pt"), device="cpu")
    assert numbers["loss"] > 0


@pytest.mark.parametrize("name", sorted(CELL_CASES))
def test_bfloat16_products_on_cuda_stay_within_their_rounding(name):
    """`train.precision: bfloat16` on CUDA: cuBLAS's bfloat16 products, float32 everything else; values
    and gradients within bfloat16's rounding of CPU float64's."""
    torch.manual_seed(0)
    cell = make_cell(name, torch.float32)
    x, state = random_inputs(cell, steps=7, dtype=torch.float32)
    layer = RecurrentLayer(cell, gradients="manual")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        on_cuda = gradients(copy.deepcopy(layer).cuda(), x.cuda(), tuple(s.cuda() for s in state))
    reference = gradients(copy.deepcopy(layer).double(), x.double(), tuple(s.double() for s in state))
    assert on_cuda[0].dtype == torch.float32
    torch.testing.assert_close(on_cuda[0].double().cpu(), reference[0], rtol=3e-2, atol=3e-2)
    for key, gradient in on_cuda[2].items():
        want = reference[2][key]
        assert float((gradient.double().cpu() - want).norm() / want.norm()) < 3e-2, key
