"""lmtrain visualize: the values it shows are the model's own forward pass, read as `eval perplexity`
reads a text; the feature detectors on hand-made strings; the correlations and saturation on planted
numbers; the command's outputs and its refusals; the page in a real headless browser."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.nn.functional import linear
from typer.testing import CliRunner

from lmtrain.checkpoint import save_checkpoint
from lmtrain.cli import app
from lmtrain.config import to_dict
from lmtrain.data.dataset import sentence_pieces, stream_segments
from lmtrain.data.encoding import stream_ids
from lmtrain.data.tokenizer import Tokenizer
from lmtrain.errors import LmtrainError
from lmtrain.evaluation import inside
from lmtrain.evaluation.inside import (
    START,
    Trace,
    correlations,
    read_labels,
    saturation,
    strongest_units,
    text_features,
)
from lmtrain.evaluation.perplexity import score
from lmtrain.model.cells import combine
from lmtrain.model.language_model import LanguageModel

TEXT = "".join(f"the {'big ' * (i % 3)}cat{'s' * (i % 2)} (sat) \"here\" {i % 5}\n" for i in range(12))
CELLS = [("rnn", {}), ("gru", {}), ("gru", {"relevance_gate": False}), ("gru", {"gru_reset": "after"}),
         ("lstm", {})]


def model_for(tokenizer: Tokenizer, cell: str, num_layers: int = 2, **options) -> LanguageModel:
    torch.manual_seed(3)
    return LanguageModel(tokenizer.vocab_size, cell=cell, embed_size=5, hidden_size=7, num_layers=num_layers,
                         **options).eval()


def checkpoint(tmp_path: Path, config_factory, *, level: str = "char", mode: str = "stream", cell: str = "lstm",
               num_layers: int = 2, **options) -> Path:
    tokenizer = Tokenizer.fit(TEXT, level=level)
    config = config_factory(**{"data.level": level, "data.mode": mode, "model.cell": cell, "model.embed_size": 5,
                               "model.hidden_size": 7, "model.num_layers": num_layers, "train.eval_segment": 40,
                               **{f"model.{key}": value for key, value in options.items()}})
    model = model_for(tokenizer, cell, num_layers, **options)
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"config": to_dict(config), "tokenizer": tokenizer.to_dict(), "model": model.state_dict()})
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    return path


# -- the numbers are the model's ---------------------------------------------------------------------------

@pytest.mark.parametrize(("cell", "options"), CELLS)
@pytest.mark.parametrize("mode", ["stream", "sentences"])
def test_values_are_the_models_forward_pass(cell: str, options: dict, mode: str):
    tokenizer = Tokenizer.fit(TEXT, level="char")
    model = model_for(tokenizer, cell, **options)
    sequences = (stream_segments(stream_ids(tokenizer, TEXT), 40) if mode == "stream"
                 else sentence_pieces(tokenizer, TEXT, 64))
    traced = inside.trace(model, tokenizer, sequences)
    assert len(traced.tokens) == sum(inputs.numel() for inputs, _ in sequences)
    with torch.no_grad():
        for start, (inputs, _) in zip(traced.sequence_starts, sequences):
            rows = slice(start, start + inputs.numel())
            # The layers as training and evaluation run them (the compiled or Python loops, not the cells' forward).
            x = model.embed(inputs.unsqueeze(0))
            for layer, values in zip(model.rnn.layers, traced.values):
                x, final = layer(x)
                torch.testing.assert_close(values["a"][rows], x[0], rtol=1e-5, atol=1e-6)
                if cell == "lstm":
                    torch.testing.assert_close(values["c"][rows][-1], final[1][0], rtol=1e-5, atol=1e-6)
            logits, _ = model(inputs.unsqueeze(0))
            torch.testing.assert_close(traced.logits[rows], logits[0], rtol=1e-5, atol=1e-5)
    assert [token for token, _ in traced.guesses[0]] == [
        tokenizer.tokens[i] for i in traced.logits[0].topk(5).indices.tolist()]
    if mode == "sentences":
        assert all(traced.tokens[start] == START for start in traced.sequence_starts)


def test_the_gates_shown_are_the_ones_the_lstm_used():
    tokenizer = Tokenizer.fit(TEXT, level="char")
    model = model_for(tokenizer, "lstm", num_layers=1)
    inputs, targets = stream_segments(stream_ids(tokenizer, TEXT), 1000)[0]
    values = inside.trace(model, tokenizer, [(inputs, targets)]).values[0]
    cell = model.rnn.layers[0].cell
    x = model.embed(inputs).detach()
    a_prev = torch.cat([torch.zeros(1, 7), values["a"][:-1]])
    c_prev = torch.cat([torch.zeros(1, 7), values["c"][:-1]])
    c_tilde = torch.tanh(linear(combine(a_prev, x), cell.W_c, cell.b_c)).detach()
    torch.testing.assert_close(values["c"], values["f"] * c_prev + values["u"] * c_tilde)   # c(t)
    torch.testing.assert_close(values["a"], values["o"] * torch.tanh(values["c"]))          # a(t)


def test_the_gates_shown_are_the_ones_the_gru_used():
    tokenizer = Tokenizer.fit(TEXT, level="char")
    model = model_for(tokenizer, "gru", num_layers=1)
    inputs, targets = stream_segments(stream_ids(tokenizer, TEXT), 1000)[0]
    values = inside.trace(model, tokenizer, [(inputs, targets)]).values[0]
    assert set(values) == {"a", "u", "r"}
    cell = model.rnn.layers[0].cell
    x = model.embed(inputs).detach()
    c_prev = torch.cat([torch.zeros(1, 7), values["a"][:-1]])
    c_tilde = torch.tanh(linear(combine(values["r"] * c_prev, x), cell.W_c, cell.b_c)).detach()
    torch.testing.assert_close(values["a"], values["u"] * c_tilde + (1 - values["u"]) * c_prev)


def test_the_text_is_read_as_eval_perplexity_reads_it():
    tokenizer = Tokenizer.fit(TEXT, level="char")
    model = model_for(tokenizer, "gru")
    sequences = stream_segments(stream_ids(tokenizer, TEXT), 40)
    traced = inside.trace(model, tokenizer, sequences)
    nll = torch.nn.functional.cross_entropy(traced.logits.double(), traced.target_ids, reduction="mean")
    assert float(nll) == pytest.approx(score(model, sequences).loss, rel=1e-5)
    assert traced.sequence_starts == list(range(0, len(traced.tokens), 40))


# -- features -------------------------------------------------------------------------------------------------

def test_character_features_on_a_hand_made_string():
    tokens = ["<eos>", *'say "hi (a [b])" ok', "<eos>", *"xy", "<eos>"]
    features = text_features(tokens, level="char")
    text = "".join("\n" if token == "<eos>" else token for token in tokens)
    at = lambda name, index: features[name][index]  # noqa: E731
    assert at("inside quotes", text.index('"') - 1) == 0 and at("inside quotes", text.index('"')) == 1
    assert at("inside quotes", text.index("h")) == 1 and at("inside quotes", text.rindex('"')) == 0
    assert at("bracket depth", text.index("(a") + 1) == 1 and at("bracket depth", text.index("b")) == 2
    assert at("inside brackets", text.index("b")) == 1 and at("bracket depth", text.index("o")) == 0
    assert at("position in line", 0) == 0 and at("position in line", 1) == 1  # the 's' after the first <eos>
    assert at("characters to line end", 1) == len('say "hi (a [b])" ok') - 1
    assert at("characters to line end", text.index("x")) == 1 and at("position in line", text.rindex("y")) == 2
    starts = [i for i, value in enumerate(features["start of word"]) if value]
    assert [text[i] for i in starts] == ["s", "h", "a", "b", "o", "x"]


def test_a_newline_ends_a_line_for_a_model_without_eos():
    assert text_features(["a", "b", "\n", "c"], level="char")["position in line"] == [1, 2, 0, 1]


def test_word_features_count_positions_in_the_sentence():
    tokens = [START, "the", "cats", "-lrb-", "sat", "-rrb-", START, "a", "dog"]
    features = text_features(tokens, level="word")
    assert features["position in sentence"] == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert features["words to sentence end"] == [5, 4, 3, 2, 1, 0, 2, 1, 0]
    assert features["bracket depth"] == [0, 0, 0, 1, 1, 0, 0, 0, 0]


def test_labels_a_user_gives(tmp_path: Path):
    numbers = tmp_path / "n.txt"
    numbers.write_text("1\n0\n\n2.5\n", encoding="utf-8")
    assert read_labels(str(numbers), "plural", 4)["plural"][:2] == [1.0, 0.0]
    assert math.isnan(read_labels(str(numbers), "plural", 4)["plural"][2])
    words = tmp_path / "w.txt"
    words.write_text("noun\nverb\n-\nnoun\n", encoding="utf-8")
    found = read_labels(str(words), "pos", 4)
    assert set(found) == {"pos=noun", "pos=verb"} and found["pos=noun"][:2] == [1.0, 0.0]
    with pytest.raises(LmtrainError, match=r"has 4 labels, and the text 5 positions"):
        read_labels(str(words), "pos", 5)
    with pytest.raises(LmtrainError, match=r"cannot read the feature file"):
        read_labels(str(tmp_path / "missing.txt"), "x", 1)
    numbers.write_text("1\n0\ninf\n2.5\n", encoding="utf-8")
    with pytest.raises(LmtrainError, match=r"has an infinite label at line 3 \(inf\)"):
        read_labels(str(numbers), "plural", 4)


# -- which units, and the gates' saturation -----------------------------------------------------------------

def planted_trace(values: torch.Tensor) -> Trace:
    positions = values.size(0)
    return Trace(["x"] * positions, [0], [{"a": values}], [[] for _ in range(positions)],
                 torch.zeros(positions, dtype=torch.long), torch.zeros(positions, 2))


def test_correlations_find_the_planted_unit():
    torch.manual_seed(0)
    feature = [float(i % 7) for i in range(200)]
    values = torch.randn(200, 6)
    values[:, 4] = -0.5 * torch.tensor(feature) + 0.01 * torch.randn(200)
    values[:, 2] = 1.0  # a unit that never moves
    r = correlations(values, feature)
    assert float(r[4]) == pytest.approx(-1.0, abs=1e-3) and float(r[2]) == 0.0 and r.abs().argmax() == 4
    best = strongest_units(planted_trace(values), feature, count=2)
    assert (best[0].layer, best[0].quantity, best[0].unit) == (0, "a", 4) and best[0].r < -0.99
    assert strongest_units(planted_trace(values), [1.0] * 200) == []  # a feature that does not vary
    with_gaps = [math.nan if i % 2 else value for i, value in enumerate(feature)]
    assert float(correlations(values, with_gaps)[4]) == pytest.approx(-1.0, abs=1e-3)
    huge = [value * 1e300 for value in feature]  # r does not depend on the labels' scale, nor overflows on it
    assert torch.allclose(correlations(values, huge), r)


def test_saturation_fractions_and_reading():
    tokenizer = Tokenizer.fit("ab\n", level="char")
    cell = model_for(tokenizer, "gru", num_layers=1).rnn.layers[0].cell
    u = torch.tensor([[0.05, 0.5], [0.95, 0.5], [0.02, 0.95], [0.5, 0.99]])
    traced = planted_trace(u)
    traced.values[0].update(u=u, r=torch.full((4, 2), 0.5))
    found = {s.gate: s for s in saturation(traced, [cell])}
    assert found["u"].left == [0.5, 0.0] and found["u"].right == [0.25, 0.5]
    assert found["r"].left == [0.0, 0.0] and "2 are almost never saturated" in found["r"].reading()


# -- the command -----------------------------------------------------------------------------------------------

def invoke(*args) -> object:
    return CliRunner().invoke(app, ["visualize", *map(str, args)])


@pytest.mark.parametrize(("level", "mode", "cell"), [("char", "stream", "lstm"), ("word", "sentences", "gru"),
                                                     ("char", "sentences", "rnn")])
def test_the_command_writes_the_page_json_and_tokens(tmp_path, config_factory, level, mode, cell):
    path = checkpoint(tmp_path, config_factory, level=level, mode=mode, cell=cell)
    text = tmp_path / "text.txt"
    result = invoke("--checkpoint", path, "--text", text, "-o", tmp_path / "page.html")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "page.html").read_text(encoding="utf-8")
    assert "<script" in page and not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)  # nothing fetched
    listed = invoke("--checkpoint", path, "--text", text, "--tokens")
    positions = listed.stdout.splitlines()
    numbers = json.loads(invoke("--checkpoint", path, "--text", text, "--json", "--layer", 1, "--unit", 3).stdout)
    assert numbers["positions"] == len(positions) == len(numbers["tokens"]) == len(numbers["guesses"])
    first = numbers["values"][0]
    assert (first["layer"], first["quantity"], first["unit"]) == (1, "a", 3) and len(first["values"]) == len(positions)
    assert ("position in line" if level == "char" else "position in sentence") in numbers["features"]
    assert all(-1 <= match["r"] <= 1 for matches in numbers["features"].values() for match in matches)
    assert [s["gate"] for s in numbers["saturation"]] == {"lstm": ["f", "u", "o"] * 2, "gru": ["u", "r"] * 2,
                                                           "rnn": []}[cell]


def test_max_tokens_keeps_the_first_positions_and_markup_in_the_text_stays_text(tmp_path, config_factory):
    path = checkpoint(tmp_path, config_factory, level="char", mode="stream")
    text = tmp_path / "text.txt"
    text.write_text("</script><!--<script>" + TEXT, encoding="utf-8")
    every = invoke("--checkpoint", path, "--text", text, "--tokens").stdout.splitlines()
    first = invoke("--checkpoint", path, "--text", text, "--tokens", "--max-tokens", 30)
    assert first.stdout.splitlines() == every[:30]
    assert "warning: the text holds more than 30 positions; read the first 30 (--max-tokens)" in first.output
    assert invoke("--checkpoint", path, "--text", text, "-o", tmp_path / "page.html").exit_code == 0
    page = (tmp_path / "page.html").read_text(encoding="utf-8")
    data = page.split('<script id="data" type="application/json">', 1)[1].split("</script>", 1)[0]
    assert "<" not in data and json.loads(data)["tokens"][:4] == ["<eos>", "<", "/", "s"]  # as written


def test_unseen_tokens_are_shown_as_written_and_counted(tmp_path, config_factory):
    path = checkpoint(tmp_path, config_factory, level="char", mode="stream")
    text = tmp_path / "text.txt"
    text.write_text("the cat «sat» [its]\n", encoding="utf-8")  # « » [ ] are not in the vocabulary
    result = CliRunner().invoke(app, ["visualize", "--checkpoint", str(path), "--text", str(text), "--json"])
    numbers = json.loads(result.stdout)
    assert "".join(numbers["tokens"][1:]) == "the cat «sat» [its]"  # the last <eos> is only predicted
    assert [token for token, unknown in zip(numbers["tokens"], numbers["unknown"]) if unknown] == list("«»[]")
    assert numbers["came"][0][0] == "t" and all(0 <= p <= 1 for _, p in numbers["came"])
    assert "warning: 4 of 20 positions (20.00%) read a token the model never saw" in result.stderr
    assert numbers["features"]["bracket depth"]  # measured on the text as written, not on <unk>


def test_a_literal_unk_in_a_word_text_is_the_models_own_token_not_an_unseen_one(tmp_path, config_factory):
    """Penn Treebank writes its rare words as <unk>: the model saw that token in training, as eval perplexity
    counts it; only a word outside the vocabulary is marked."""
    path = checkpoint(tmp_path, config_factory, level="word", mode="sentences", cell="lstm", num_layers=1)
    text = tmp_path / "unk.txt"
    text.write_text("the <unk> cat zyzzyva cats\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["visualize", "--checkpoint", str(path), "--text", str(text), "--json"])
    numbers = json.loads(result.stdout)
    assert [token for token, unknown in zip(numbers["tokens"], numbers["unknown"]) if unknown] == ["zyzzyva"]
    assert "warning: 1 of " in result.stderr


def test_three_labelled_positions_at_least(tmp_path, config_factory):
    path = checkpoint(tmp_path, config_factory, level="char", mode="stream")
    tokens = invoke("--checkpoint", path, "--text", tmp_path / "text.txt", "--tokens").stdout.splitlines()
    labels = tmp_path / "two.txt"
    labels.write_text("1\n0\n" + "-\n" * (len(tokens) - 2), encoding="utf-8")
    numbers = json.loads(invoke("--checkpoint", path, "--text", tmp_path / "text.txt", "--json",
                                "--feature", f"two={labels}").stdout)
    assert numbers["features"]["two"] == []


def test_a_feature_file_is_correlated(tmp_path, config_factory):
    path = checkpoint(tmp_path, config_factory, level="word", mode="sentences", cell="lstm", num_layers=1)
    text = tmp_path / "text.txt"
    tokens = invoke("--checkpoint", path, "--text", text, "--tokens").stdout.splitlines()
    labels = tmp_path / "plural.txt"
    labels.write_text("".join("1\n" if token.endswith("s") else "0\n" for token in tokens), encoding="utf-8")
    numbers = json.loads(invoke("--checkpoint", path, "--text", text, "--json", "--feature", f"plural={labels}",
                                "--top", 3).stdout)
    assert len(numbers["features"]["plural"]) == 3


@pytest.mark.parametrize(("arguments", "message"), [
    (["--unit", 7], r"--unit must be 0 to 6; got 7"),
    (["--layer", 3], r"--layer must be 1 to 2 \(the model has 2 layers\); got 3"),
    (["--quantity", "c", "--cell-is-gru"], r"--quantity must be one of a, u, r for this cell; got 'c'"),
    (["--feature", "plural"], r"--feature takes NAME=FILE; got 'plural'"),
    (["--feature", "x=MISSING"], r"cannot read the feature file .*missing\.txt: No such file"),
    (["--max-tokens", 0], r"--max-tokens must be >= 1; got 0"),
    (["-o", "NOFOLDER/page.html"], r"cannot write .*none/page\.html"),
    (["--png", "picture"], r"--png must name a \.png file; got picture"),
    (["--tokens", "--json"], r"--tokens prints the positions and nothing else"),
    (["--all-values"], r"--all-values goes with --json"),
    (["--feature", "x=a.txt", "--feature", "x=b.txt"], r"--feature x is given twice"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, config_factory, arguments, message):
    gru = "--cell-is-gru" in arguments
    path = checkpoint(tmp_path, config_factory, cell="gru" if gru else "lstm")
    arguments = [str(argument).replace("MISSING", str(tmp_path / "missing.txt")).replace(
        "NOFOLDER", str(tmp_path / "none")) for argument in arguments if argument != "--cell-is-gru"]
    result = invoke("--checkpoint", path, "--text", tmp_path / "text.txt", "-o", tmp_path / "page.html", *arguments)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), result.output
    assert not (tmp_path / "page.html").exists() or "-o" in arguments


@pytest.mark.parametrize("arguments", [["--unit", "7"], ["--layer", "3"], ["--quantity", "x"]])
def test_a_unit_the_model_lacks_is_refused_before_the_text_is_read(tmp_path, config_factory, monkeypatch, arguments):
    """The forward pass over a long text is not spent on a unit that cannot be shown."""
    path = checkpoint(tmp_path, config_factory, cell="lstm")
    monkeypatch.setattr("lmtrain.evaluation.visualize.read_text", lambda *a, **k: pytest.fail("the text was read"))
    result = invoke("--checkpoint", path, "--text", tmp_path / "text.txt", *arguments)
    assert result.exit_code == 2 and result.output.startswith(f"error: {arguments[0]} must be"), result.output


def test_the_page_is_never_written_over_a_checkpoint(tmp_path, config_factory):
    path = checkpoint(tmp_path, config_factory)
    before = Path(path).read_bytes()
    result = invoke("--checkpoint", path, "--text", tmp_path / "text.txt", "-o", path)
    assert result.exit_code != 0
    assert result.output.strip() == f"error: -o must name a .html or .htm file; got {path}"
    assert Path(path).read_bytes() == before
    assert invoke("--checkpoint", path, "--text", tmp_path / "text.txt", "-o", tmp_path / "PAGE.HTM").exit_code == 0


@pytest.mark.parametrize("written", ["-o", "--png"])
def test_the_outputs_are_never_written_over_the_text_or_a_feature_file(tmp_path, config_factory, written):
    path = checkpoint(tmp_path, config_factory)
    suffix = ".html" if written == "-o" else ".png"
    text, labels = tmp_path / f"text{suffix}", tmp_path / f"labels{suffix}"
    shutil.copy(tmp_path / "text.txt", text)
    count = len(invoke("--checkpoint", path, "--text", text, "--tokens").stdout.splitlines())
    labels.write_text("1\n" * count, encoding="utf-8")
    for target, named in ((text, "the input"), (labels, "the input")):
        before = target.read_bytes()
        result = invoke("--checkpoint", path, "--text", text, "--feature", f"x={labels}", written, target)
        assert result.exit_code == 2 and result.output.strip() == (
            f"error: {written} {target} is {named} {target}: writing it would replace what is read"), result.output
        assert target.read_bytes() == before


def test_a_missing_text_is_one_line(tmp_path, config_factory):
    path = checkpoint(tmp_path, config_factory)
    result = invoke("--checkpoint", path, "--text", tmp_path / "absent.txt")
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1
    assert "absent.txt" in result.output


def test_a_png_of_one_unit(tmp_path, config_factory):
    pytest.importorskip("matplotlib")
    path = checkpoint(tmp_path, config_factory)
    result = invoke("--checkpoint", path, "--text", tmp_path / "text.txt", "--png", tmp_path / "unit.png",
                    "--layer", 2, "--quantity", "c", "--unit", 1)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "unit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "visualize.html").exists()  # asked for a picture only


# -- the page in a real browser ---------------------------------------------------------------------------------

def chromium() -> str | None:
    return next((found for name in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if (found := shutil.which(name))), None)


# Opens the page in a frame and uses it as a reader would: the unit box changed, a token clicked.
HARNESS = """<!DOCTYPE html><html><body><iframe id="page" src="page.html#layer=2&quantity=c&unit=0"></iframe><script>
const frame = document.getElementById("page");
frame.onload = () => {
  const page = frame.contentDocument, colours = () => [...page.querySelectorAll("#text span.t")]
    .map(span => span.style.backgroundColor).join("|");
  const before = colours(), unit = page.getElementById("unit");
  unit.value = "1";
  unit.dispatchEvent(new Event("change"));
  page.querySelector("#text span.t").dispatchEvent(new MouseEvent("click", { bubbles: true }));
  document.body.dataset.result = JSON.stringify({ ready: page.body.dataset.ready, shown: page.body.dataset.shown,
    changed: before !== colours(), hash: frame.contentWindow.location.hash,
    strip: page.getElementById("strip").textContent });
};
</script></body></html>"""


def rendered(browser: str, page: Path, fragment: str, tmp_path: Path) -> tuple[str, str]:
    """The page's DOM after its script ran, and the browser's log, with every network request refused."""
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         "--allow-file-access-from-files", f"--user-data-dir={tmp_path / 'profile'}",
         "--proxy-server=http://127.0.0.1:9",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri() + fragment],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


def colours(dom: str) -> list[str]:
    return re.findall(r'<span class="t[^"]*" data-i="\d+" style="background-color: ([^;"]+)', dom)


@pytest.mark.slow
def test_the_page_in_a_headless_browser(tmp_path, config_factory):
    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium here (.ci/run installs the distribution's chromium package where it can)")
    path = checkpoint(tmp_path, config_factory, level="char", mode="stream", cell="lstm")
    page = tmp_path / "page.html"
    assert invoke("--checkpoint", path, "--text", tmp_path / "text.txt", "-o", page).exit_code == 0
    first, log = rendered(browser, page, "#layer=2&quantity=c&unit=0", tmp_path)
    assert 'data-ready="yes"' in first and 'data-shown="2/c/0"' in first
    assert not re.search(r"CONSOLE|Uncaught", log), log[-2000:]
    positions = len(invoke("--checkpoint", path, "--text", tmp_path / "text.txt", "--tokens").stdout.splitlines())
    shown = colours(first)
    assert len(shown) == positions  # every position drawn, each with a colour
    assert "(sat)" in re.sub(r"<[^>]+>", "", first)  # the text itself
    second, log = rendered(browser, page, "#layer=2&quantity=c&unit=1", tmp_path)
    assert not re.search(r"CONSOLE|Uncaught", log), log[-2000:]
    assert 'data-shown="2/c/1"' in second and colours(second) != shown  # another unit, other colours
    (tmp_path / "harness.html").write_text(HARNESS, encoding="utf-8")
    harness, log = rendered(browser, tmp_path / "harness.html", "", tmp_path)
    assert not re.search(r"CONSOLE|Uncaught", log), log[-2000:]
    result = json.loads(html.unescape(re.search(r'data-result="([^"]*)"', harness).group(1)))
    assert result["ready"] == "yes" and result["changed"] and result["shown"] == "2/c/1"
    assert result["hash"] == "#layer=2&quantity=c&unit=1"
    assert "position 0" in result["strip"] and "next tokens the model expects" in result["strip"]

