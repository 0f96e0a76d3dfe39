"""lmtrain.evaluation.diagnose: the gradient-by-distance measurement of the vanishing gradient."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch.nn import functional as F
from typer.testing import CliRunner

from lmtrain.cli import app
from lmtrain.errors import LmtrainError
from lmtrain.evaluation.diagnose import distances_to_show, gradient_by_distance, gradient_report, windows
from lmtrain.model.language_model import LanguageModel

V, B, T = 11, 3, 12


def tokens(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, V, (B, T + 1), generator=generator)
    return rows[:, :-1], rows[:, 1:]


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_distance_zero_is_the_softmax_gradient(cell):
    # At distance 0, ∂L(T)/∂a(T) = W_yᵀ (ŷ - y) / B for the batch-mean cross-entropy: no recurrence involved.
    torch.manual_seed(0)
    model = LanguageModel(V, cell=cell, embed_size=5, hidden_size=6, num_layers=2).double()
    inputs, targets = tokens()
    norms = gradient_by_distance(model, inputs, targets)
    assert len(norms) == T and all(torch.isfinite(torch.tensor(norms)))
    with torch.no_grad():
        a_last = model.rnn(model.embedding(inputs))[0][:, -1]
        probabilities = model.projection(a_last).softmax(dim=-1)
        expected = ((probabilities - F.one_hot(targets[:, -1], V)) @ model.projection.weight / B).norm(dim=1).mean()
    assert norms[0] == pytest.approx(expected.item(), rel=1e-10)


def test_contracting_rnn_gradient_vanishes_geometrically():
    torch.manual_seed(0)
    model = LanguageModel(V, cell="rnn", embed_size=5, hidden_size=6, num_layers=1).double()
    with torch.no_grad():
        model.rnn.layers[0].cell.W_a[:, :6] *= 0.2   # a small W_aa: each step multiplies by < 1
    norms = gradient_by_distance(model, *tokens())
    ratios = [norms[d + 1] / norms[d] for d in range(1, T - 1)]
    assert all(ratio < 0.5 for ratio in ratios)
    assert norms[8] / norms[0] < 1e-3


def test_no_dropout_and_mode_restored():
    model = LanguageModel(V, cell="lstm", embed_size=5, hidden_size=6, num_layers=2, dropout=0.5).double()
    model.train()
    first = gradient_by_distance(model, *tokens())
    second = gradient_by_distance(model, *tokens())
    assert first == second and model.training


def test_distances_to_show():
    assert distances_to_show(64) == [0, 1, 2, 4, 8, 16, 32, 63]
    assert distances_to_show(33) == [0, 1, 2, 4, 8, 16, 32]
    assert distances_to_show(2) == [0, 1]


def test_windows_are_contiguous_with_shifted_targets():
    ids = torch.arange(100)
    inputs, targets = windows(ids, 10, 4, generator=torch.Generator().manual_seed(1))
    assert inputs.shape == targets.shape == (4, 10)
    assert torch.equal(targets, inputs + 1)
    assert torch.equal(inputs[:, 1:] - inputs[:, :-1], torch.ones(4, 9, dtype=torch.long))
    with pytest.raises(ValueError):
        windows(torch.arange(5), 10, 1, generator=torch.Generator())


@pytest.fixture
def config_file(tmp_path):
    rng = random.Random(3)
    words = "the cat cats was were full hungry dog dogs".split()
    for split, count in (("train", 200), ("valid", 40)):
        (tmp_path / f"{split}.txt").write_text(
            "".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) + "\n" for _ in range(count)))
    path = tmp_path / "config.yaml"
    path.write_text("data: {train: train.txt, valid: valid.txt, level: word}\n"
                    "model: {embed_size: 8, hidden_size: 8, num_layers: 1}\n"
                    "train: {max_steps: 1}\n")
    return path


def test_report_from_an_untrained_config(config_file):
    description, rows = gradient_report(config_path=str(config_file), overrides=["model.cell=gru"], length=16, count=4)
    assert "gru 1x8" in description and "untrained" in description
    assert [row["distance"] for row in rows] == [0, 1, 2, 4, 8, 15]
    assert rows[0]["relative"] == 1.0 and all(row["norm"] >= 0 for row in rows)


def test_report_errors(config_file):
    with pytest.raises(LmtrainError, match="exactly one"):
        gradient_report()
    with pytest.raises(LmtrainError, match="--length"):
        gradient_report(config_path=str(config_file), length=10_000)


def test_overrides_with_a_checkpoint_are_refused_not_ignored(tmp_path, config_file):
    from lmtrain.config import load_config
    from lmtrain.training.trainer import train

    config = load_config(config_file, [f"train.out_dir={tmp_path / 'run'}", "train.final_samples=0"])
    train(config, progress_bar=False)
    with pytest.raises(LmtrainError, match=r"^KEY=VALUE overrides go with --config, not --checkpoint; got "
                                            r"model\.hidden_size=4$"):
        gradient_report(checkpoint=str(tmp_path / "run" / "last.pt"), overrides=["model.hidden_size=4"])


def test_a_bad_plot_name_is_refused_before_the_measurement(config_file, tmp_path):
    result = CliRunner().invoke(app, ["diagnose", "gradients", "--config", str(config_file), "--length", "8",
                                      "--count", "2", "--plot", str(tmp_path / "plot")])
    assert result.exit_code == 2
    assert result.output == f"error: --plot must name a .png or .svg or .pdf file; got {tmp_path / 'plot'}\n"


def test_the_plot_written_is_named_as_plot_and_visualize_name_theirs(config_file, tmp_path):
    pytest.importorskip("matplotlib")
    picture = tmp_path / "decay.png"
    result = CliRunner().invoke(app, ["diagnose", "gradients", "--config", str(config_file), "--length", "8",
                                      "--count", "2", "--plot", str(picture)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"wrote {picture}" and picture.read_bytes()[:4] == b"\x89PNG"


def test_cli_json(config_file):
    result = CliRunner().invoke(app, ["diagnose", "gradients", "--config", str(config_file), "--length", "8",
                                      "--count", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [row["distance"] for row in report["rows"]] == [0, 1, 2, 4, 7]


def test_plot_without_matplotlib_is_a_clear_error(no_matplotlib, tmp_path):
    from lmtrain.evaluation.diagnose import plot_rows

    with pytest.raises(LmtrainError, match="matplotlib"):
        plot_rows({"rnn": [{"distance": 0, "norm": 1.0, "relative": 1.0}]}, str(tmp_path / "plot.png"))
    assert not (tmp_path / "plot.png").exists()
