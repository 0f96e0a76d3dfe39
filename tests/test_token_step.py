"""The compiled step for one token a row (sampling) computes what the model's own forward does, for every
cell, and sampling takes it wherever the compiled kernels run."""

from __future__ import annotations

import pytest
import torch

from lmtrain.data.tokenizer import Tokenizer
from lmtrain.evaluation import sampling
from lmtrain.model.language_model import LanguageModel
from lmtrain.speed import kernels
from lmtrain.speed.token_step import TokenStep, pack

CELLS = {  # every cell form, as LanguageModel's options
    "lstm": {"cell": "lstm"},
    "gru": {"cell": "gru"},
    "gru-simplified": {"cell": "gru", "relevance_gate": False},
    "gru-after": {"cell": "gru", "gru_reset": "after"},
    "rnn": {"cell": "rnn"},
}


def test_pack_puts_each_units_gates_in_one_block():
    G, H, K = 3, 20, 7
    W_a = torch.arange(G * H * K, dtype=torch.float32).reshape(G * H, K)
    packed = pack(W_a.chunk(G))
    assert packed.shape == (2, G, K, 16)
    for gate in range(G):
        for unit in range(H):
            torch.testing.assert_close(packed[unit // 16, gate, :, unit % 16], W_a[gate * H + unit], rtol=0, atol=0)
    assert not packed[1, :, :, H - 16:].any()  # units 20..31 do not exist


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B, E, H, layers", [(1, 5, 13, 1), (3, 8, 16, 2), (17, 16, 37, 3), (16, 64, 512, 2)])
def test_the_step_gives_the_models_logits_and_state(compiled, cell, B, E, H, layers):
    torch.manual_seed(0)
    model = LanguageModel(11, embed_size=E, hidden_size=H, num_layers=layers, dropout=0.0, **CELLS[cell]).eval()
    step = model.token_step()
    assert isinstance(step, TokenStep)
    state = [tuple(torch.randn(B, H) for _ in layer_state) for layer_state in model.initial_state(B)]
    tokens = torch.randint(0, 11, (B,))
    with torch.no_grad():
        want_logits, want_state = model(tokens.unsqueeze(1), state)
        logits, new_state = step(tokens, state)
    torch.testing.assert_close(logits, want_logits[:, -1], rtol=0, atol=2e-5 * float(want_logits.abs().max()))
    for got, want in zip(new_state, want_state, strict=True):
        assert len(got) == len(want)
        for got_part, want_part in zip(got, want, strict=True):
            torch.testing.assert_close(got_part, want_part, rtol=0, atol=2e-5 * float(want_part.abs().max()))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B", [1, 2, 16])
def test_step_after_step_follows_the_models_forward_and_leaves_the_weights(compiled, cell, B):
    """Sampling calls one step many times: each must read the weights as packed, whatever the earlier
    calls did (at B = 1 the LSTM's gate buffer was once the packed bias itself, overwritten by the first)."""
    torch.manual_seed(0)
    model = LanguageModel(11, embed_size=8, hidden_size=20, num_layers=2, dropout=0.0, **CELLS[cell]).eval()
    step = model.token_step()
    packed = [[part.clone() for part in layer if isinstance(part, torch.Tensor)] for layer in step.layers]
    tokens = torch.randint(0, 11, (B, 6))
    state = None
    with torch.no_grad():
        want, _ = model(tokens)
        for t in range(tokens.size(1)):
            logits, state = step(tokens[:, t], state if state is not None else model.initial_state(B))
            torch.testing.assert_close(logits, want[:, t], rtol=0, atol=2e-5 * float(want.abs().max()))
    for layer, before in zip(step.layers, packed, strict=True):
        tensors = [part for part in layer if isinstance(part, torch.Tensor)]
        assert all(torch.equal(tensor, kept) for tensor, kept in zip(tensors, before, strict=True))


def test_saturated_gates_stay_finite_and_match(compiled):
    torch.manual_seed(0)
    for options in CELLS.values():
        model = LanguageModel(7, embed_size=4, hidden_size=6, num_layers=1, dropout=0.0, **options).eval()
        with torch.no_grad():
            for parameter in model.rnn.parameters():
                parameter.mul_(300)
        state = [tuple(50 * torch.randn(3, 6) for _ in layer_state) for layer_state in model.initial_state(3)]
        tokens = torch.tensor([0, 3, 6])
        with torch.no_grad():
            want, _ = model(tokens.unsqueeze(1), state)
            got, _ = model.token_step()(tokens, state)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want[:, -1], rtol=0, atol=2e-5 * float(want.abs().max()))


def test_none_where_the_kernels_do_not_run_or_forward_is_another(compiled):
    model = LanguageModel(5, embed_size=4, hidden_size=8, num_layers=1)
    with kernels.switched(False):
        assert model.token_step() is None
    assert model.double().token_step() is None

    class OwnForward(LanguageModel):
        def forward(self, tokens, state=None, **options):
            return super().forward(tokens, state, **options)

    assert OwnForward(5, embed_size=4, hidden_size=8, num_layers=1).token_step() is None


def test_sampling_takes_the_step_and_draws_the_same_either_way(compiled, monkeypatch):
    """With a seed, the compiled step and the model's forward draw the same samples (their logits differ
    by float32 rounding only, which moves a draw only on a knife's edge, not in this case)."""
    tokenizer = Tokenizer.fit("the cat sat on the mat\na dog ran\n", level="char")
    torch.manual_seed(0)
    model = LanguageModel(tokenizer.vocab_size, embed_size=8, hidden_size=32, num_layers=2)
    calls = []
    built = model.token_step

    def counting():
        step = built()
        return lambda tokens, state: (calls.append(1), step(tokens, state))[1]

    monkeypatch.setattr(model, "token_step", counting)
    draw = lambda: sampling.generate(model, tokenizer, num=4, max_tokens=30,  # noqa: E731
                                     generator=torch.Generator().manual_seed(3))
    compiled_samples = draw()
    assert calls
    with kernels.switched(False):
        monkeypatch.setattr(model, "token_step", built)
        assert draw() == compiled_samples


def test_the_kernels_refuse_buffers_of_the_wrong_shape_or_kind(compiled):
    H, E, B = 16, 4, 2
    packed, b = pack(torch.randn(4 * H, H + E).chunk(4)), torch.randn(4 * H)
    a, c, x = torch.randn(B, H), torch.randn(B, H), torch.randn(B, E)
    assert compiled.lstm_token_step(packed, b, a, x, c)[0].shape == (B, H)
    with pytest.raises(RuntimeError, match="packed must hold 4 gates"):
        compiled.lstm_token_step(packed, b, a, torch.randn(B, E + 1), c)
    with pytest.raises(RuntimeError, match="packed must be"):
        compiled.lstm_token_step(packed, b, torch.randn(B, 2 * H), x, torch.randn(B, 2 * H))
    with pytest.raises(RuntimeError, match="contiguous float32"):
        compiled.lstm_token_step(packed, b, a.double(), x, c)
    with pytest.raises(RuntimeError, match="2 or 3 gates"):
        compiled.gru_token_step(packed, b, a, x)
    with pytest.raises(RuntimeError, match="1 gate"):
        compiled.rnn_token_step(packed, b, a, x)
