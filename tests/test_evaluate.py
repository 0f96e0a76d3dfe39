"""lmtrain.evaluation.perplexity: perplexity is exp of the token-weighted mean NLL and does not depend on batch size."""

from __future__ import annotations

import math

import pytest
import torch

from lmtrain.data.dataset import sentence_pieces, stream_segments
from lmtrain.data.encoding import stream_ids
from lmtrain.data.tokenizer import Tokenizer
from lmtrain.evaluation import perplexity as evaluate
from lmtrain.evaluation.perplexity import Score, bits_per_character, evaluation_sequences, perplexity, report, score
from lmtrain.model.language_model import LanguageModel


def test_perplexity_and_bits():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(42)) == pytest.approx(42, rel=1e-15)
    assert perplexity(1000.0) == math.inf  # no OverflowError
    assert bits_per_character(math.log(2)) == 1.0
    assert bits_per_character(0.0) == 0.0
    assert bits_per_character(3 * math.log(2)) == pytest.approx(3.0, rel=1e-15)
    assert Score(loss=math.log(5), tokens=3).perplexity == pytest.approx(5, rel=1e-15)


def test_perplexity_of_nan_loss_is_nan():
    # A diverged model's NaN loss must not be reported as an (overflowed) infinite perplexity.
    assert math.isnan(perplexity(math.nan))


def test_report(char_tokenizer: Tokenizer, word_tokenizer: Tokenizer):
    result = Score(loss=math.log(2), tokens=10)
    numbers = report(result, char_tokenizer)
    assert numbers == {"loss": math.log(2), "perplexity": pytest.approx(2.0, rel=1e-15), "bpc": 1.0, "tokens": 10}
    assert "bpc" not in report(result, word_tokenizer)


def tiny_model(tokenizer: Tokenizer, cell: str = "lstm") -> LanguageModel:
    return LanguageModel(tokenizer.vocab_size, cell=cell, embed_size=6, hidden_size=8, num_layers=2).double()


TEXT = "".join(f"{'ab' * (i % 7 + 1)}{'c' * (i % 3)}d\n" for i in range(23))


def sequences(tokenizer: Tokenizer, mode: str):
    if mode == "sentences":
        return sentence_pieces(tokenizer, TEXT, 9)
    return stream_segments(stream_ids(tokenizer, TEXT), 17)


@pytest.mark.parametrize("mode", ["sentences", "stream"])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_score_independent_of_batch_size(mode: str, cell: str):
    tokenizer = Tokenizer.fit(TEXT, level="char")
    model = tiny_model(tokenizer, cell)
    seqs = sequences(tokenizer, mode)
    results = [score(model, seqs, batch_size=size) for size in (1, 3, 64)]
    expected_tokens = sum(targets.numel() for _, targets in seqs)
    assert all(result.tokens == expected_tokens for result in results)
    for result in results[1:]:
        assert result.loss == pytest.approx(results[0].loss, rel=1e-6)


@pytest.mark.parametrize("mode", ["sentences", "stream"])
@pytest.mark.parametrize("budget", [1, 100, 1000])
def test_score_in_time_chunks_equals_whole(monkeypatch, mode: str, budget: int):
    # A small activations budget makes score() run each batch in time chunks with the state carried.
    tokenizer = Tokenizer.fit(TEXT, level="char")
    model = tiny_model(tokenizer)
    seqs = sequences(tokenizer, mode)
    whole = score(model, seqs, batch_size=5)
    monkeypatch.setattr(evaluate, "ACTIVATIONS_BUDGET", budget)
    chunked = score(model, seqs, batch_size=5)
    assert chunked.tokens == whole.tokens
    assert chunked.loss == pytest.approx(whole.loss, rel=1e-6)


def test_score_equals_per_sequence_sum():
    tokenizer = Tokenizer.fit(TEXT, level="char")
    model = tiny_model(tokenizer).eval()
    seqs = sequences(tokenizer, "sentences")
    total = count = 0
    with torch.no_grad():
        for inputs, targets in seqs:
            logits, _ = model(inputs.unsqueeze(0))
            total += -logits[0].log_softmax(-1).gather(-1, targets.unsqueeze(-1)).sum().item()
            count += targets.numel()
    result = score(model, seqs, batch_size=4)
    assert result.tokens == count
    assert result.loss == pytest.approx(total / count, rel=1e-6)


def test_score_restores_training_mode_and_ignores_dropout():
    tokenizer = Tokenizer.fit(TEXT, level="char")
    model = LanguageModel(tokenizer.vocab_size, embed_size=6, hidden_size=8, num_layers=2, dropout=0.5)
    seqs = sequences(tokenizer, "sentences")
    model.train()
    first = score(model, seqs, batch_size=5)
    assert model.training
    assert score(model, seqs, batch_size=5).loss == first.loss  # eval mode inside: no dropout
    model.eval()
    score(model, seqs, batch_size=5)
    assert not model.training


def test_score_of_nothing_is_nan():
    tokenizer = Tokenizer.fit(TEXT, level="char")
    result = score(tiny_model(tokenizer), [], batch_size=4)
    assert result.tokens == 0 and math.isnan(result.loss)


def test_evaluation_sequences(config_factory):
    tokenizer = Tokenizer.fit(TEXT, level="char")
    stream = config_factory(**{"train.eval_segment": 17})
    got = evaluation_sequences(tokenizer, TEXT, stream)
    expected = stream_segments(stream_ids(tokenizer, TEXT), 17)
    assert len(got) == len(expected) and all(torch.equal(a[1], b[1]) for a, b in zip(got, expected))
    sentences = config_factory(**{"data.mode": "sentences", "train.bptt": 9})
    got = evaluation_sequences(tokenizer, TEXT, sentences)
    assert [t.tolist() for _, t in got] == [t.tolist() for _, t in sentence_pieces(tokenizer, TEXT, 9)]


@pytest.mark.parametrize("mode", ["stream", "sentences"])
def test_evaluation_sequences_of_empty_text_is_empty(config_factory, mode: str):
    # An empty split must give no sequences (evaluate_checkpoint then says "holds no tokens to
    # evaluate"), not one empty sequence that scores as 0 tokens with a NaN loss.
    tokenizer = Tokenizer.fit(TEXT, level="char")
    config = config_factory(**{"data.mode": mode})
    assert evaluation_sequences(tokenizer, "", config) == []


def test_chunks_bound_the_gate_activations_too(monkeypatch):
    """A small vocabulary does not let a long batch through whole: the layers keep B x T x 4H gate
    activations, so the chunk is sized by the wider of V and 4H."""
    tokenizer = Tokenizer.fit(TEXT, level="char")
    model = tiny_model(tokenizer)
    widths, original = [], model.forward

    def recording_forward(tokens, *args, **kwargs):
        widths.append(tokens.size(1))
        return original(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)
    seqs = sequences(tokenizer, "stream")
    width = max(model.projection.out_features, 4 * model.projection.in_features)
    monkeypatch.setattr(evaluate, "ACTIVATIONS_BUDGET", 5 * width * 3)  # batch_size 5: 3 steps a chunk
    score(model, seqs, batch_size=5)
    assert max(widths) == 3


def test_evaluate_checkpoint_segment_zero_carries_the_state_through_the_whole_split(tmp_path):
    """`eval perplexity --segment 0`: the split as one stream from one zero state; `--segment N`: N-token
    segments each from a zero state; neither changes the tokens counted."""
    from corpus_helpers import sentences, write_lines
    from test_train import make_config

    from lmtrain.checkpoint import load_model
    from lmtrain.training.trainer import train

    lines = sentences(50, seed=3)
    corpus = {"train": write_lines(tmp_path / "train.txt", lines[:40]),
              "valid": write_lines(tmp_path / "valid.txt", lines[40:])}
    train(make_config(corpus, tmp_path / "run", train__max_steps=5), progress_bar=False)
    checkpoint = str(tmp_path / "run" / "best.pt")
    model, tokenizer, _ = load_model(checkpoint)
    ids = stream_ids(tokenizer, corpus["valid"].read_text(encoding="utf-8"))
    whole = score(model, stream_segments(ids, ids.numel()))
    pieces = score(model, stream_segments(ids, 5))
    assert whole.loss != pytest.approx(pieces.loss, abs=1e-4)  # the state matters, so the test can tell them apart
    for segment, expected in ((0, whole), (5, pieces)):
        numbers, warnings = evaluate.evaluate_checkpoint(checkpoint, segment=segment)
        assert numbers["loss"] == pytest.approx(expected.loss, abs=1e-6) and numbers["tokens"] == expected.tokens
        assert warnings == []


def test_segment_for_a_sentences_model_is_said_to_change_nothing(tmp_path):
    from corpus_helpers import sentences, write_lines
    from test_train import make_config

    from lmtrain.training.trainer import train

    lines = sentences(50, seed=5)
    corpus = {"train": write_lines(tmp_path / "train.txt", lines[:40]),
              "valid": write_lines(tmp_path / "valid.txt", lines[40:])}
    train(make_config(corpus, tmp_path / "run", train__max_steps=2, data__mode="sentences"), progress_bar=False)
    checkpoint = str(tmp_path / "run" / "best.pt")
    plain, _ = evaluate.evaluate_checkpoint(checkpoint)
    numbers, warnings = evaluate.evaluate_checkpoint(checkpoint, segment=1)
    assert numbers == plain and warnings == [
        "warning: the segment length (--segment) is for stream-mode models: this one reads each line from a zero "
        "state, as it trained"]


def test_a_split_of_a_corpus_changed_since_the_checkpoint_is_scored_with_a_warning(tmp_path):
    """The checkpoint records its corpus files (as `--resume` checks them): a split cut from files that
    changed since is not the text the run was evaluated on, and the numbers say so."""
    from corpus_helpers import sentences, write_lines
    from test_train import make_config

    from lmtrain.training.trainer import train

    lines = sentences(50, seed=4)
    corpus = {"train": write_lines(tmp_path / "train.txt", lines[:40]),
              "valid": write_lines(tmp_path / "valid.txt", lines[40:])}
    train(make_config(corpus, tmp_path / "run", train__max_steps=2), progress_bar=False)
    checkpoint = str(tmp_path / "run" / "best.pt")
    assert evaluate.evaluate_checkpoint(checkpoint)[1] == []
    write_lines(corpus["train"], lines[:30])  # another split's file: the valid split is what it was
    assert evaluate.evaluate_checkpoint(checkpoint)[1] == []
    write_lines(corpus["valid"], lines[40:45])
    _, warnings = evaluate.evaluate_checkpoint(checkpoint)
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: the corpus changed since the checkpoint: "
                                                         f"data.valid {corpus['valid']} (")
    assert warnings[0].endswith("; the valid split scored is the file as it is now")
    assert evaluate.evaluate_checkpoint(checkpoint, data_file=str(corpus["valid"]))[1] == []  # a file of one's own


def test_eval_reads_only_the_scored_file(tmp_path, monkeypatch):
    """Scoring the valid split reads and hashes the valid file alone: the training file may be gigabytes."""
    from corpus_helpers import sentences, write_lines
    from test_train import make_config

    from lmtrain.data import cache
    from lmtrain.training.trainer import train

    lines = sentences(50, seed=4)
    corpus = {"train": write_lines(tmp_path / "train.txt", lines[:40]),
              "valid": write_lines(tmp_path / "valid.txt", lines[40:])}
    train(make_config(corpus, tmp_path / "run", train__max_steps=2), progress_bar=False)
    hashed = []
    digest = cache.content_digest
    monkeypatch.setattr(cache, "content_digest", lambda path, folder: hashed.append(path) or digest(path, folder))
    numbers, notes = evaluate.evaluate_checkpoint(str(tmp_path / "run" / "best.pt"))
    assert notes == [] and hashed == [corpus["valid"]]
    corpus["train"].unlink()  # nor read: the scored split's file alone (data.path is cut whole)
    assert evaluate.evaluate_checkpoint(str(tmp_path / "run" / "best.pt")) == (numbers, [])


def test_the_python_api_refuses_counts_and_devices_it_cannot_use(tmp_path):
    """evaluate_checkpoint, score and load_model name the argument (a negative batch size read as a
    diverged checkpoint, a device torch cannot use as an AssertionError from inside torch)."""
    from lmtrain.checkpoint import load_model
    from lmtrain.errors import LmtrainError

    nowhere = str(tmp_path / "nowhere.pt")  # the arguments are checked before the file is read
    with pytest.raises(LmtrainError, match=r"^batch_size must be >= 1; got -3"):
        evaluate.evaluate_checkpoint(nowhere, batch_size=-3)
    with pytest.raises(LmtrainError, match=r"^segment must be >= 0 \(0: the whole text as one stream\); got -5"):
        evaluate.evaluate_checkpoint(nowhere, segment=-5)
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1; got 0"):
        score(tiny_model(Tokenizer.fit("ab\n", level="char")), [], batch_size=0)
    with pytest.raises(LmtrainError, match=r"^device must be cpu, cuda or cuda:N; got 'gpu'"):
        load_model(nowhere, "gpu")
    if not torch.cuda.is_available():
        with pytest.raises(LmtrainError, match=r"^device cuda: no CUDA device is available here \(use device='cpu'\)"):
            load_model(nowhere, "cuda")
