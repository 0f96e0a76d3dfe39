"""lmtrain.evaluation.agreement: minimal pairs are read strictly, sentences are scored exactly, the report adds up."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from lmtrain.checkpoint import save_checkpoint
from lmtrain.config import to_dict
from lmtrain.data.tokenizer import ZERO_INPUT, Tokenizer
from lmtrain.errors import LmtrainError
from lmtrain.evaluation.agreement import (
    ATTRACTOR_BUCKETS,
    DISTANCE_BUCKETS,
    Pair,
    agreement_report,
    format_report,
    read_pairs,
    sentence_log_probability,
    tie_reason,
)
from lmtrain.model.language_model import LanguageModel

CORPUS = Path(__file__).resolve().parent.parent / "corpora" / "agreement"
HEADER = "correct\twrong\tdistance\tattractors\n"
PAIRS = [("the cat was full .", "the cat were full .", 0, 0),
         ("the cats near the dog were full .", "the cats near the dog was full .", 3, 1),
         ("the cat near the dogs was full .", "the cat near the dogs were full .", 3, 1),
         ("the dog eats the food .", "the dog eat the food .", 0, 0),
         ("the dogs , which ate the food , were full .", "the dogs , which ate the food , was full .", 4, 0),
         ("the cat near the dogs near the cats was full .", "the cat near the dogs near the cats were full .", 7, 2)]
VOCABULARY_TEXT = "\n".join(sentence for pair in PAIRS for sentence in pair[:2]) + "\n"


def write_pairs(path: Path, rows=PAIRS) -> Path:
    path.write_text(HEADER + "".join("\t".join(map(str, row)) + "\n" for row in rows), encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(LmtrainError) as caught:
        read_pairs(path)
    return str(caught.value)


# --- read_pairs -------------------------------------------------------------------------------------

def test_read_pairs(tmp_path: Path):
    pairs = read_pairs(write_pairs(tmp_path / "pairs.tsv"))
    assert pairs[1] == Pair("the cats near the dog were full .", "the cats near the dog was full .", 3, 1)
    assert len(pairs) == len(PAIRS)


def test_read_pairs_errors(tmp_path: Path):
    assert "not found" in error_of(tmp_path / "missing.tsv")
    (tmp_path / "header.tsv").write_text("sentence\twrong\tdistance\tattractors\na\tb\t0\t0\n")
    assert "good and a bad sentence" in error_of(tmp_path / "header.tsv")  # not lmtrain's header, not two columns
    (tmp_path / "empty.tsv").write_text("")
    assert "no pairs" in error_of(tmp_path / "empty.tsv")
    (tmp_path / "only_header.tsv").write_text(HEADER)
    assert "no pairs" in error_of(tmp_path / "only_header.tsv")
    for bad in ("a\tb\t0", "a\tb\tx\t0", "a\tb\t0\t-1", "\tb\t0\t0", "a\tb\t0\t0\textra", ""):
        (tmp_path / "bad.tsv").write_text(HEADER + "a\tb\t1\t0\n" + bad + "\nc\td\t0\t0\n")
        assert "line 3" in error_of(tmp_path / "bad.tsv")
    (tmp_path / "trailing.tsv").write_text(HEADER + "a\tb\t1\t0\n\n\n")  # blank lines at the end are not pairs
    assert len(read_pairs(tmp_path / "trailing.tsv")) == 1


# --- sentence_log_probability -------------------------------------------------------------------------

def by_hand(model: LanguageModel, ids: list[int], first: int) -> float:
    """Sum of log p over the sentence, one step at a time with the state carried."""
    state, total, previous = None, 0.0, first
    for target in ids:
        logits, state = model(torch.tensor([[previous]]), state)
        total += logits[0, -1].double().log_softmax(-1)[target].item()
        previous = target
    return total


@pytest.mark.parametrize("sentence_start", [True, False])
def test_sentence_log_probability_is_the_sum_of_token_log_probabilities(sentence_start: bool):
    tokenizer = Tokenizer.fit(VOCABULARY_TEXT, level="word")
    model = LanguageModel(tokenizer.vocab_size, cell="lstm", embed_size=5, hidden_size=7, num_layers=2).eval()
    sentences = [row[0] for row in PAIRS] + ["the cat was unseenword ."]
    got = sentence_log_probability(model, tokenizer, sentences, sentence_start=sentence_start, batch_size=3)
    first = ZERO_INPUT if sentence_start else tokenizer.eos_id
    expected = [by_hand(model, tokenizer.encode(sentence), first) for sentence in sentences]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert tokenizer.encode(sentences[0])[-1] == tokenizer.eos_id  # <eos> is scored too
    other_start = sentence_log_probability(model, tokenizer, sentences, sentence_start=not sentence_start)
    assert other_start != pytest.approx(got)


# --- agreement_report -------------------------------------------------------------------------------

def checkpoint(tmp_path: Path, config_factory, *, mode: str, was_bias: float = 0.0) -> Path:
    """A tiny model; with `was_bias`, logits are the output bias alone, preferring "was" to "were"."""
    config = config_factory(**{"data.mode": mode, "model.embed_size": 4, "model.hidden_size": 4})
    tokenizer = Tokenizer.fit(VOCABULARY_TEXT, level="word")
    model = LanguageModel.from_config(config.model, tokenizer.vocab_size)
    if was_bias:
        with torch.no_grad():
            model.projection.weight.zero_()
            model.projection.bias.zero_()
            model.projection.bias[tokenizer.ids["was"]] = was_bias
            model.projection.bias[tokenizer.ids["were"]] = -was_bias
    path = tmp_path / f"{mode}.pt"
    save_checkpoint(path, {"config": to_dict(config), "tokenizer": tokenizer.to_dict(), "model": model.state_dict()})
    return path


@pytest.mark.parametrize("mode", ["sentences", "stream"])
def test_report_structure_and_counts(tmp_path: Path, config_factory, mode: str):
    report = agreement_report(checkpoint(tmp_path, config_factory, mode=mode), write_pairs(tmp_path / "p.tsv"))
    assert report["count"] == len(PAIRS) and 0 <= report["accuracy"] <= 1
    assert list(report["by_distance"]) == [label for label, *_ in DISTANCE_BUCKETS]
    assert list(report["by_attractors"]) == [label for label, *_ in ATTRACTOR_BUCKETS]
    for table in (report["by_distance"], report["by_attractors"]):
        assert sum(count for _, count in table.values()) == len(PAIRS)
        assert all((accuracy is None) == (count == 0) for accuracy, count in table.values())
    assert report["by_distance"]["1-2"] == (None, 0) and report["by_attractors"]["2"][1] == 1
    text = format_report(report)
    assert "3-5" in text and "\n2 " in text and f"pairs {len(PAIRS)}" in text
    assert "1-2" not in text and "11+" not in text and "3+" not in text  # buckets without pairs get no row


def test_a_model_preferring_was_gets_exactly_the_was_pairs_right(tmp_path: Path, config_factory):
    path = checkpoint(tmp_path, config_factory, mode="sentences", was_bias=10.0)
    report = agreement_report(path, write_pairs(tmp_path / "p.tsv"))
    # "eats"/"eat" score the same (only was/were have a bias): a tie, neither right nor wrong
    assert (report["ties"], report["ties_unknown_words"], report["scored"]) == (1, 0, len(PAIRS) - 1)
    was_pairs = [" was " in row[0] for row in PAIRS]
    assert report["accuracy"] == pytest.approx(sum(was_pairs) / (len(PAIRS) - 1))
    assert report["by_attractors"]["1"] == (0.5, 2)   # "... dogs was" right, "... dog were" wrong
    assert report["by_attractors"]["2"] == (1.0, 1)
    assert report["by_distance"]["0"] == (1.0, 1)     # "was full" right; "eats" a tie, not counted
    assert report["unknown_tokens"] == 0
    assert "ties: 1 pairs score the same" in format_report(report)


def test_pairs_that_differ_only_in_unknown_words_are_ties(tmp_path: Path, config_factory):
    """With a vocabulary that lacks both verbs, the two sentences are the same tokens: a tie, said."""
    path = checkpoint(tmp_path, config_factory, mode="sentences")
    (tmp_path / "unknown.tsv").write_text("the cat sleeps .\tthe cat sleep .\n"
                                          "the cat was full .\tthe cat were full .\n")
    report = agreement_report(path, tmp_path / "unknown.tsv")
    assert (report["count"], report["ties"], report["ties_unknown_words"], report["scored"]) == (2, 1, 1, 1)
    assert report["unknown_tokens"] == 2
    assert "1 of them differ only in words the model does not know" in format_report(report)
    assert "by_distance" not in report  # plain pairs have no distances


def test_a_pair_of_the_same_sentence_is_a_tie_of_its_own(tmp_path: Path, config_factory):
    """The same sentence twice, or the same words spaced differently, is not a difference in unknown words."""
    path = checkpoint(tmp_path, config_factory, mode="sentences")
    (tmp_path / "same.tsv").write_text("the cat was full .\tthe cat was full .\n"
                                       "the cat was full .\tthe  cat was full . \n"
                                       "the cat sleeps .\tthe cat sleep .\n"
                                       "the cat was full .\tthe cat were full .\n")
    report = agreement_report(path, tmp_path / "same.tsv")
    assert (report["count"], report["ties"], report["scored"]) == (4, 3, 1)
    assert (report["ties_same_sentence"], report["ties_unknown_words"]) == (2, 1)
    assert ("ties: 3 pairs score the same and count neither way (2 of them have the same sentence on both sides, "
            "as the model reads it; 1 of them differ only in words the model does not know)") in format_report(report)
    (tmp_path / "tie.tsv").write_text("the cat .\tthe cat .\n")
    report = agreement_report(path, tmp_path / "tie.tsv")
    assert (report["ties"], report["ties_same_sentence"], report["ties_unknown_words"]) == (1, 1, 0)
    assert "does not know" not in format_report(report)


def test_tie_reason_reads_as_the_model_reads():
    words = Tokenizer.fit(VOCABULARY_TEXT, level="word")
    chars = Tokenizer.fit(VOCABULARY_TEXT, level="char")
    spaced = Pair("the cat was full .", "the  cat was full .")
    assert tie_reason(words, spaced) == "same" and tie_reason(chars, spaced) is None  # a space is a character
    assert tie_reason(words, Pair("the cat sleeps .", "the cat sleep .")) == "unknown"
    assert tie_reason(chars, Pair("the cat ä .", "the cat ö .")) == "unknown"
    assert tie_reason(words, Pair("the cat was full .", "the cat were full .")) is None
    assert tie_reason(words, Pair("the cat\nwas full .", "the cat was full .")) == "same"  # one sentence, one line
    assert tie_reason(words, Pair("the cat <unk> .", "the cat sleep .")) == "unknown"


def test_group_by_is_refused_for_a_tsv(tmp_path: Path):
    (tmp_path / "plain.tsv").write_text("the cat was full .\tthe cat were full .\n")
    for path in (tmp_path / "plain.tsv", write_pairs(tmp_path / "pairs.tsv")):
        with pytest.raises(LmtrainError, match="--group-by") as caught:
            read_pairs(path, group_by="UID")
        assert str(path) in str(caught.value) and "JSON lines" in str(caught.value)
        assert read_pairs(path)  # without --group-by the file reads


def test_the_cli_refuses_group_by_for_a_tsv_in_one_line_and_warns_of_same_sentences(tmp_path: Path,
                                                                                   config_factory):
    from typer.testing import CliRunner

    from lmtrain.cli import app

    model = checkpoint(tmp_path, config_factory, mode="sentences")
    (tmp_path / "pairs.tsv").write_text("the cat .\tthe cat .\nthe cat was full .\tthe cat were full .\n")
    result = CliRunner().invoke(app, ["eval", "agreement", "--checkpoint", str(model), "--data",
                                      str(tmp_path / "pairs.tsv"), "--group-by", "UID"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "--group-by" in result.stderr and "Traceback" not in result.stderr
    result = CliRunner().invoke(app, ["eval", "agreement", "--checkpoint", str(model), "--data",
                                      str(tmp_path / "pairs.tsv"), "--json"])
    assert result.exit_code == 0, result.output
    assert "1 of 2 pairs have the same sentence on both sides" in result.stderr
    assert json.loads(result.stdout)["ties_same_sentence"] == 1


def test_the_documented_example_pairs_use_the_quickstart_vocabulary(tmp_path: Path):
    """The pairs that docs/commands.md writes for `eval agreement` are in words the quickstart model knows."""
    commands = (Path(__file__).resolve().parent.parent / "docs" / "commands.md").read_text(encoding="utf-8")
    section = commands.split("## `lmtrain eval agreement`", 1)[1].split("\n## ", 1)[0]
    script = re.search(r"```bash\n(.*?)```", section, re.S).group(1).split("lmtrain eval agreement")[0]
    subprocess.run(["bash", "-ec", script], cwd=tmp_path, check=True, timeout=30)
    pairs = read_pairs(tmp_path / "pairs.tsv")
    known = set((CORPUS / "train.txt").read_text(encoding="ascii").split())
    assert len(pairs) >= 2 and {word for pair in pairs for word in (pair.correct + " " + pair.wrong).split()} <= known
    words = Tokenizer(level="word", eos="line", tokens=["<unk>", "<eos>", *sorted(known)])
    assert [tie_reason(words, pair) for pair in pairs] == [None] * len(pairs)


def test_plain_two_column_pairs_with_or_without_a_header(tmp_path: Path):
    (tmp_path / "plain.tsv").write_text("the cat was full .\tthe cat were full .\nthe dog ran .\tthe dog run .\n")
    assert read_pairs(tmp_path / "plain.tsv") == [Pair("the cat was full .", "the cat were full ."),
                                                   Pair("the dog ran .", "the dog run .")]
    (tmp_path / "headed.tsv").write_text("sentence_good\tsentence_bad\nthe dog ran .\tthe dog run .\n")
    assert read_pairs(tmp_path / "headed.tsv") == [Pair("the dog ran .", "the dog run .")]
    (tmp_path / "bad.tsv").write_text("the dog ran .\tthe dog run .\nonly one sentence\n")
    assert "line 2" in error_of(tmp_path / "bad.tsv") and "one tab" in error_of(tmp_path / "bad.tsv")


def test_json_lines_as_suites_ship_them_grouped_by_their_phenomenon(tmp_path: Path, config_factory):
    records = [{"sentence_good": "the cat was full .", "sentence_bad": "the cat were full .", "UID": "agr_1",
                "linguistics_term": "agreement", "pairID": "0"},
               {"sentence_good": "the dogs were full .", "sentence_bad": "the dogs was full .", "UID": "agr_2",
                "linguistics_term": "agreement", "pairID": "1"},
               {"sentence_good": "the dog eats the food .", "sentence_bad": "the dog eat the food .", "UID": "verb_1",
                "linguistics_term": "verbs", "pairID": "2"}]
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    pairs = read_pairs(path)
    assert [pair.group for pair in pairs] == ["agreement", "agreement", "verbs"]  # linguistics_term before UID
    assert [pair.group for pair in read_pairs(path, group_by="UID")] == ["agr_1", "agr_2", "verb_1"]
    report = agreement_report(checkpoint(tmp_path, config_factory, mode="sentences"), path)
    assert list(report["by_group"]) == ["agreement", "verbs"]
    assert sum(count for _, count in report["by_group"].values()) == report["scored"]
    assert "group" in format_report(report) and "agreement" in format_report(report)
    with pytest.raises(LmtrainError, match="no field 'paradigm'"):
        read_pairs(path, group_by="paradigm")
    (tmp_path / "broken.jsonl").write_text('{"sentence_good": "a ."}\n')
    assert "line 1" in error_of(tmp_path / "broken.jsonl") and "sentence_bad" in error_of(tmp_path / "broken.jsonl")
    (tmp_path / "notjson.jsonl").write_text('{"sentence_good": "a .", \n')
    assert "not JSON" in error_of(tmp_path / "notjson.jsonl")
    (tmp_path / "deep.jsonl").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert "nested too deeply" in error_of(tmp_path / "deep.jsonl")


def test_missing_data_file_and_default_message(tmp_path: Path, config_factory, monkeypatch):
    path = checkpoint(tmp_path, config_factory, mode="sentences")
    with pytest.raises(LmtrainError, match="not found"):
        agreement_report(path, tmp_path / "none.tsv")
    monkeypatch.setattr("lmtrain.evaluation.agreement.DEFAULT_PAIRS", tmp_path / "corpora" / "agreement" / "pairs.tsv")
    with pytest.raises(LmtrainError, match="--data"):
        agreement_report(path)


# --- the bundled pairs.tsv ----------------------------------------------------------------------------

def test_bundled_pairs_are_minimal_and_unseen_in_training():
    pairs = read_pairs(CORPUS / "pairs.tsv")
    train = set((CORPUS / "train.txt").read_text(encoding="ascii").splitlines())
    assert 1500 <= len(pairs) <= 2500
    assert not [pair.correct for pair in pairs if pair.correct in train]
    assert len({pair.correct for pair in pairs}) == len(pairs)
    for pair in pairs:
        correct, wrong = pair.correct.split(), pair.wrong.split()
        assert len(correct) == len(wrong) and sum(a != b for a, b in zip(correct, wrong)) == 1
    assert {min(pair.attractors, 3) for pair in pairs} == {0, 1, 2, 3}
