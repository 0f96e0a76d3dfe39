"""Several processes training one model (`lmtrain.training.distributed`), proved with two real processes on the
CPU (gloo): they end with identical weights; those equal one process training on the same global batch
(stream mode, and sentences mode with uneven padding, a `bi` model and tied weights); a run stopped and
resumed under `lmtrain train --nproc 2` is bit-identical to one that ran straight through; and an error
in process 0 alone ends every process with one line.

The pure parts first; then the processes, started once (`runs`) for the tests that compare them.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from corpus_helpers import sentences, write_lines
from typer.testing import CliRunner

from lmtrain.checkpoint import load_model
from lmtrain.cli import app
from lmtrain.config import load_config
from lmtrain.data.dataset import IGNORE, shard_batch, shard_rows
from lmtrain.data.tokenizer import ZERO_INPUT
from lmtrain.errors import LmtrainError
from lmtrain.training import distributed
from lmtrain.training.distributed import (
    GROUP_ENDS_WITH_TRAINING,
    World,
    check_batch_size,
    end_process,
    stop_everywhere,
    world_from_environment,
)
from lmtrain.training.trainer import train

# Real processes, builds or whole training runs: `pytest -m "not slow"` leaves this file out.
pytestmark = pytest.mark.slow

STEPS = 10
HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
if Path("/sys/class/net/lo").exists():  # gloo on the loopback interface: a CI box's hostname may resolve nowhere
    ENV.setdefault("GLOO_SOCKET_IFNAME", "lo")
# Settings that make a difference visible: clipping that binds (the norms are about 0.2, and every
# process must clip by the global one), an evaluation split between the processes, a checkpoint
# mid-way. Dropout stays 0: each process draws masks for its own rows, which one process cannot repeat.
COMMON = {"data.level": "char", "model.embed_size": 16, "model.hidden_size": 16, "model.num_layers": 1,
          "train.bptt": 16, "train.max_steps": STEPS, "train.clip": 0.1, "train.eval_every": 5,
          "train.checkpoint_every": 4, "train.log_every": 2, "train.final_samples": 0, "train.device": "cpu"}
CONFIGS = {
    "stream": {"data.mode": "stream", "model.cell": "lstm", "train.batch_size": 8},
    # 3 lines a process, of different lengths: their padding differs. 43 lines, 6 a batch: one batch
    # of each epoch holds 1 line, and one process trains on padding alone; step 10 is in epoch 2.
    "sentences": {"data.mode": "sentences", "model.cell": "gru", "model.direction": "bi", "model.tie_weights": True,
                  "train.bptt": 64, "train.batch_size": 6,
                  "train.optimizer": "sgd", "train.lr": 0.5, "train.momentum": 0.9},
}

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this torch build")


# -- the pure parts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, world_size", [(8, 2), (6, 2), (4, 3), (1, 2), (7, 4)])
def test_shard_rows_give_every_row_to_one_process_in_order(rows, world_size):
    shares = [range(rows)[shard_rows(rows, rank=rank, world_size=world_size)] for rank in range(world_size)]
    assert [row for share in shares for row in share] == list(range(rows))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_shard_batch_leaves_out_shared_padding_and_never_returns_nothing():
    inputs = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0], [5, 0, 0, 0]])
    targets = torch.tensor([[6, 7, 8, 1], [6, 1, IGNORE, IGNORE], [1, IGNORE, IGNORE, IGNORE]])
    first, second = (shard_batch((inputs, targets), rank=rank, world_size=2) for rank in (0, 1))
    assert torch.equal(first[1], targets[:1])
    assert torch.equal(second[0], inputs[1:, :2]) and torch.equal(second[1], targets[1:, :2])
    empty_inputs, empty_targets = shard_batch((inputs[:1], targets[:1]), rank=0, world_size=2)
    assert empty_inputs.tolist() == [[ZERO_INPUT]] and empty_targets.tolist() == [[IGNORE]]


def test_world_comes_from_torchruns_variables():
    assert world_from_environment({}) == World()
    world = world_from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (world.rank, world.size, world.local_rank, world.local_size, world.is_main) == (3, 4, 1, 2, False)
    with pytest.raises(LmtrainError, match="RANK 2 and WORLD_SIZE 2 do not fit"):
        world_from_environment({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(LmtrainError, match="WORLD_SIZE must be an integer; got 'two'"):
        world_from_environment({"WORLD_SIZE": "two"})


@pytest.mark.parametrize("rank", [0, 1])
def test_process_zero_prints_a_shared_error_before_any_process_can_exit(monkeypatch, capsys, rank):
    """The launcher stops every process once one has exited, so the line must be out before the others
    pass the barrier: process 0 prints, then all meet, then all raise it quietly."""
    events = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: events.append(("barrier", capsys.readouterr().err)))
    error = stop_everywhere(LmtrainError("the run folder holds a run"), World(rank=rank, size=2))
    printed = "error: the run folder holds a run\n" if rank == 0 else ""
    assert events == [("barrier", printed)] and error.quiet
    assert capsys.readouterr().err == ""


def test_a_shared_error_before_the_process_group_is_printed_by_process_zero_alone(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert not stop_everywhere(LmtrainError("x"), World(rank=0, size=2)).quiet
    assert stop_everywhere(LmtrainError("x"), World(rank=1, size=2)).quiet
    assert not stop_everywhere(LmtrainError("x"), World()).quiet


class LeftWithoutShutdown(Exception):
    pass


class HeldBack(io.StringIO):
    """An output stream whose text is out only once flushed, as a pipe's is."""
    out = ""

    def flush(self) -> None:
        self.out = self.getvalue()


@pytest.mark.parametrize("environment, group_ends_with_training, skips_the_shutdown", [
    ({"RANK": "1", "WORLD_SIZE": "2"}, False, True),   # torch before 2.8: the group is freed at the shutdown
    ({"RANK": "1", "WORLD_SIZE": "2"}, True, False),   # its threads already ended with train()
    ({}, False, False),                                # one process alone holds no group
    ({"WORLD_SIZE": "two"}, False, False),             # refused before any group was made
])
def test_a_training_process_skips_the_interpreters_shutdown_only_when_its_group_outlives_training(
        monkeypatch, environment, group_ends_with_training, skips_the_shutdown):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "GROUP_ENDS_WITH_TRAINING", group_ends_with_training)
    stdout, stderr = HeldBack(), HeldBack()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)

    def leave(code: int) -> None:  # os._exit: what is not flushed by now is lost
        raise LeftWithoutShutdown(code, stdout.out, stderr.out)

    monkeypatch.setattr(distributed.os, "_exit", leave)
    stdout.write("done: 10 steps\n")
    stderr.write("warning: a word\n")
    with pytest.raises(LeftWithoutShutdown if skips_the_shutdown else SystemExit) as ended:
        end_process(3)
    if skips_the_shutdown:
        assert ended.value.args == (3, "done: 10 steps\n", "warning: a word\n")
    else:
        assert ended.value.code == 3


def test_batch_size_is_global_and_must_divide(tmp_path):
    check_batch_size(8, World(size=2))
    with pytest.raises(LmtrainError, match="train.batch_size 6 is not divisible by the number of processes .4."):
        check_batch_size(6, World(size=4))
    corpus = write_corpus(tmp_path)
    result = CliRunner().invoke(app, ["train", str(write_config(tmp_path, "stream", corpus, tmp_path / "run")),
                                      "train.batch_size=7", "--nproc", "2"])
    assert result.exit_code == 2 and "train.batch_size 7 is not divisible" in result.output
    assert not (tmp_path / "run").exists()  # refused before any process started


# -- two processes ---------------------------------------------------------------------------------------

def write_corpus(folder: Path) -> dict[str, Path]:
    lines = sentences(50, seed=5)
    return {"train": write_lines(folder / "train.txt", lines[:43]),
            "valid": write_lines(folder / "valid.txt", lines[43:])}


def write_config(folder: Path, name: str, corpus: dict[str, Path], out_dir: Path, *, stem: str | None = None,
                 **values: object) -> Path:
    """CONFIGS[name] as a YAML file `<stem or name>.yaml`; `values` are more dotted keys, '.' written '__'."""
    values = {**COMMON, **CONFIGS[name], "data.train": str(corpus["train"]), "data.valid": str(corpus["valid"]),
              "train.out_dir": str(out_dir), **{key.replace("__", "."): value for key, value in values.items()}}
    tree: dict = {}
    for key, value in values.items():
        section, _, field = key.partition(".")
        tree.setdefault(section, {})[field] = value
    path = folder / f"{stem or name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_two_processes(folder: Path, configs: list[Path]) -> list[subprocess.Popen]:
    """Two processes with the variables torchrun sets, each training every config in turn."""
    ports = ",".join(str(free_port()) for _ in configs)
    place = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORTS": ports}
    return [subprocess.Popen([sys.executable, str(HERE / "distributed_worker.py"), str(folder), *map(str, configs)],
                             env={**ENV, **place, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """`<name>-ddp/` and `<name>-rank{0,1}.pt`: two processes; `<name>-single/`: one, in this process;
    `stream-resumed/`: two processes stopped half-way, for the resume test to continue."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    folder = tmp_path_factory.mktemp("distributed")
    corpus = write_corpus(folder)
    configs = [write_config(folder, name, corpus, folder / f"{name}-ddp") for name in CONFIGS]
    half = write_config(folder, "stream", corpus, folder / "stream-resumed", stem="stream-half",
                        train__max_steps=STEPS // 2)
    processes = start_two_processes(folder, [*configs, half])
    for name, config in zip(CONFIGS, configs):  # meanwhile, the single-process references
        train(load_config(config, [f"train.out_dir={folder / f'{name}-single'}"]), progress_bar=False)
    try:
        with ThreadPoolExecutor(2) as pool:
            outputs = list(pool.map(lambda process: process.communicate(timeout=300), processes))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
    return folder


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@needs_gloo
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_processes_end_with_identical_weights(runs, name):
    first, second = load(runs / f"{name}-rank0.pt"), load(runs / f"{name}-rank1.pt")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    checkpoint = load(runs / f"{name}-ddp" / "last.pt")["model"]  # the unwrapped model: no "module." prefix
    assert checkpoint.keys() == first.keys() and all(torch.equal(checkpoint[key], first[key]) for key in first)


@needs_gloo
@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_equal_one_on_the_same_global_batch(runs, name):
    ddp, single = load(runs / f"{name}-ddp" / "last.pt"), load(runs / f"{name}-single" / "last.pt")
    if name == "sentences":  # bptt 64 keeps every line whole: one batch an epoch holds a single line
        assert len((runs / "train.txt").read_text().splitlines()) % CONFIGS[name]["train.batch_size"] == 1
    assert ddp["progress"]["step"] == single["progress"]["step"] == STEPS
    assert ddp["progress"]["tokens"] == single["progress"]["tokens"]
    for key, tensor in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], tensor, rtol=0, atol=1e-5, msg=key)
    # Evaluation is split between the processes and summed: the same loss.
    assert ddp["progress"]["best_valid_loss"] == pytest.approx(single["progress"]["best_valid_loss"], rel=1e-6)
    for ddp_layer, single_layer in zip(*(payload["stream_states"][0] or [] for payload in (ddp, single))):
        for ddp_state, single_state in zip(ddp_layer, single_layer):  # gathered to the global batch's rows
            torch.testing.assert_close(ddp_state, single_state, rtol=0, atol=1e-5)
    model, _, _ = load_model(runs / f"{name}-ddp" / "best.pt")  # one process loads what two wrote
    assert sum(parameter.numel() for parameter in model.parameters()) > 0


def lmtrain(*args: object, env: dict[str, str] = ENV) -> subprocess.CompletedProcess:
    """`lmtrain train ARGS`; if it hangs, its whole process group (the launcher's workers too) is killed."""
    command = [sys.executable, "-m", "lmtrain", "train", *map(str, args), "--no-progress"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@needs_gloo
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="thread names are read from /proc")
@pytest.mark.skipif(not GROUP_ENDS_WITH_TRAINING, reason="before torch 2.8 the group is kept to the end")
def test_no_thread_of_the_process_group_outlives_a_training(runs):
    """A gloo thread still alive when the interpreter shuts down can abort the process as it frees a
    collective's tensor (lmtrain.training.distributed.process_group): the group and its threads end
    with `train()`, DDP model and all."""
    for name in CONFIGS:
        for rank in (0, 1):
            threads = (runs / f"{name}-rank{rank}.threads").read_text().split()
            assert threads and not [thread for thread in threads if "gloo" in thread], (name, rank, threads)


@needs_gloo
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="threads are counted in /proc")
@pytest.mark.skipif(GROUP_ENDS_WITH_TRAINING, reason="from torch 2.8 the group ends with training")
def test_before_torch_2_8_no_process_group_is_freed_while_the_process_runs(runs):
    """Before torch 2.8, freeing a group can deadlock on a gloo thread that waits for the GIL to free a
    collective's tensor (lmtrain.training.distributed.process_group): each training's group, and its
    threads, stay after `train()` and a garbage collection, so every training adds threads to the
    process (gloo's are not named there: they are counted)."""
    for rank in (0, 1):
        counts = [len((runs / f"{stem}-rank{rank}.threads-collected").read_text().split())
                  for stem in (*CONFIGS, "stream-half")]
        assert counts[0] < counts[1] < counts[2], (rank, counts)


@needs_gloo
def test_stop_and_resume_under_nproc_equals_straight_through(runs):
    out_dir = runs / "stream-resumed"  # two processes trained it for STEPS // 2 steps
    second = lmtrain(runs / "stream.yaml", f"train.out_dir={out_dir}", "--resume", "--nproc", "2")
    assert second.returncode == 0, second.stderr
    assert f"resuming {out_dir / 'last.pt'} at step {STEPS // 2}" in second.stdout
    assert second.stdout.count("done:") == 1  # process 0 speaks for both
    straight, resumed = load(runs / "stream-ddp" / "last.pt"), load(out_dir / "last.pt")
    for key, tensor in straight["model"].items():
        assert torch.equal(resumed["model"][key], tensor), key
    for index, state in straight["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed["optimizer"]["state"][index][key]))


@needs_gloo
def test_an_error_in_process_zero_alone_stops_both_with_one_line(runs):
    # Only process 0 looks at the run folder; it already holds a run, and the other process must not wait.
    # A warning of the config's is said once too, not by the launcher and each process.
    result = lmtrain(runs / "stream.yaml", "--nproc", "2", "train.decay_every=7",
                     env={**ENV, "PYTHONWARNINGS": "ignore,default::UserWarning"})  # not the libraries' others
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "warning: train.decay_every is unused with schedule: constant",
        f"error: {runs / 'stream-ddp'} already holds a run (last.pt): add --resume to continue it, "
        f"or choose another train.out_dir"]


@pytest.mark.parametrize("started_by_nproc", [True, False])
def test_only_processes_that_nproc_started_end_with_their_launcher(monkeypatch, started_by_nproc):
    """A process that a script, a shell or torchrun started need not end with its parent (a shell that
    exits after `nohup ... &`): only `--nproc`'s processes ask for SIGTERM at their launcher's end."""
    asked = []

    class Libc:
        def prctl(self, *arguments):
            asked.append(arguments)

    monkeypatch.setattr(distributed.ctypes, "CDLL", lambda *args, **kwargs: Libc())
    monkeypatch.setattr(distributed.sys, "platform", "linux")
    if started_by_nproc:
        monkeypatch.setenv(distributed.STARTED_BY_NPROC, "1")
    else:
        monkeypatch.delenv(distributed.STARTED_BY_NPROC, raising=False)
    distributed.stop_with_launcher()
    assert asked == ([(distributed.PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)] if started_by_nproc else [])


def processes_naming(folder: Path) -> list[int]:
    """The processes whose command line names `folder` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdecimal() and str(folder).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


@needs_gloo
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists() or not sys.platform.startswith("linux"),
                    reason="the launcher's end is signalled by Linux's prctl; the processes are found in /proc")
def test_a_killed_launcher_stops_its_processes_which_save_and_resume(runs, tmp_path):
    """SIGKILL of `lmtrain train --nproc 2` leaves the launcher no time to stop its processes: the system
    sends them SIGTERM, so they finish the step, write last.pt and end, and the run resumes; they trained
    on alone, holding the run folder."""
    out_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "lmtrain", "train", str(runs / "stream.yaml"), f"train.out_dir={out_dir}",
               "train.max_steps=1000000", "train.eval_every=1000000", "--nproc", "2", "--no-progress"]
    launcher = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while '"train"' not in ((out_dir / "metrics.jsonl").read_text() if (out_dir / "metrics.jsonl").exists()
                                else ""):
            assert time.monotonic() < deadline and launcher.poll() is None, "the run did not start training"
            time.sleep(0.2)
        launcher.kill()
        launcher.wait()
        while processes_naming(out_dir):  # the workers (torchrun starts them in sessions of their own)
            assert time.monotonic() < deadline, "the training processes outlived their launcher by two minutes"
            time.sleep(0.2)
    finally:
        for pid in [launcher.pid, *processes_naming(out_dir)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    step = load(out_dir / "last.pt")["progress"]["step"]
    resumed = lmtrain(runs / "stream.yaml", f"train.out_dir={out_dir}", f"train.max_steps={step + 2}", "--resume",
                      "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out_dir / 'last.pt'} at step {step:,}" in resumed.stdout


def test_more_processes_than_cores_on_the_cpu_is_refused():
    from lmtrain.training.distributed import launch

    cores = len(os.sched_getaffinity(0))
    with pytest.raises(LmtrainError, match=rf"--nproc {cores + 1} is more processes than the {cores} cores"):
        launch(cores + 1, ["config.yaml"], batch_size=64 * (cores + 1), on_cpu=True)
