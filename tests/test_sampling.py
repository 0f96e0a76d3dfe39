"""lmtrain.evaluation.sampling: one sampling step (greedy, top-k, top-p, seeds) and generation that stops at <eos>."""

from __future__ import annotations

import pytest
import torch

from lmtrain.data.tokenizer import Tokenizer
from lmtrain.errors import LmtrainError
from lmtrain.evaluation.sampling import check_options, generate, inverse_cdf, prime_ids, sample_next
from lmtrain.model.language_model import LanguageModel
from lmtrain.speed import kernels


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- one step --------------------------------------------------------------------------------------

def test_top_k_1_and_temperature_0_are_argmax():
    logits = torch.randn(64, 30)
    expected = logits.argmax(-1)
    assert torch.equal(sample_next(logits, top_k=1, generator=generator()), expected)
    assert torch.equal(sample_next(logits, temperature=0, generator=generator()), expected)
    assert torch.equal(sample_next(logits, temperature=0, top_p=0.5, top_k=5), expected)
    assert sample_next(logits, top_k=1).dtype == torch.long and sample_next(logits, top_k=1).shape == (64,)


def test_top_k_never_draws_outside_the_k_best():
    logits = torch.randn(4, 20).repeat(500, 1)  # 2000 rows
    allowed = logits.topk(3, dim=-1).indices
    drawn = sample_next(logits, top_k=3, generator=generator())
    assert (drawn.unsqueeze(-1) == allowed).any(-1).all()
    assert len(set(drawn[::4].tolist())) == 3  # all three do get drawn


def test_top_k_at_least_vocab_is_plain_sampling():
    logits = torch.randn(8, 5)
    assert torch.equal(sample_next(logits, top_k=5, generator=generator(3)),
                       sample_next(logits, generator=generator(3)))
    assert torch.equal(sample_next(logits, top_k=50, generator=generator(3)),
                       sample_next(logits, generator=generator(3)))


def test_top_p_draws_only_from_the_nucleus():
    probabilities = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probabilities.log().repeat(4000, 1)
    # Sorted: 0.4 (1), 0.3 (3), 0.15 (4), 0.1 (2), 0.05 (0). The nucleus for p = 0.75 is {1, 3, 4}:
    # 0.4 + 0.3 = 0.7 < 0.75, so token 4 is still needed; then 0.85 >= 0.75 and the rest are dropped.
    drawn = sample_next(logits, top_p=0.75, generator=generator())
    assert set(drawn.tolist()) == {1, 3, 4}
    counts = torch.bincount(drawn, minlength=5).double() / drawn.numel()
    torch.testing.assert_close(counts[[1, 3, 4]], torch.tensor([0.4, 0.3, 0.15]).double() / 0.85,
                               rtol=0, atol=0.03)  # renormalised within the nucleus


def test_top_p_exactly_reached():
    logits = torch.tensor([0.5, 0.25, 0.25]).log().repeat(2000, 1)
    drawn = sample_next(logits, top_p=0.5, generator=generator())
    assert set(drawn.tolist()) == {0}


def test_top_p_always_keeps_the_most_likely_token():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(1000, 1)
    drawn = sample_next(logits, top_p=1e-9, generator=generator())
    assert set(drawn.tolist()) == {1}
    one_hot = torch.full((100, 6), -1e4)
    one_hot[:, 2] = 0.0
    assert set(sample_next(one_hot, top_p=0.3, generator=generator()).tolist()) == {2}


def test_top_p_1_is_plain_sampling():
    logits = torch.randn(8, 5)
    assert torch.equal(sample_next(logits, top_p=1.0, generator=generator(5)),
                       sample_next(logits, generator=generator(5)))


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(4000, 1)
    cold = sample_next(logits, temperature=0.1, generator=generator())
    assert (cold == 0).float().mean() > 0.99
    hot = sample_next(logits, temperature=100.0, generator=generator())
    share = torch.bincount(hot, minlength=3).double() / hot.numel()
    torch.testing.assert_close(share, torch.full((3,), 1 / 3, dtype=torch.float64), rtol=0, atol=0.04)


def test_draws_follow_the_softmax():
    """Each token as often as its probability (the inverse distribution function draws from the softmax)."""
    logits = torch.tensor([[1.5, 0.0, -1.0, 0.5, -30.0]]).repeat(20000, 1)
    share = torch.bincount(sample_next(logits, generator=generator()), minlength=5).double() / 20000
    torch.testing.assert_close(share, logits[0].double().softmax(-1), rtol=0, atol=0.01)
    assert share[4] == 0


def test_inverse_cdf_takes_the_token_whose_cumulative_probability_passes_u():
    probabilities = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]])
    below_one = 1 - 2.0 ** -53  # the largest float64 below 1, which torch.rand can draw
    for u, want in [(0.0, 1), (0.25, 1), (0.4999, 1), (0.5, 3), (0.75, 3), (below_one, 3)]:
        assert inverse_cdf(probabilities, torch.tensor([u], dtype=torch.float64)).tolist() == [want], u
    # Rows need not sum to 1, and each row takes its own u.
    rows = torch.tensor([[1.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    assert inverse_cdf(rows, torch.tensor([0.49, 0.0], dtype=torch.float64)).tolist() == [1, 2]
    assert inverse_cdf(rows, torch.tensor([0.5, below_one], dtype=torch.float64)).tolist() == [2, 2]


def test_a_token_of_probability_zero_is_never_drawn_at_the_end_of_the_row():
    """u just below 1 times the row's total stays below the total, at any scale of the total."""
    probabilities = torch.tensor([[0.1, 0.7, 0.2, 0.0]], dtype=torch.float32)
    for total_scale in (1.0, 3.0, 1e-30, 7e20):
        for u in (1 - 2.0 ** -53, 1 - 2.0 ** -52, 1 - 2.0 ** -40):
            token = inverse_cdf(probabilities * total_scale, torch.tensor([u], dtype=torch.float64))
            assert token.tolist() == [2], (total_scale, u)


def test_same_seed_same_draws():
    logits = torch.randn(50, 12)
    first = sample_next(logits, top_p=0.9, top_k=8, temperature=1.3, generator=generator(11))
    again = sample_next(logits, top_p=0.9, top_k=8, temperature=1.3, generator=generator(11))
    other = sample_next(logits, top_p=0.9, top_k=8, temperature=1.3, generator=generator(12))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("options, needle, flag", [
    (dict(temperature=-1.0, top_k=None, top_p=None), "temperature must be >= 0", "--temperature"),
    (dict(temperature=float("nan"), top_k=None, top_p=None), "temperature must be", "--temperature"),
    (dict(temperature=1.0, top_k=0, top_p=None), "top_k must be >= 1", "--top-k"),
    (dict(temperature=1.0, top_k=-3, top_p=None), "top_k must be >= 1", "--top-k"),
    (dict(temperature=1.0, top_k=None, top_p=1.5), "top_p must be in (0, 1]", "--top-p"),
    (dict(temperature=1.0, top_k=None, top_p=0.0), "top_p must be in (0, 1]", "--top-p"),
])
def test_check_options_errors(options: dict, needle: str, flag: str):
    """Named as the Python argument, or as `lmtrain sample`'s option with `flags`."""
    with pytest.raises(LmtrainError) as caught:
        check_options(**options)
    assert str(caught.value).startswith(needle) and "\n" not in str(caught.value)
    with pytest.raises(LmtrainError, match=f"^{flag} must be"):
        check_options(**options, flags=True)
    with pytest.raises(LmtrainError, match=f"^{needle[:12]}"):
        sample_next(torch.zeros(1, 3), **options)


def test_check_options_accepts_edges():
    check_options(temperature=0.0, top_k=1, top_p=1.0)
    check_options(temperature=5.0, top_k=None, top_p=1e-6)


# --- generation ------------------------------------------------------------------------------------

TEXT = "abc\n"


def chain_model(tokenizer: Tokenizer) -> LanguageModel:
    """A hand-wired one-layer RNN that, greedily, writes "abc" and then <eos>.

    Embedding = one-hot, the cell copies it (a(t) ≈ tanh(5) * one-hot of the current token), the
    projection maps each token to its successor: start -> a -> b -> c -> <eos>.
    """
    V = tokenizer.vocab_size
    model = LanguageModel(V, cell="rnn", embed_size=V, hidden_size=V, num_layers=1)
    successor = {"a": "b", "b": "c", "c": "<eos>", "<eos>": "a", "<unk>": "a"}
    with torch.no_grad():
        model.embedding.weight.copy_(torch.eye(V))
        cell = model.rnn.layers[0].cell
        cell.W_a.zero_()
        cell.W_a[:, V:] = 5 * torch.eye(V)      # input half: copy x(t); recurrent half 0
        cell.b_a.zero_()
        model.projection.weight.zero_()
        for token, following in successor.items():
            model.projection.weight[tokenizer.ids[following], tokenizer.ids[token]] = 20.0
        model.projection.bias.zero_()
        model.projection.bias[tokenizer.ids["a"]] = 5.0   # from the zero input (a = 0) start with "a"
    return model


@pytest.fixture
def chain():
    tokenizer = Tokenizer.fit(TEXT, level="char")
    return chain_model(tokenizer), tokenizer


def test_generate_stops_at_eos(chain):
    model, tokenizer = chain
    samples = generate(model, tokenizer, num=3, temperature=0, max_tokens=50)
    assert samples == ["abc", "abc", "abc"]


def test_generate_prime_starts_every_sample(chain):
    model, tokenizer = chain
    assert generate(model, tokenizer, num=2, prime="b", temperature=0, max_tokens=50) == ["bc", "bc"]
    assert generate(model, tokenizer, prime="ab", temperature=0, max_tokens=50) == ["abc"]
    assert generate(model, tokenizer, prime="c", temperature=0, max_tokens=50) == ["c"]


def test_generate_stream_start_reads_eos_first(chain):
    model, tokenizer = chain
    assert generate(model, tokenizer, temperature=0, sentence_start=False, max_tokens=50) == ["abc"]


def test_generate_respects_max_tokens(chain):
    model, tokenizer = chain
    assert generate(model, tokenizer, num=2, temperature=0, max_tokens=2) == ["ab", "ab"]
    assert generate(model, tokenizer, temperature=0, prime="a", max_tokens=1) == ["ab"]


@pytest.mark.parametrize("compiled_step", [True, False], ids=["compiled-step", "forward"])
def test_generate_stops_calling_the_model_once_every_sample_ended(chain, monkeypatch, compiled_step):
    """Each token after the first goes through the compiled step where the kernels run (the model's
    forward otherwise); either way no call after every sample has ended."""
    model, tokenizer = chain
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(tuple(args[0].shape)))
    step = model.token_step()
    if step is None and compiled_step:
        pytest.skip(f"compiled kernels unavailable: {kernels.unavailable_reason()}")
    counted = lambda tokens, state: (calls.append(tuple(tokens.shape)), step(tokens, state))[1]  # noqa: E731
    monkeypatch.setattr(model, "token_step", lambda: counted if compiled_step else None)
    generate(model, tokenizer, num=2, temperature=0, max_tokens=50)
    # The start token, then "a", "b", "c" fed back (a (B,) token a row through the step, (B, 1) through
    # the forward); <eos> ends it without another call.
    assert calls == [(2, 1), *[(2,) if compiled_step else (2, 1)] * 3]


def small_model(tokenizer: Tokenizer) -> LanguageModel:
    return LanguageModel(tokenizer.vocab_size, cell="gru", embed_size=8, hidden_size=16, num_layers=1)


def test_generate_never_eos_gives_exactly_max_tokens():
    tokenizer = Tokenizer.fit("hello world\n", level="char")
    model = small_model(tokenizer)
    with torch.no_grad():
        model.projection.bias[tokenizer.eos_id] = -1e4
        model.projection.bias[tokenizer.unk_id] = -1e4  # "<unk>" would decode to five characters
    samples = generate(model, tokenizer, num=4, max_tokens=13, generator=generator())
    assert [len(sample) for sample in samples] == [13] * 4
    assert all(set(sample) <= set("helo wrd") for sample in samples)


def test_generate_samples_hold_no_eos_and_respect_the_cap():
    tokenizer = Tokenizer.fit("hello world\nbye\n", level="char")
    model = small_model(tokenizer)
    with torch.no_grad():
        model.projection.bias[tokenizer.unk_id] = -1e4
        model.projection.bias[tokenizer.eos_id] = 2.0  # ends early often, not always
    samples = generate(model, tokenizer, num=40, max_tokens=6, generator=generator())
    assert all("\n" not in sample and len(sample) <= 6 for sample in samples)
    assert len({len(sample) for sample in samples}) > 1


def test_generate_eos_certain_gives_only_the_prime():
    tokenizer = Tokenizer.fit("hello world\n", level="char")
    model = small_model(tokenizer)
    with torch.no_grad():
        model.projection.weight.zero_()
        model.projection.bias.zero_()
        model.projection.bias[tokenizer.eos_id] = 1e4
    assert generate(model, tokenizer, num=3, prime="he", generator=generator()) == ["he", "he", "he"]


def test_generate_same_seed_same_text():
    tokenizer = Tokenizer.fit("the cat sat on the mat\n", level="char")
    model = small_model(tokenizer)
    with torch.no_grad():
        model.projection.bias[tokenizer.eos_id] = -1e4
    options = dict(num=3, prime="th", max_tokens=20, temperature=1.5)
    first = generate(model, tokenizer, generator=generator(7), **options)
    again = generate(model, tokenizer, generator=generator(7), **options)
    other = generate(model, tokenizer, generator=generator(8), **options)
    assert first == again
    assert first != other
    assert all(sample.startswith("th") for sample in first + other)
    assert len(set(first)) > 1  # the samples in one call differ from each other


def test_generate_restores_training_mode(chain):
    model, tokenizer = chain
    model.train()
    generate(model, tokenizer, temperature=0, max_tokens=5)
    assert model.training


def test_generate_word_level_joins_prime_with_a_space():
    tokenizer = Tokenizer.fit("the cat sat\n", level="word")
    model = small_model(tokenizer)
    with torch.no_grad():
        model.projection.weight.zero_()
        model.projection.bias.fill_(-1e4)
        model.projection.bias[tokenizer.ids["sat"]] = 0.0
    assert generate(model, tokenizer, prime="the cat ", max_tokens=2, generator=generator()) == ["the cat sat sat"]


@pytest.mark.parametrize("options", [dict(num=0), dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=2.0)])
def test_generate_option_errors(chain, options: dict):
    model, tokenizer = chain
    with pytest.raises(LmtrainError):
        generate(model, tokenizer, **options)


def test_prime_ids():
    tokenizer = Tokenizer.fit("abc\n", level="char")
    assert prime_ids(tokenizer, "abz") == ([tokenizer.ids["a"], tokenizer.ids["b"], tokenizer.unk_id], 1)
    assert prime_ids(tokenizer, "") == ([], 0)
    words = Tokenizer.fit("the cat\n", level="word")
    assert prime_ids(words, " the  dog ") == ([words.ids["the"], words.unk_id], 1)


# --- what `lmtrain sample` prints ------------------------------------------------------------------

def test_printable_escapes_what_a_terminal_would_act_on():
    from lmtrain.evaluation.sampling import printable

    assert printable("plain text, tabs\tand ünïcode ✓") == "plain text, tabs\tand ünïcode ✓"
    assert printable("a\rb\nc\x1b[31md\x00e\x7f\x85") == "a\\rb\\nc\\x1b[31md\\x00e\\x7f\\x85"
    assert printable("x\u202eevil\u2066y\u200f") == "x\\u202eevil\\u2066y\\u200f"  # bidirectional overrides
    # A combining mark after an escape would join its last letter; after a letter it is the letter's accent.
    assert printable("\u202e\u0301\u0301e\u0301") == "\\u202e\\u0301\\u0301e\u0301"
    assert printable("\u202e\U000e0100") == "\\u202e\\U000e0100"  # past U+FFFF: eight digits


def test_a_model_that_never_saw_eos_samples_to_max_tokens_without_a_warning(tmp_path, config_factory):
    from lmtrain.checkpoint import save_checkpoint
    from lmtrain.config import to_dict
    from lmtrain.evaluation.sampling import sample_checkpoint

    tokenizer = Tokenizer.fit("hello world\n", level="char", eos="none")
    config = config_factory(**{"data.eos": "none", "model.cell": "gru", "model.embed_size": 8,
                               "model.hidden_size": 16, "model.num_layers": 1})
    model = small_model(tokenizer)
    path = tmp_path / "model.pt"
    for eos_bias in (-1e4, 1e4):  # <eos> never or always the likeliest: it is not drawn either way
        with torch.no_grad():
            model.projection.bias[tokenizer.eos_id] = eos_bias
        save_checkpoint(path, {"config": to_dict(config), "tokenizer": tokenizer.to_dict(),
                               "model": model.state_dict()})
        samples, notes = sample_checkpoint(str(path), num=3, max_tokens=7, seed=0)
        assert [len(sample) for sample in samples] == [7] * 3 and notes == []


def test_a_vanishing_temperature_is_greedy_not_nan():
    logits = torch.randn(16, 30) * 50
    assert torch.equal(sample_next(logits, temperature=1e-45, generator=generator()), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=1e-300, top_p=0.5, generator=generator()), logits.argmax(-1))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_outputs_are_named_as_damaged_weights(value):
    logits = torch.randn(2, 5)
    logits[1, 3] = value
    with pytest.raises(LmtrainError, match="not finite numbers .* weights are damaged or diverged"):
        sample_next(logits, generator=generator())
    big = torch.full((2, 5), 3e38)  # finite, though their float32 sum would overflow
    assert sample_next(big, generator=generator()).shape == (2,)


def test_seed_and_num_out_of_range_are_refused(tmp_path, config_factory):
    from lmtrain.checkpoint import save_checkpoint
    from lmtrain.config import to_dict
    from lmtrain.evaluation.sampling import sample_checkpoint

    tokenizer = Tokenizer.fit("hello world\n", level="char")
    config = config_factory(**{"model.cell": "gru", "model.embed_size": 8, "model.hidden_size": 16,
                               "model.num_layers": 1})
    save_checkpoint(tmp_path / "m.pt", {"config": to_dict(config), "tokenizer": tokenizer.to_dict(),
                                        "model": small_model(tokenizer).state_dict()})
    with pytest.raises(LmtrainError, match="--seed must be a 64-bit integer"):
        sample_checkpoint(str(tmp_path / "m.pt"), seed=10 ** 23)
    assert sample_checkpoint(str(tmp_path / "m.pt"), seed=-1, max_tokens=3)[0]  # negative 64-bit seeds are fine
    with pytest.raises(LmtrainError, match=r"--num 1000000000000: the samples are drawn side by side"):
        sample_checkpoint(str(tmp_path / "m.pt"), num=10 ** 12)


def test_a_top_p_below_float32s_range_keeps_the_most_likely_token():
    logits = torch.randn(8, 20)
    assert torch.equal(sample_next(logits, top_p=1e-300, generator=generator()), logits.argmax(-1))


def test_the_python_api_refuses_shapes_and_counts_it_cannot_draw_from():
    with pytest.raises(ValueError, match=r"logits must be \(rows, vocabulary size\), a row per draw; got shape \(7,\)"):
        sample_next(torch.randn(7))
    with pytest.raises(ValueError, match=r"got shape \(2, 0\)"):
        sample_next(torch.randn(2, 0))
    tokenizer = Tokenizer.fit("ab\n", level="char")
    model = LanguageModel(tokenizer.vocab_size, embed_size=4, hidden_size=4, num_layers=1)
    with pytest.raises(LmtrainError, match=r"^num and max_tokens must be whole numbers >= 1; got 2.0 and 200"):
        generate(model, tokenizer, num=2.0)
    with pytest.raises(LmtrainError, match=r"the tokenizer has 4 tokens and the model 9: they are not from one"):
        generate(LanguageModel(9, embed_size=4, hidden_size=4, num_layers=1), tokenizer)
    with pytest.raises(TypeError, match=r"prime must be a string \(\"\" for none\); got NoneType"):
        generate(model, tokenizer, prime=None)


def test_a_model_trained_without_eos_never_draws_it():
    """`data.eos: none`: <eos> was never a target, so its probability means nothing; it is not drawn, and
    every sample runs to max_tokens, greedy or not (with <eos> the likeliest token)."""
    tokenizer = Tokenizer.fit("hello world\n", level="char")
    model = small_model(tokenizer)
    with torch.no_grad():
        model.projection.bias[tokenizer.unk_id] = -1e4
        model.projection.bias[tokenizer.eos_id] = 5.0
    for temperature in (0.0, 1.0):
        samples = generate(model, tokenizer, num=8, max_tokens=9, temperature=temperature, eos="none",
                           generator=generator())
        assert [len(sample) for sample in samples] == [9] * 8
    assert generate(model, tokenizer, num=8, max_tokens=9, temperature=0) == [""] * 8  # with eos="line"
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    assert sample_next(logits, temperature=0, never=1).item() == 2
    assert set(sample_next(logits.expand(500, 3), never=1, generator=generator()).tolist()) == {0, 2}
    with pytest.raises(ValueError, match=r"^eos must be line or none \(the model's data.eos\); got 'lines'"):
        generate(model, tokenizer, eos="lines")
