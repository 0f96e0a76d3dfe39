"""lmtrain.checkpoint: round trips with identical logits, safe loading only, atomic writes, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lmtrain.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    load_model,
    model_from_checkpoint,
    parameter_count,
    save_checkpoint,
    to_cpu,
)
from lmtrain.config import to_dict
from lmtrain.data.tokenizer import Tokenizer
from lmtrain.errors import LmtrainError
from lmtrain.files import atomic_write
from lmtrain.model.language_model import LanguageModel


class WritesAFile:
    """Unpickling this runs `open(path, "w")`: the classic pickle code-execution payload."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def saved(tmp_path: Path, config_factory, small_text: str):
    config = config_factory(**{"model.cell": "gru", "model.embed_size": 6, "model.hidden_size": 6,
                               "model.num_layers": 2, "model.tie_weights": True})
    tokenizer = Tokenizer.fit(small_text, level="char")
    model = LanguageModel.from_config(config.model, tokenizer.vocab_size)
    path = tmp_path / "model.pt"
    optimizer_state = {"step": torch.tensor(3.0), "lr": [0.1, 0.2]}
    save_checkpoint(path, {"config": to_dict(config), "tokenizer": tokenizer.to_dict(), "model": model.state_dict(),
                           "optimizer": optimizer_state, "progress": {"step": 7, "best": None}})
    return path, model, tokenizer, config


def one_line_error(function, *args) -> str:
    with pytest.raises(LmtrainError) as caught:
        function(*args)
    message = str(caught.value)
    assert message and "\n" not in message
    return message


def test_round_trip(saved):
    path, model, tokenizer, config = saved
    payload = load_checkpoint(path)
    assert payload["format_version"] == FORMAT_VERSION
    assert payload["config"] == to_dict(config)
    assert payload["tokenizer"] == tokenizer.to_dict()
    assert payload["progress"] == {"step": 7, "best": None}
    assert torch.equal(payload["optimizer"]["step"], torch.tensor(3.0)) and payload["optimizer"]["lr"] == [0.1, 0.2]
    assert payload["model"].keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(payload["model"][name], tensor)


def test_model_from_checkpoint_identical_logits(saved, small_text: str):
    path, model, tokenizer, config = saved
    loaded, loaded_tokenizer, loaded_config = model_from_checkpoint(load_checkpoint(path), path)
    assert loaded_config == config and loaded_tokenizer == tokenizer
    assert not loaded.training
    assert loaded.projection.weight is loaded.embedding.weight  # tying survives
    tokens = torch.tensor([tokenizer.encode(small_text)])
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], model(tokens)[0])


def test_load_model(saved):
    path, model, tokenizer, _ = saved
    loaded, _, _ = load_model(str(path), "cpu")
    assert parameter_count(loaded) == parameter_count(model)
    assert next(loaded.parameters()).device.type == "cpu"


def test_plain_safe_torch_load(saved):
    path = saved[0]
    payload = torch.load(path, weights_only=True)
    assert payload["format_version"] == FORMAT_VERSION and "model" in payload


def test_named_tuple_state_saved_as_plain_tuple(tmp_path: Path, saved):
    path, model, _, _ = saved
    state = model.initial_state(2)
    tree = to_cpu({"state": state})
    assert type(tree["state"][0]) is tuple
    payload = torch.load(saved[0], weights_only=True)
    payload["state"] = state
    save_checkpoint(tmp_path / "with_state.pt", payload)
    loaded = load_checkpoint(tmp_path / "with_state.pt")
    assert [tuple(t.shape) for t in loaded["state"][1]] == [(2, 6)]


def test_to_cpu_detaches():
    x = torch.ones(2, requires_grad=True) * 2
    tree = to_cpu({"a": [x, (x, 3)], "b": "s"})
    assert not tree["a"][0].requires_grad and tree["a"][1][1] == 3 and tree["b"] == "s"


# --- atomic writes ---------------------------------------------------------------------------------

def test_atomic_write_gives_the_mode_a_new_file_would_have(tmp_path: Path):
    previous = os.umask(0o027)
    try:
        atomic_write(tmp_path / "shared.txt", b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.txt").stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path: Path):
    path = tmp_path / "file.bin"
    atomic_write(path, b"first")
    assert path.read_bytes() == b"first"
    atomic_write(path, b"second, longer")
    assert path.read_bytes() == b"second, longer"
    assert sorted(os.listdir(tmp_path)) == ["file.bin"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path: Path, monkeypatch):
    path = tmp_path / "file.bin"
    atomic_write(path, b"old")

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["file.bin"]


def test_save_checkpoint_into_missing_folder_is_an_lmtrain_error(tmp_path: Path):
    message = one_line_error(save_checkpoint, tmp_path / "no" / "such" / "c.pt", {"model": {}})
    assert "could not write checkpoint" in message


# --- refusing what is not ours ---------------------------------------------------------------------

def test_truncated_file(saved, tmp_path: Path):
    data = saved[0].read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    message = one_line_error(load_checkpoint, truncated)
    assert str(truncated) in message and "not a readable lmtrain checkpoint" in message


def test_not_a_checkpoint_file(tmp_path: Path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    assert "not a readable lmtrain checkpoint" in one_line_error(load_checkpoint, text)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "not a readable lmtrain checkpoint" in one_line_error(load_checkpoint, empty)


def test_other_torch_file_is_not_a_checkpoint(tmp_path: Path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(2)}, path)
    assert one_line_error(load_checkpoint, path) == f"{path}: not an lmtrain checkpoint"
    torch.save([1, 2, 3], path)
    assert one_line_error(load_checkpoint, path) == f"{path}: not an lmtrain checkpoint"


def test_directory(tmp_path: Path):
    assert one_line_error(load_checkpoint, tmp_path).endswith(f"(give the .pt file, e.g. {tmp_path}/best.pt)")
    (tmp_path / "last.pt").mkdir()  # a folder named like a checkpoint: no advice to look inside it
    assert one_line_error(load_checkpoint, tmp_path / "last.pt") == (
        f"checkpoint path is a directory: {tmp_path / 'last.pt'} (a checkpoint is a file)")


def test_empty_path():
    assert one_line_error(load_checkpoint, "") == "no checkpoint path given (an empty string)"  # not "a directory: ."


def test_missing_file(tmp_path: Path):
    missing = tmp_path / "missing.pt"
    assert one_line_error(load_checkpoint, missing) == f"checkpoint not found: {missing}"


@pytest.mark.parametrize("version, relation", [(FORMAT_VERSION + 1, "newer"), (0, "older")])
def test_wrong_format_version(saved, tmp_path: Path, version, relation: str):
    payload = load_checkpoint(saved[0])
    path = tmp_path / "other.pt"
    save_checkpoint(path, {**payload, "format_version": version})
    message = one_line_error(load_checkpoint, path)
    assert f"checkpoint format {version} is {relation}" in message


@pytest.mark.parametrize("replaced, words", [
    ({"format_version": "1"}, "its format version '1' is not a number"),   # not "older": it is no number at all
    ({"format_version": None}, "its format version None is not a number"),
    ({"config": "a string"}, "its config is a str, not a mapping"),
    ({"progress": "a string"}, "its progress is a str, not a mapping"),
    ({"tokenizer": ["a", "list"]}, "its tokenizer is a list, not a mapping"),
    ({"config": {"data": "a string"}}, "its config sections are not mappings"),
    ({"progress": {"step": "x", "epoch": 0}}, "its progress.step is 'x', not a whole number"),
    ({"progress": {"step": 3, "train_seconds": -1.0}}, "its progress.train_seconds is -1.0, not a number"),
])
def test_a_forged_payload_is_not_a_checkpoint(saved, tmp_path: Path, replaced, words):
    payload = load_checkpoint(saved[0])
    path = tmp_path / "forged.pt"
    torch.save({**payload, **replaced}, path)
    assert one_line_error(load_checkpoint, path) == f"{path}: not an lmtrain checkpoint ({words})"


def test_a_forged_tokenizer_level_is_refused(saved, tmp_path: Path):
    payload = load_checkpoint(saved[0])
    path = tmp_path / "forged.pt"
    torch.save({**payload, "tokenizer": {**payload["tokenizer"], "level": "byte"}}, path)
    assert "tokenizer level and eos must be char or word" in one_line_error(load_model, path)


def test_a_symlink_loop_is_named_as_one(tmp_path: Path):
    (tmp_path / "a.pt").symlink_to("b.pt")
    (tmp_path / "b.pt").symlink_to("a.pt")
    assert one_line_error(load_checkpoint, tmp_path / "a.pt") == f"{tmp_path / 'a.pt'}: a loop of symbolic links, " \
                                                                  f"not a checkpoint"


def test_a_forged_model_size_is_refused_before_anything_is_allocated(saved, tmp_path: Path):
    payload = load_checkpoint(saved[0])
    path = tmp_path / "huge.pt"
    model = {**payload["config"]["model"], "num_layers": 10 ** 9}
    torch.save({**payload, "config": {**payload["config"], "model": model}}, path)
    assert "the model would have" in one_line_error(load_model, path)


def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": FORMAT_VERSION, "config": {}, "tokenizer": {}, "model": {},
                "extra": WritesAFile(marker)}, path)
    assert not marker.exists()
    message = one_line_error(load_checkpoint, path)
    assert "refused to load" in message and str(path) in message
    assert f"({open.__module__}.{open.__name__})" in message  # names what it refused (io.open)
    assert not marker.exists()
    with pytest.raises(LmtrainError):
        load_model(path)
    assert not marker.exists()


def test_checkpoint_whose_weights_do_not_match_its_config(saved, tmp_path: Path):
    payload = load_checkpoint(saved[0])
    payload["config"]["model"]["hidden_size"] = 12
    payload["config"]["model"]["embed_size"] = 12
    message = one_line_error(model_from_checkpoint, payload, "x.pt")
    assert message.startswith("x.pt: checkpoint does not match its own model config")


def test_checkpoint_with_invalid_config(saved):
    payload = load_checkpoint(saved[0])
    payload["config"]["model"]["cell"] = "transformer"
    assert "model.cell must be one of" in one_line_error(model_from_checkpoint, payload, "x.pt")


def test_checkpoint_without_tokenizer_entry(saved):
    payload = load_checkpoint(saved[0])
    model_from_checkpoint(payload, "x.pt")  # fine as saved
    del payload["tokenizer"]["tokens"]
    assert "x.pt: checkpoint does not match" in one_line_error(model_from_checkpoint, payload, "x.pt")


def test_the_progress_fields_checked_are_the_trainers():
    from dataclasses import fields

    from lmtrain.checkpoint import PROGRESS
    from lmtrain.training.resume import Progress

    assert set(PROGRESS) == {field.name for field in fields(Progress)}


# A checkpoint of format 1, written by `lmtrain train` before the right-to-left LM and the gradient
# algorithm got their own names (a 1x8 LSTM with `direction: bi`, `model.backward: manual`, on generated
# text), and the losses it gave then on one sentence in each direction.
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_a_format_1_checkpoint_loads_and_scores_as_it_did():
    expected = json.loads((FIXTURES / "checkpoint-format-1.json").read_text())
    raw = torch.load(FIXTURES / "checkpoint-format-1.pt", weights_only=True)
    assert raw["format_version"] == 1 and raw["config"]["model"]["backward"] == "manual"
    assert any(key.startswith("rnn_backward.") for key in raw["model"])
    model, tokenizer, config = load_model(FIXTURES / "checkpoint-format-1.pt")
    assert config.model.gradients == "manual" and config.model.direction == "bi"
    tokens = torch.tensor([[tokenizer.ids[word] for word in expected["text"].split()]])
    with torch.no_grad():
        left_to_right = model(tokens[:, :-1], targets=tokens[:, 1:])[0].item()
        flipped = tokens.flip(1)
        right_to_left = model(flipped[:, :-1], targets=flipped[:, 1:], right_to_left=True)[0].item()
    assert left_to_right == pytest.approx(expected["left_to_right_nll"], rel=1e-6)
    assert right_to_left == pytest.approx(expected["right_to_left_nll"], rel=1e-6)


def test_a_format_1_checkpoint_is_written_back_in_todays_format(tmp_path: Path):
    payload = load_checkpoint(FIXTURES / "checkpoint-format-1.pt")
    save_checkpoint(tmp_path / "again.pt", payload)
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert again["format_version"] == FORMAT_VERSION
    assert not any("backward" in key for key in again["model"])
    assert any(key.startswith("rnn_right_to_left.") for key in again["model"])
