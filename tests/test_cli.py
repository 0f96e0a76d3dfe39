"""The `lmtrain` command end to end, run as a real subprocess: train -> sample -> eval perplexity for
char/word x stream/sentences, and every user mistake ending in one `error:` line, never a traceback.

Each `lmtrain` process spends ~1.5 s of CPU importing torch, so the fixtures start the commands in
the background, a few at a time (a sample waits for its training), and each test waits only for the
results it checks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import select
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from corpus_helpers import sentences, write_lines

from lmtrain.config import load_config
from lmtrain.data.encoding import load_splits

# Real processes, builds or whole training runs: `pytest -m "not slow"` leaves this file out.
pytestmark = pytest.mark.slow

SCRIPT = Path(sys.executable).with_name("lmtrain")
LMTRAIN = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "lmtrain"]
# One thread per process: the fixtures run several processes side by side.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NO_COLOR": "1", "COLUMNS": "120"}
WORKERS = max(2, min(6, 2 * (os.cpu_count() or 1)))
METRIC_KEYS = {"step", "split", "loss", "ppl", "lr", "tokens_per_s", "elapsed_s", "threads"}
FINAL_SAMPLES = 3


# -- shared helpers ---------------------------------------------------------------------------------

def write_config(path: Path, values: dict) -> Path:
    """Write dotted `values` as a YAML config with data, model and train sections."""
    tree: dict = {}
    for key, value in values.items():
        section, _, name = key.partition(".")
        tree.setdefault(section, {})[name] = value
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def run(args: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*LMTRAIN, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


class Commands:
    """Runs `lmtrain` commands in the background, at most WORKERS processes at once. A command may
    wait for another one (a sample waits for its training) and prepare files before it starts."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.slots = threading.Semaphore(WORKERS)
        self.threads = ThreadPoolExecutor(max_workers=128)  # waiting threads hold no process slot

    def start(self, args: list, *, after: Future | None = None,
              prepare: Callable[[], None] | None = None) -> Future:
        def job() -> subprocess.CompletedProcess:
            if after is not None:
                after.result()
            if prepare is not None:
                prepare()
            with self.slots:
                return run(args, self.cwd)
        return self.threads.submit(job)

    def close(self) -> None:
        self.threads.shutdown(wait=True, cancel_futures=True)


class Started(dict):
    """{key: Future}; reading a key waits for that command and gives its CompletedProcess."""

    def __getitem__(self, key):
        return super().__getitem__(key).result()


def output_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The lines printed on stdout (an empty sample is an empty line, and still counts)."""
    assert result.stdout.endswith("\n"), result.stdout
    return result.stdout[:-1].split("\n")


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, exactly one stderr line `error: ...` naming each fragment, no traceback anywhere."""
    everything = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, everything
    assert "Traceback" not in result.stdout + result.stderr, everything
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), everything
    assert "internal error" not in lines[0], everything  # a user's mistake, not a crash
    for fragment in fragments:
        assert fragment in lines[0], everything
    return lines[0]


def json_output(result: subprocess.CompletedProcess) -> dict:
    assert_ok(result)
    lines = output_lines(result)
    assert len(lines) == 1, result.stdout
    numbers = json.loads(lines[0])
    assert isinstance(numbers, dict)
    return numbers


def token_count(text: str, level: str) -> int:
    """Tokens that evaluation scores in `text`: every character or word plus one <eos> per line."""
    lines = text.split("\n")[:-1]
    return sum((len(line) if level == "char" else len(line.split())) + 1 for line in lines)


# -- --help ------------------------------------------------------------------------------------------------

def test_help_lists_the_commands(tmp_path):
    main_help, eval_help = run(["--help"], tmp_path), run(["eval", "--help"], tmp_path)
    assert_ok(main_help)
    for command in ("train", "sample", "eval"):
        assert re.search(rf"\b{command}\b", main_help.stdout), main_help.stdout
    assert_ok(eval_help)
    assert "perplexity" in eval_help.stdout


def test_help_lists_the_commands_in_the_order_of_a_run(tmp_path):
    """Train first, then what reads its checkpoints, then the groups: the order the cli modules register them."""
    listed = run(["--help"], tmp_path).stdout.partition("Commands:")[2]
    names = re.findall(r"^  (\w+)", listed, flags=re.MULTILINE)
    assert names == ["train", "sample", "info", "plot", "visualize", "eval", "diagnose", "data", "kernels"]
    assert re.findall(r"^  (\w+)", run(["eval", "--help"], tmp_path).stdout.partition("Commands:")[2],
                      flags=re.MULTILINE) == ["perplexity", "agreement"]


def run_python(code: str, folder: Path) -> subprocess.CompletedProcess:
    """`code` in a fresh Python, as lmtrain's console script would run it (the CLI's environment)."""
    return subprocess.run([sys.executable, "-c", code], cwd=folder, env=ENV, capture_output=True, text=True,
                          timeout=120)


def test_a_foreign_warning_is_one_warning_line(tmp_path):
    """A library's Python warning (torch's, matplotlib's) reaches stderr as one `warning:` line."""
    code = ("import sys, warnings\n"
            "import lmtrain.cli, lmtrain.checkpoint\n"
            "from lmtrain.errors import LmtrainError\n"
            "def describe(path):\n"
            "    warnings.warn('CUDA initialization: a driver too old\\nand a second line', UserWarning)\n"
            "    raise LmtrainError('no checkpoint here')\n"
            "lmtrain.checkpoint.describe = describe\n"
            "sys.argv = ['lmtrain', 'info', 'x.pt']\n"
            "lmtrain.cli.run()\n")
    result = run_python(code, tmp_path)
    assert result.returncode == 2
    assert result.stderr == "warning: CUDA initialization: a driver too old\nerror: no checkpoint here\n"


def test_version_bare_command_and_plain_help(tmp_path):
    version = run(["--version"], tmp_path)
    assert_ok(version)
    assert re.fullmatch(r"lmtrain \S+, torch \S+, compiled kernels: .+\n", version.stdout), version.stdout
    for bare in ([], ["eval"], ["kernels"]):
        shown = run(bare, tmp_path)
        assert shown.returncode == 0 and shown.stdout.startswith("Usage: lmtrain") and shown.stderr == "", shown
    for command in ([], ["train"], ["sample"], ["eval", "perplexity"]):
        helped = run([*command, "--help"], tmp_path)
        assert_ok(helped)
        assert "<bool>" not in helped.stdout and "╭" not in helped.stdout, helped.stdout
    assert "--resume / --no-resume" in run(["train", "--help"], tmp_path).stdout
    assert ("Every config key, with its default and meaning: docs/config.md"
            in " ".join(run(["train", "--help"], tmp_path).stdout.split()))


def test_a_closed_output_is_no_traceback(tmp_path):
    """`lmtrain ... >&-` and `2>&-`: what would be printed goes nowhere; the command does its work."""
    for closed in (1, 2):
        result = subprocess.run([*LMTRAIN, "data", "list"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                                timeout=120, preexec_fn=lambda number=closed: os.close(number))
        assert result.returncode == 0 and result.stderr == "", result
        assert ("tinyshakespeare" in result.stdout) == (closed == 2), result


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_output_cut_short_by_a_file_size_limit_is_an_error(tmp_path, unbuffered):
    """Output the system cuts short (`ulimit -f`, a full disk) is one error line and exit 2, also with
    PYTHONUNBUFFERED=1 (as container images set it), where Python's text layer dropped the rest silently."""
    import resource

    output = tmp_path / "out.txt"
    with output.open("w") as file:
        result = subprocess.run([*LMTRAIN, "data", "list"], cwd=tmp_path, env={**ENV, "PYTHONUNBUFFERED": unbuffered},
                                stdout=file, stderr=subprocess.PIPE, text=True, timeout=120,
                                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100)))
    assert (result.returncode, result.stderr) == (2, "error: cannot write the output: File too large\n")


def test_unbuffered_output_still_shows_each_line_at_once(tmp_path):
    """Under PYTHONUNBUFFERED=1 (torchrun's processes run with -u) the output goes through a buffer of
    lmtrain's, which must not hold a line back: a watcher sees it while the process still runs."""
    code = ("import time\nimport lmtrain.cli\nlmtrain.cli.open_standard_streams()\n"
            "print('first line')\ntime.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env={**ENV, "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready and process.stdout.readline() == "first line\n"
    finally:
        process.kill()
        process.wait()


def test_no_room_to_load_torch_is_one_line(tmp_path):
    """A limit on the address space (ulimit -v) that leaves no room to map torch's libraries, met while
    a command imports them: one line, no traceback."""
    code = ("import builtins, sys\n"
            "import lmtrain.cli\n"
            "real_import = builtins.__import__\n"
            "def refusing(name, *args, **kwargs):\n"
            "    if name == 'torch' or name.startswith('torch.'):\n"
            "        raise ImportError('libtorch_cpu.so: failed to map segment from shared object')\n"
            "    return real_import(name, *args, **kwargs)\n"
            "builtins.__import__ = refusing\n"
            "sys.argv = ['lmtrain', 'info', 'x.pt']\n"
            "lmtrain.cli.run()\n")
    result = run_python(code, tmp_path)
    assert (result.returncode, result.stderr) == (2, "error: out of memory: no room to load torch's libraries; give "
                                                     "the process more memory (ulimit -v, a container's limit)\n")


def test_a_runs_own_config_yaml_read_back_starts_a_new_run(tmp_path):
    """A new run from the config.yaml a run wrote in the same train.out_dir (one stopped before its first
    checkpoint) goes ahead, with overrides too: the file is lmtrain's resolved config, nothing of the user's."""
    from lmtrain.config import to_yaml

    write_lines(tmp_path / "corpus.txt", sentences(40, seed=3))
    tiny = write_config(tmp_path / "tiny.yaml", {
        "data.path": "corpus.txt", "model.embed_size": 8, "model.hidden_size": 8, "model.num_layers": 1,
        "train.batch_size": 2, "train.bptt": 8, "train.max_steps": 2, "train.final_samples": 0,
        "train.device": "cpu", "train.out_dir": str(tmp_path / "run")})
    own = tmp_path / "run" / "config.yaml"
    own.parent.mkdir()
    own.write_text(to_yaml(load_config(tiny)), encoding="utf-8")
    before = own.read_text(encoding="utf-8")
    result = run(["train", "--no-progress", own], tmp_path)
    assert_ok(result)
    assert own.read_text(encoding="utf-8") == before and (own.parent / "last.pt").exists()
    shutil.rmtree(own.parent)  # again, stopped before its first checkpoint, now with a setting changed
    own.parent.mkdir()
    own.write_text(before, encoding="utf-8")
    assert_ok(run(["train", "--no-progress", own, "train.max_steps=3"], tmp_path))
    assert "max_steps: 3" in own.read_text(encoding="utf-8")


def test_a_ctrl_c_while_the_process_exits_is_no_traceback(tmp_path):
    """The command done, a Ctrl-C during the interpreter's exit hooks (torch's) ends it quietly, with the
    command's exit code."""
    code = ("import atexit, os, signal, sys\n"
            "import lmtrain.cli\n"
            "atexit.register(lambda: [os.kill(os.getpid(), signal.SIGINT), sum(range(10**6))])\n"
            "sys.argv = ['lmtrain', 'data', 'list']\n"
            "lmtrain.cli.run()\n")
    result = run_python(code, tmp_path)
    assert (result.returncode, result.stderr) == (0, ""), result
    assert "tinyshakespeare" in result.stdout  # what the command printed is all there


def test_command_line_mistakes_are_one_error_line(tmp_path):
    for args, fragment in ((["sample"], "--checkpoint"), (["sample", "--checkpoint", "x.pt", "--num", "many"], "--num"),
                           (["no-such-command"], "no-such-command"), (["train", "--no-such-flag"], "--no-such-flag")):
        result = run(args, tmp_path)
        assert_user_error(result, fragment, "--help")


def tiny_char_run(folder: Path, **values) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_lines(folder / "corpus.txt", sentences(200, seed=5))
    return write_config(folder / "config.yaml", {
        "data.path": "corpus.txt", "data.level": "char", "model.embed_size": 8, "model.hidden_size": 16,
        "model.num_layers": 1, "train.batch_size": 4, "train.bptt": 16, "train.log_every": 5, "train.eval_every": 1000,
        "train.final_samples": 0, "train.out_dir": str(folder / "run"), **values})


def test_progress_into_a_pipe_is_plain_lines_with_the_time_left(tmp_path):
    """Not a terminal: no bar redrawn with carriage returns, a line every train.log_every steps."""
    steps = run(["train", tiny_char_run(tmp_path / "steps", **{"train.max_steps": 20})], tmp_path)
    assert_ok(steps)
    assert "\r" not in steps.stdout + steps.stderr
    lines = [line for line in output_lines(steps) if line.startswith("step ") and "tokens/s" in line]
    assert [line.split(":")[0] for line in lines] == ["step 5/20", "step 10/20", "step 15/20", "step 20/20"]
    assert all(re.search(r"tokens/s, .* elapsed, .* left$", line) for line in lines), lines
    budget = run(["train", tiny_char_run(tmp_path / "seconds", **{"train.max_seconds": 2})], tmp_path)
    assert_ok(budget)
    timed = [line for line in output_lines(budget) if line.startswith("step ") and " left" in line]
    assert timed and all(re.search(r"\d+ s left$", line) for line in timed), output_lines(budget)
    quiet = run(["train", "--no-progress", tiny_char_run(tmp_path / "quiet", **{"train.max_steps": 10})], tmp_path)
    assert not [line for line in output_lines(quiet) if line.startswith("step ") and "tokens/s" in line]


def test_a_reader_that_goes_away_stops_training_with_its_steps_saved(tmp_path):
    """`lmtrain train | head -3`: the run stops after the step in which the pipe closed, as on a signal, with
    last.pt written and the resume command on stderr, not silently and unsaved."""
    config = tiny_char_run(tmp_path / "piped", **{"train.max_steps": 100000, "train.log_every": 1})
    child = subprocess.Popen([*LMTRAIN, "train", str(config)], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    first = [child.stdout.readline() for _ in range(3)]
    child.stdout.close()
    stderr = child.stderr.read()
    assert child.wait(timeout=300) == 141, (first, stderr)
    assert re.search(r"^stopped by SIGPIPE at step (\d+); .*last.pt written; continue with: ", stderr), stderr
    step = int(re.search(r"at step (\d+)", stderr).group(1))
    import torch
    saved = torch.load(tmp_path / "piped" / "run" / "last.pt", weights_only=True)["progress"]["step"]
    assert saved == step < 100000


def test_info_labels_the_epoch_in_progress_and_the_completed_ones(tmp_path):
    config = tiny_char_run(tmp_path / "epochs", **{"train.max_epochs": 2})
    assert_ok(run(["train", "--no-progress", config], tmp_path))
    text = run(["info", tmp_path / "epochs" / "run" / "last.pt"], tmp_path)
    facts = json_output(run(["info", "--json", tmp_path / "epochs" / "run" / "last.pt"], tmp_path))
    assert facts["epochs_completed"] == 2 and facts["epoch_in_progress"] is None and "epoch" not in facts
    assert "trained: step" in text.stdout and ", 2 epochs completed, " in text.stdout  # stopped at the end of one
    config = tiny_char_run(tmp_path / "steps", **{"train.max_steps": 3})
    assert_ok(run(["train", "--no-progress", config], tmp_path))
    facts = json_output(run(["info", "--json", tmp_path / "steps" / "run" / "last.pt"], tmp_path))
    assert facts["epochs_completed"] == 0 and facts["epoch_in_progress"] == 1


def test_sample_escapes_control_characters_unless_raw(tmp_path, config_factory):
    import torch

    from lmtrain.checkpoint import save_checkpoint
    from lmtrain.config import to_dict
    from lmtrain.data.tokenizer import Tokenizer
    from lmtrain.model.language_model import LanguageModel

    tokenizer = Tokenizer.fit("a\x1b[2Jb\rc\u202ed\n", level="char")
    config = config_factory(**{"model.embed_size": 4, "model.hidden_size": 4, "model.num_layers": 1})
    model = LanguageModel.from_config(config.model, tokenizer.vocab_size)
    with torch.no_grad():  # ESC, "[", "2", "J", CR, then <eos>, whatever came before
        model.projection.weight.zero_()
        model.projection.bias.fill_(-1e4)
        model.projection.bias[tokenizer.ids["\r"]] = 1e4
    save_checkpoint(tmp_path / "model.pt", {"config": to_dict(config), "tokenizer": tokenizer.to_dict(),
                                            "model": model.state_dict()})
    shown = run(["sample", "--checkpoint", "model.pt", "--max-tokens", "3", "--seed", "0"], tmp_path)
    raw = subprocess.run([*LMTRAIN, "sample", "--checkpoint", "model.pt", "--max-tokens", "3", "--seed", "0", "--raw"],
                         cwd=tmp_path, env=ENV, capture_output=True, timeout=300)  # bytes: text mode reads CR as LF
    assert shown.stdout == "\\r\\r\\r\n" and raw.stdout == b"\r\r\r\n"


# -- end to end: four tiny runs -----------------------------------------------------------------------------

# name: (level, mode, extra config values, corpus layout)
COMBOS = {
    # data.path cut three ways: has a test split
    "char-stream": ("char", "stream", {"model.cell": "lstm", "model.num_layers": 2, "model.dropout": 0.1}, "path3"),
    # data.path cut two ways: no test split
    "char-sentences": ("char", "sentences", {"model.cell": "gru", "train.bptt": 64}, "path2"),
    # train/valid/test files
    "word-stream": ("word", "stream", {"model.cell": "rnn"}, "files3"),
    # train/valid files only; tied weights
    "word-sentences": ("word", "sentences", {"model.cell": "lstm", "model.tie_weights": True, "model.embed_size": 24,
                                             "model.num_layers": 2, "model.dropout": 0.1}, "files2"),
}
PRIME = {"char": "the", "word": "the cat"}
# Each `lmtrain` process costs ~1.7 s of CPU (most of it importing torch), so the checks that do not
# depend on the combination run on some of them: --prime on one of each level (and mode), --split
# test on both layouts that have a test split and one that has none, --data with known tokens on
# two (word-sentences scores a file of unseen words instead).
PRIME_COMBOS = ("char-stream", "word-sentences")
TEST_SPLIT_COMBOS = ("char-stream", "word-stream", "word-sentences")
DATA_FILE_COMBOS = ("char-sentences", "word-stream")


@dataclasses.dataclass
class Run:
    name: str
    level: str
    mode: str
    has_test: bool
    folder: Path
    config_path: Path
    out_dir: Path
    data_file: Path          # a text of known tokens for --data
    training: Future | None = None

    @property
    def train_result(self) -> subprocess.CompletedProcess:
        return self.training.result()


def make_run(root: Path, name: str) -> Run:
    level, mode, extra, layout = COMBOS[name]
    folder = root / name
    folder.mkdir()
    lines = sentences(300, seed=sum(map(ord, name)))
    values = {"data.level": level, "data.mode": mode}
    if layout.startswith("path"):
        write_lines(folder / "corpus.txt", lines)
        values.update({"data.path": "corpus.txt",   # relative to the YAML file's folder
                       "data.split": [0.8, 0.1, 0.1] if layout == "path3" else [0.9, 0.1]})
    else:
        values.update({"data.train": "train.txt", "data.valid": "valid.txt"})
        write_lines(folder / "train.txt", lines[:240])
        write_lines(folder / "valid.txt", lines[240:270])
        if layout == "files3":
            write_lines(folder / "test.txt", lines[270:])
            values["data.test"] = "test.txt"
    out_dir = folder / "runs"
    values.update({"model.embed_size": 16, "model.hidden_size": 24, "model.num_layers": 1,
                   "train.batch_size": 4, "train.bptt": 16, "train.lr": 0.005, "train.max_steps": 20,
                   "train.eval_every": 10, "train.log_every": 5, "train.checkpoint_every": 10,
                   "train.eval_segment": 64, "train.final_samples": FINAL_SAMPLES, "train.device": "cpu",
                   "train.out_dir": str(out_dir)})
    values.update(extra)
    config_path = write_config(folder / "tiny.yaml", values)
    data_file = write_lines(folder / "extra.txt", sentences(12, seed=99))
    return Run(name, level, mode, layout.endswith("3"), folder, config_path, out_dir, data_file)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def commands(root) -> Iterator[Commands]:
    started = Commands(root)
    yield started
    started.close()


@pytest.fixture(scope="module")
def runs(root, commands) -> dict[str, Run]:
    """The four combinations, trained from another folder (data paths are relative to the YAML)."""
    made = {name: make_run(root, name) for name in COMBOS}
    for r in made.values():
        r.training = commands.start(["train", "--no-progress", r.config_path])
    return made


@pytest.fixture(scope="module")
def follow_ups(runs, root, commands, mistakes) -> Started:
    """sample and eval perplexity on each run's best.pt, each started once its training ends.
    (Requesting `mistakes` starts those commands too, so that all of them share the CPUs.)"""
    jobs = {}
    for name, r in runs.items():
        best = r.out_dir / "best.pt"
        sample = ["sample", "--checkpoint", best]
        evaluate = ["eval", "perplexity", "--checkpoint", best, "--json"]
        jobs.update({
            # The same command twice: the same seed must give the same lines (and --max-tokens caps them).
            (name, "seed-a"): [*sample, "--num", 5, "--seed", 3, "--max-tokens", 3],
            (name, "seed-b"): [*sample, "--num", 5, "--seed", 3, "--max-tokens", 3],
            (name, "eval-1"): [*evaluate, "--split", "valid", "--batch-size", 1],
            (name, "eval-7"): [*evaluate, "--split", "valid", "--batch-size", 7],
        })
        if name in PRIME_COMBOS:
            jobs[(name, "prime")] = [*sample, "--num", 5, "--seed", 5, "--prime", PRIME[r.level]]
        if name in TEST_SPLIT_COMBOS:
            jobs[(name, "eval-test")] = [*evaluate, "--split", "test"]
        if name in DATA_FILE_COMBOS:
            jobs[(name, "eval-data")] = [*evaluate, "--data", r.data_file]
    unseen = write_lines(root / "unseen.txt", ["zebra quokka yak gnu"] * 10)  # 40 of 50 tokens unseen
    jobs[("word-sentences", "eval-unseen")] = ["eval", "perplexity", "--checkpoint",
                                               runs["word-sentences"].out_dir / "best.pt", "--data", unseen, "--json"]
    return Started({key: commands.start(args, after=runs[key[0]].training) for key, args in jobs.items()})


COMBO_NAMES = list(COMBOS)


@pytest.mark.parametrize("name", COMBO_NAMES)
def test_train_writes_the_run_files(runs, name):
    r = runs[name]
    assert_ok(r.train_result)
    for file in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt"):
        assert (r.out_dir / file).is_file(), file
    resolved = dataclasses.asdict(load_config(r.config_path))
    assert yaml.safe_load((r.out_dir / "config.yaml").read_text(encoding="utf-8")) == resolved
    events = [json.loads(line) for line in (r.out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert events
    for event in events:
        assert isinstance(event, dict) and METRIC_KEYS <= event.keys(), event
        assert event["split"] in ("train", "valid")
        assert math.isfinite(event["loss"]) and event["lr"] > 0
    assert [e["step"] for e in events if e["split"] == "train"] == [5, 10, 15, 20]
    assert [e["step"] for e in events if e["split"] == "valid"] == [10, 20]


@pytest.mark.parametrize("name", COMBO_NAMES)
def test_train_prints_the_resolved_config_and_samples(runs, name):
    r = runs[name]
    assert_ok(r.train_result)
    stdout = r.train_result.stdout
    lines = stdout.split("\n")
    # The config comes once the run can start: after the corpus's one line, when it was tokenized just now.
    first = next(index for index, line in enumerate(lines) if line.startswith("# config:"))
    assert first <= 1 and str(r.config_path.name) in lines[first], stdout
    printed = yaml.safe_load("\n".join(lines[first + 1:lines.index("", first)]))
    assert printed == dataclasses.asdict(load_config(r.config_path))
    assert "done: 20 steps" in stdout
    assert "\nsamples:\n" in stdout, stdout
    samples = stdout.split("\nsamples:\n", 1)[1]
    assert samples.endswith("\n") and len(samples[:-1].split("\n")) == FINAL_SAMPLES, stdout


@pytest.mark.parametrize("name", COMBO_NAMES)
def test_sample_same_seed_gives_the_same_lines(runs, follow_ups, name):
    first, second = follow_ups[(name, "seed-a")], follow_ups[(name, "seed-b")]
    assert_ok(first)
    assert_ok(second)
    assert len(output_lines(first)) == 5, first.stdout
    assert output_lines(first) == output_lines(second)
    # A model this small may not end any line within 3 tokens; then, and only then, one warning says so.
    assert first.stderr == second.stderr
    if first.stderr:
        assert first.stderr.startswith("warning: no sample reached <eos> within --max-tokens 3")
        assert first.stderr.count("\n") == 1, first.stderr
        assert all(tokens_in(line, runs[name].level) == 3 for line in output_lines(first)), first.stdout


def tokens_in(line: str, level: str) -> int:
    # A sampled <unk> is printed as the five characters "<unk>" but is one token.
    return len(line.replace("<unk>", "?")) if level == "char" else len(line.split())


@pytest.mark.parametrize("name", COMBO_NAMES)
def test_sample_max_tokens_caps_the_length(runs, follow_ups, name):
    result = follow_ups[(name, "seed-a")]
    assert_ok(result)
    lines = output_lines(result)
    assert len(lines) == 5
    for line in lines:
        assert tokens_in(line, runs[name].level) <= 3, lines


@pytest.mark.parametrize("name", PRIME_COMBOS)
def test_sample_prime_starts_every_line(runs, follow_ups, name):
    result = follow_ups[(name, "prime")]
    assert_ok(result)
    prime = PRIME[runs[name].level]
    lines = output_lines(result)
    assert len(lines) == 5
    for line in lines:
        assert line.startswith(prime), lines
        assert tokens_in(line[len(prime):], runs[name].level) <= 200  # the default --max-tokens


@pytest.mark.parametrize("name", COMBO_NAMES)
def test_eval_perplexity_prints_json_independent_of_batch_size(runs, follow_ups, name):
    r = runs[name]
    one, seven = json_output(follow_ups[(name, "eval-1")]), json_output(follow_ups[(name, "eval-7")])
    assert follow_ups[(name, "eval-7")].stderr == ""
    for numbers in (one, seven):
        assert math.isfinite(numbers["loss"]) and numbers["loss"] > 0
        assert numbers["perplexity"] == pytest.approx(math.exp(numbers["loss"]), rel=1e-9)
        assert isinstance(numbers["tokens"], int) and numbers["tokens"] > 0
        if r.level == "char":
            assert numbers["bpc"] == pytest.approx(numbers["loss"] / math.log(2), rel=1e-12)
        else:
            assert "bpc" not in numbers
    assert abs(one["loss"] - seven["loss"]) <= 1e-5
    assert one["tokens"] == seven["tokens"]
    valid_text = load_splits(load_config(r.config_path).data)["valid"]
    assert seven["tokens"] == token_count(valid_text, r.level)
    # best.pt is the lowest validation loss that training logged.
    events = [json.loads(line) for line in (r.out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert seven["loss"] == pytest.approx(min(e["loss"] for e in events if e["split"] == "valid"), abs=1e-5)


@pytest.mark.parametrize("name", TEST_SPLIT_COMBOS)
def test_eval_perplexity_test_split(runs, follow_ups, name):
    result = follow_ups[(name, "eval-test")]
    if runs[name].has_test:
        numbers = json_output(result)
        assert math.isfinite(numbers["loss"]) and numbers["tokens"] > 0
    else:
        assert_user_error(result, "test")


@pytest.mark.parametrize("name", DATA_FILE_COMBOS)
def test_eval_perplexity_on_a_data_file(runs, follow_ups, name):
    result = follow_ups[(name, "eval-data")]
    numbers = json_output(result)
    assert result.stderr == ""  # every token of the file is in the vocabulary
    assert numbers["tokens"] == token_count(runs[name].data_file.read_text(encoding="utf-8"), runs[name].level)
    assert math.isfinite(numbers["loss"])


@pytest.mark.parametrize("name", DATA_FILE_COMBOS)
def test_eval_perplexity_reads_standard_input(runs, follow_ups, name):
    """`--data -` scores the text on standard input as `--data FILE` scores the file."""
    piped = subprocess.run([*LMTRAIN, "eval", "perplexity", "--checkpoint", str(runs[name].out_dir / "best.pt"),
                            "--data", "-", "--json"], input=runs[name].data_file.read_text(encoding="utf-8"),
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert json_output(piped) == json_output(follow_ups[(name, "eval-data")])


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_output_that_cannot_be_written_is_one_line(runs, follow_ups):
    """Standard output on a full disk (`> /dev/full`) is one error line and exit 2, not an internal error."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([*LMTRAIN, "sample", "--checkpoint", str(runs["char-sentences"].out_dir / "best.pt"),
                                 "--num", "2"], stdout=full, stderr=subprocess.PIPE, env=ENV, text=True, timeout=300)
    assert (result.returncode, result.stderr) == (2, "error: cannot write the output: the disk is full\n")


def test_eval_perplexity_counts_unseen_words_and_warns(follow_ups):
    result = follow_ups[("word-sentences", "eval-unseen")]
    numbers = json_output(result)
    assert numbers["tokens"] == 50  # 10 lines of 4 words and an <eos>
    assert math.isfinite(numbers["loss"])
    warning = result.stderr.strip()
    assert warning.startswith("warning:") and len(warning.splitlines()) == 1, result.stderr
    assert "40 of 50" in warning and re.search(r"80(\.0+)?\s?%", warning), warning


# -- user mistakes -----------------------------------------------------------------------------------------

NOT_ROOT = hasattr(os, "geteuid") and os.geteuid() != 0


@dataclasses.dataclass
class Mistakes:
    folder: Path
    results: Started
    before: dict[str, bytes]     # the existing run's files before `train` was run on it again


@pytest.fixture(scope="module")
def mistakes(runs, root, commands) -> Mistakes:
    """Every mistake below, started at once; those that need a trained checkpoint wait for one."""
    folder = root / "mistakes"
    folder.mkdir()
    source = runs["char-stream"]
    config, checkpoint, trained = source.config_path, source.out_dir / "best.pt", source.training
    existing, changed = folder / "existing-run", folder / "changed-run"
    before: dict[str, bytes] = {}

    (folder / "a-directory").mkdir()
    (folder / "bad.yaml").write_text("model:\n  hidden_size: [16\ntrain:\n  max_steps: 3\n", encoding="utf-8")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "newlines.txt").write_bytes(b"\n\n\n\n\n")
    (folder / "latin1.txt").write_bytes("the cat sat\nthé chat\n".encode("latin-1"))  # é at byte 14
    (folder / "notes.txt").write_text("not a checkpoint\n", encoding="utf-8")
    (folder / "a-file").write_text("a regular file\n", encoding="utf-8")
    write_lines(folder / "short.txt", ["the cat sat on"])  # 5 tokens with its <eos>
    short = write_config(folder / "short.yaml", {"data.train": "short.txt", "data.valid": "short.txt",
                                                 "data.level": "word", "train.batch_size": 32,
                                                 "train.max_steps": 3, "train.device": "cpu"})

    def truncate() -> None:
        (folder / "truncated.pt").write_bytes(checkpoint.read_bytes()[:1000])

    def copy_existing() -> None:
        shutil.copytree(source.out_dir, existing)
        before.update({name: (existing / name).read_bytes() for name in ("last.pt", "metrics.jsonl")})

    def copy_changed() -> None:
        shutil.copytree(source.out_dir, changed)

    def train(case: str, *args) -> list:
        return ["train", "--no-progress", *args, f"train.out_dir={folder / ('out-' + case)}"]

    def data(file: str) -> str:
        return f"data.path={folder / file}"

    independent = {
        "missing-config": train("missing-config", folder / "missing.yaml"),
        "config-is-a-directory": train("config-is-a-directory", folder / "a-directory"),
        "invalid-yaml": train("invalid-yaml", folder / "bad.yaml"),
        "unknown-key": train("unknown-key", config, "model.hiden_size=16"),
        "wrong-type": train("wrong-type", config, "model.hidden_size=abc"),
        "zero-size": train("zero-size", config, "model.hidden_size=0"),
        "negative-size": train("negative-size", config, "train.batch_size=-1"),
        "tie-weights": train("tie-weights", config, "model.tie_weights=true", "model.embed_size=16",
                             "model.hidden_size=24"),
        "empty-corpus": train("empty-corpus", config, data("empty.txt")),
        "newlines-corpus": train("newlines-corpus", config, data("newlines.txt")),
        "non-utf8-corpus": train("non-utf8-corpus", config, data("latin1.txt")),
        "missing-corpus": train("missing-corpus", config, data("nowhere.txt")),
        "short-corpus": train("short-corpus", short),
        "sample-missing-checkpoint": ["sample", "--checkpoint", folder / "nowhere.pt"],
        "sample-text-checkpoint": ["sample", "--checkpoint", folder / "notes.txt"],
        "resume-without-run": ["train", "--no-progress", "--resume", config,
                               f"train.out_dir={folder / 'never-trained'}"],
        "out-dir-under-a-file": ["train", "--no-progress", config, f"train.out_dir={folder / 'a-file' / 'run'}"],
        # The bundled configs/quickstart.yaml with overrides; max_seconds and out_dir only bound the
        # damage should max_steps=0 be accepted.
        "default-config-override": ["train", "--no-progress", "train.max_steps=0", "train.max_seconds=1",
                                    f"train.out_dir={folder / 'out-default'}"],
        "default-config-unknown-key": ["train", "--no-progress", "model.hiden_size=8"],
        "debug": ["--debug", "train", "--no-progress", folder / "missing.yaml"],
    }
    if NOT_ROOT:
        read_only = folder / "read-only"
        read_only.mkdir()
        read_only.chmod(0o500)
        independent["out-dir-read-only"] = ["train", "--no-progress", config, f"train.out_dir={read_only / 'run'}"]
    # (args, preparation) of the mistakes that need the trained char-stream run
    after_training = {
        "sample-truncated-checkpoint": (["sample", "--checkpoint", folder / "truncated.pt"], truncate),
        "top-p": (["sample", "--checkpoint", checkpoint, "--top-p", "1.5"], None),
        "temperature": (["sample", "--checkpoint", checkpoint, "--temperature", "-1"], None),
        "top-k": (["sample", "--checkpoint", checkpoint, "--top-k", "0"], None),
        "eval-bogus-split": (["eval", "perplexity", "--checkpoint", checkpoint, "--split", "bogus"], None),
        "existing-run": (["train", "--no-progress", config, f"train.out_dir={existing}"], copy_existing),
        "resume-changed-key": (["train", "--no-progress", "--resume", config, f"train.out_dir={changed}",
                                "model.hidden_size=32"], copy_changed),
    }
    results = Started({case: commands.start(args) for case, args in independent.items()})
    results.update({case: commands.start(args, after=trained, prepare=prepare)
                    for case, (args, prepare) in after_training.items()})
    return Mistakes(folder, results, before)


# case: fragments the one error line must contain
MISTAKES = {
    "missing-config": ["missing.yaml"],
    "config-is-a-directory": ["a-directory", "directory"],
    "invalid-yaml": ["bad.yaml", "YAML"],
    "unknown-key": ["model.hiden_size", "did you mean", "model.hidden_size"],
    "wrong-type": ["model.hidden_size", "abc"],
    "zero-size": ["model.hidden_size"],
    "negative-size": ["train.batch_size"],
    "tie-weights": ["model.tie_weights"],
    "empty-corpus": ["empty.txt"],
    "newlines-corpus": ["newlines.txt"],
    "non-utf8-corpus": ["latin1.txt", "byte offset 14"],
    "missing-corpus": ["nowhere.txt"],
    "short-corpus": ["train.batch_size"],
    "sample-missing-checkpoint": ["nowhere.pt"],
    "sample-text-checkpoint": ["notes.txt", "checkpoint"],
    "sample-truncated-checkpoint": ["truncated.pt", "checkpoint"],
    "top-p": ["--top-p"],
    "temperature": ["--temperature"],
    "top-k": ["--top-k"],
    "eval-bogus-split": ["--split", "bogus"],
    "existing-run": ["--resume"],
    "resume-without-run": ["last.pt"],
    "resume-changed-key": ["model.hidden_size"],
    "out-dir-under-a-file": ["train.out_dir"],
    "out-dir-read-only": ["train.out_dir"],
    "default-config-override": ["train.max_steps"],
    "default-config-unknown-key": ["model.hiden_size"],
}


# case: what the line must not say. A file that is not a checkpoint at all is not "Python objects
# refused for safety": that message belongs to a real pickle of classes.
MISLEADING = {
    "sample-text-checkpoint": ["Python objects", "unpickle"],
    "sample-truncated-checkpoint": ["Python objects", "unpickle"],
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_user_mistake_is_one_error_line(mistakes, case):
    if case == "out-dir-read-only" and not NOT_ROOT:
        pytest.skip("root ignores directory permissions (out-dir-under-a-file covers this for root)")
    line = assert_user_error(mistakes.results[case], *MISTAKES[case])
    for wrong in MISLEADING.get(case, []):
        assert wrong not in line, line


@pytest.mark.parametrize("case", ["existing-run", "resume-without-run", "resume-changed-key", "missing-corpus",
                                  "out-dir-under-a-file"])
def test_a_refused_start_prints_its_error_without_the_config(mistakes, case):
    """Validate, then print: the resolved config appears only once the run can start."""
    assert "# config:" not in mistakes.results[case].stdout and "model:" not in mistakes.results[case].stdout


def test_training_into_an_existing_run_leaves_it_unchanged(mistakes):
    assert_user_error(mistakes.results["existing-run"], "last.pt")
    assert mistakes.before, "test setup: the existing run was not copied"
    for name, content in mistakes.before.items():
        assert (mistakes.folder / "existing-run" / name).read_bytes() == content, f"{name} changed"


@pytest.mark.parametrize("debug", [False, True])
def test_a_library_warning_is_one_line_with_its_source_under_debug(debug: bool, capsys):
    from lmtrain.cli.app import warning_printer

    warning_printer(debug)(UserWarning("a library's warning\nits second line"), UserWarning, "/lib/x.py", 7)
    line = capsys.readouterr().err
    assert line == f"warning: a library's warning{' (/lib/x.py:7)' if debug else ''}\n"


def test_debug_shows_the_traceback(mistakes):
    result = mistakes.results["debug"]
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "error: config file not found" in result.stderr
