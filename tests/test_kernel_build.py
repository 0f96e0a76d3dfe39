"""lmtrain.speed.kernel_build, with real processes: a build killed at any moment (SIGKILL, SIGHUP) never blocks
the next one; a process waiting for another's build says so and gives up after its bound; two sources
built at once into one cache never load each other's library; a failed build is recorded; an unwritable
cache falls back to a private folder; torch's log lines stay off the terminal.

Most tests build tests/tiny_extension.cpp (no torch headers: well under a second) through
tests/build_worker.py; a compiler wrapper (`slow_compiler`) stops inside the build at a chosen moment so
that a signal lands there. The last tests run the real kernels through `lmtrain train`."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_kernels import as_a_user

from lmtrain.speed import kernel_build, kernel_cache, kernels

HERE = Path(__file__).parent
WORKER = HERE / "build_worker.py"
SOURCE = HERE / "tiny_extension.cpp"

# Real builds and real processes killed while building: `pytest -m "not slow"` leaves this file out.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("c++") is None or shutil.which("ninja") is None and not
                                 (Path(sys.executable).parent / "ninja").exists(),
                                 reason="needs a C++ compiler and ninja")]


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A process's environment with a temporary folder of its own: the private fallback cache under it
    holds no build another lmtrain left (Python passes over a TMPDIR that is not there, for /tmp)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # ninja from the venv
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "PATH": path, "TMPDIR": str(tmp_path / "tmp"), "PYTHONWARNINGS": "ignore", **extra}


def start(root: Path, answer: int, tmp_path: Path, *, wait: float = 60, **extra: str) -> subprocess.Popen:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, str(WORKER), str(root), str(answer), str(wait)],
                            env=environment(tmp_path, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return out.strip(), err


def slow_compiler(tmp_path: Path, moment: str, seconds: float = 30) -> Path:
    """A c++ that, while the file `slow` exists, writes `<moment>.reached` and then sleeps `seconds`:
    `compile` stops before compiling the object, `link` before linking it, `linked` after linking (the
    library made, not yet published). The same compiler (so the same build) is fast once `slow` is gone."""
    script = tmp_path / f"slow-c++-{moment}"
    marker, flag = tmp_path / f"{moment}.reached", tmp_path / "slow"
    flag.touch()
    pause = f"if [ -e {flag} ]; then touch {marker}; sleep {seconds}; fi"
    if moment == "compile":
        body = f'case " $* " in *" -c "*) {pause} ;; esac\nexec c++ "$@"\n'
    elif moment == "link":
        body = f'case " $* " in *" -shared "*) {pause} ;; esac\nexec c++ "$@"\n'
    else:
        body = f'c++ "$@" || exit $?\ncase " $* " in *" -shared "*) {pause} ;; esac\n'
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return script


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path.name} never reached"
        time.sleep(0.02)


def signal_builder(process: subprocess.Popen, number: int) -> None:
    """The signal to the building process alone (as a closed terminal or the OOM killer would): its
    compiler, still running, is left behind like a real orphan (`end_group` ends it)."""
    process.send_signal(number)
    process.wait(timeout=30)


def end_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("number", [signal.SIGKILL, signal.SIGHUP], ids=["SIGKILL", "SIGHUP"])
@pytest.mark.parametrize("moment", ["compile", "link", "linked"])
def test_a_build_killed_at_any_moment_does_not_block_the_next(tmp_path, moment, number):
    root, compiler = tmp_path / "cache", str(slow_compiler(tmp_path, moment))
    victim = start(root, 1, tmp_path, CXX=compiler)
    try:
        wait_for(tmp_path / f"{moment}.reached", victim)
        signal_builder(victim, number)
        assert list(root.glob(".building-*")), "the killed build left its private folder, as a real one would"
        assert not list(root.glob("tiny_*/*.so")), "nothing half-built is published"
        (tmp_path / "slow").unlink()
        began = time.monotonic()
        out, err = finish(start(root, 1, tmp_path, CXX=compiler), timeout=60)  # the orphan still sleeps
        assert out == "answer 1"
        assert "waiting" not in err and time.monotonic() - began < 20
        assert not list(root.glob(".building-*")), "the abandoned build folder was cleaned up"
        assert len(list(root.glob("tiny_*/*.so"))) == 1
    finally:
        end_group(victim)


def test_a_waiting_process_says_so_and_gives_up_after_its_bound(tmp_path):
    root = tmp_path / "cache"
    spec = kernel_build.Spec("tiny", (SOURCE,), cflags=("-DANSWER=3",))
    root.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(kernel_build.Paths(root, spec).lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid %d on a test' % os.getpid())\n"
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        began = time.monotonic()
        out, err = finish(start(root, 3, tmp_path, wait=1.5))
        assert 1.5 <= time.monotonic() - began < 20
        assert err.splitlines() == [f"lmtrain: waiting for another process (pid {holder.pid} on a test) to finish "
                                    "compiling the kernels (at most 1.5 s)"]
        assert out == f"unavailable: another process (pid {holder.pid} on a test) has been compiling the kernels " \
                      f"for over 1.5 s"
        waiting = start(root, 3, tmp_path, wait=60)
        assert "waiting for another process" in waiting.stderr.readline()
        holder.kill()  # the holder dies: the waiting process takes the lock at once and builds
        out, err = finish(waiting, timeout=60)
        assert out == "answer 3" and err.startswith("lmtrain: compiling")
    finally:
        holder.kill()
        holder.wait()


def test_two_sources_built_at_once_never_load_each_others_library(tmp_path):
    """Two versions (different -DANSWER: different digests) and two processes of one version, all at
    once in one cache: each process gets its own version's library; one version is compiled once."""
    root = tmp_path / "cache"
    slow = str(slow_compiler(tmp_path, "compile", seconds=2))
    processes = [start(root, answer, tmp_path, CXX=slow) for answer in (1, 2, 1, 2)]
    try:
        results = [finish(process, timeout=120)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert results == ["answer 1", "answer 2", "answer 1", "answer 2"]
    published = sorted(root.glob("tiny_*/*.so"))
    assert len(published) == 2
    records = [json.loads((library.parent / kernel_build.RECORD).read_text()) for library in published]
    assert sorted(record["cflags"] for record in records) == [["-DANSWER=1"], ["-DANSWER=2"]]


def test_the_digest_follows_sources_flags_and_versions(tmp_path, monkeypatch):
    source = tmp_path / "a.cpp"
    source.write_text("int x;\n")
    base = kernel_build.Spec("k", (source,), cflags=("-O3",))
    assert base.digest == kernel_build.Spec("k", (source,), cflags=("-O3",)).digest
    assert base.digest != kernel_build.Spec("k", (source,), cflags=("-O2",)).digest
    monkeypatch.setattr(kernel_build.lmtrain, "__version__", "9.9.9")
    assert base.digest != kernel_build.Spec("k", (source,), cflags=("-O3",)).digest
    monkeypatch.undo()
    source.write_text("int y;\n")
    assert base.digest != kernel_build.Spec("k", (source,), cflags=("-O3",)).digest


def test_a_failed_build_is_recorded_not_retried_and_retried_on_request(tmp_path):
    root = tmp_path / "cache"
    broken = kernel_build.Spec("tiny", (SOURCE,), cflags=("-DANSWER=(",))
    lines = []
    module, reason = kernel_build.obtain(broken, announce=lines.append, wait_seconds=5, root=root)
    assert module is None and reason.startswith("build failed: ") and "error" in reason
    log = kernel_build.Paths(root, broken).failure
    assert reason.endswith(f"(log: {log})") and "ANSWER" in log.read_text()
    began = time.monotonic()
    module, again = kernel_build.obtain(broken, announce=lines.append, wait_seconds=5, root=root)
    assert module is None and again.startswith("the build failed earlier: ") and time.monotonic() - began < 0.5
    assert "`lmtrain kernels build` tries again" in again
    assert len(lines) == 1  # one "compiling" line: the second call did not compile
    module, reason = kernel_build.obtain(broken, announce=lines.append, wait_seconds=5, root=root, retry_failed=True)
    assert module is None and len(lines) == 2


def test_a_published_build_loads_without_the_lock_or_any_write(tmp_path, monkeypatch):
    """A read-only image with the kernels built ahead of time (`lmtrain kernels build`)."""
    root = tmp_path / "cache"
    spec = kernel_build.Spec("tiny", (SOURCE,), cflags=("-DANSWER=5",))
    assert kernel_build.obtain(spec, announce=print, wait_seconds=5, root=root)[0].answer() == 5
    before = sorted(root.rglob("*"))
    monkeypatch.setattr(kernel_build, "_writable", lambda *a: pytest.fail("probed for writing"))
    monkeypatch.setattr(kernel_build, "_exclusive", lambda *a, **k: pytest.fail("took the lock"))
    assert kernel_build.obtain(spec, announce=print, wait_seconds=5, root=root)[0].answer() == 5
    assert sorted(root.rglob("*")) == before


def test_an_unwritable_cache_builds_in_a_private_folder_with_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(blocker / "extensions"))  # cannot be created
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(kernel_build.tempfile, "tempdir", None)  # TMPDIR is read again
    spec = kernel_build.Spec("tiny", (SOURCE,), cflags=("-DANSWER=6",))
    lines = []
    module, reason = kernel_build.obtain(spec, announce=lines.append, wait_seconds=5)
    assert module.answer() == 6 and reason is None
    private = tmp_path / f"lmtrain-kernels-{os.getuid()}"
    assert lines[0] == (f"lmtrain: the kernel cache {blocker / 'extensions' / 'lmtrain'} is not writable (Not a "
                        f"directory); compiling into {private}")
    assert len(lines) == 2 and (private / spec.module).is_dir() and private.stat().st_mode & 0o777 == 0o700
    # The next process finds it there, without a word.
    assert kernel_build.obtain(spec, announce=lines.append, wait_seconds=5)[0].answer() == 6 and len(lines) == 2


def test_an_unreadable_cache_builds_in_a_private_folder_with_one_line(tmp_path):
    """A build another user published with mode 700, as this user sees it: passed over, as an unwritable
    cache is, not an error."""
    cache = tmp_path / "extensions" / "lmtrain"
    spec = kernel_build.Spec("tiny", (SOURCE,), cflags=("-DANSWER=12",))
    shut = cache / spec.module
    shut.mkdir(parents=True)
    shut.chmod(0)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    script = ("import sys\nfrom pathlib import Path\nfrom lmtrain.speed import kernel_build\n"
              f"spec = kernel_build.Spec('tiny', (Path({str(SOURCE)!r}),), cflags=('-DANSWER=12',))\n"
              "module, reason = kernel_build.obtain(spec, announce=lambda line: print(line, file=sys.stderr), "
              "wait_seconds=5)\n"
              "print(module.answer() if module else reason)")
    try:
        result = subprocess.run(as_a_user([sys.executable, "-c", script]), capture_output=True, text=True,
                                env=environment(tmp_path, TORCH_EXTENSIONS_DIR=str(cache.parent)), timeout=120)
    finally:
        shut.chmod(0o755)
    private = tmp_path / "tmp" / f"lmtrain-kernels-{os.getuid()}"
    assert result.returncode == 0 and result.stdout == "12\n", result.stderr
    assert result.stderr.splitlines()[0] == (f"lmtrain: the kernel cache {cache} is not readable (Permission "
                                             f"denied); compiling into {private}")
    assert (private / spec.module).is_dir()


@pytest.mark.parametrize("umask, answer", [(0o022, 11), (0o027, 13)])  # one process loads one module per name
def test_a_published_build_is_made_as_mkdir_makes_a_folder(tmp_path, umask, answer):
    """Readable by every user (less the umask): an image built as root is run as another user."""
    root = tmp_path / "cache"
    spec = kernel_build.Spec("tiny", (SOURCE,), cflags=(f"-DANSWER={answer}",))
    previous = os.umask(umask)
    try:
        module, reason = kernel_build.obtain(spec, announce=print, wait_seconds=5, root=root)
    finally:
        os.umask(previous)
    assert module.answer() == answer, reason
    assert kernel_build.Paths(root, spec).folder.stat().st_mode & 0o777 == 0o755 & ~umask


def only_the_private_folder(tmp_path: Path, monkeypatch) -> Path:
    """A cache folder that cannot be made (under a file), and the private fallback's path under tmp_path."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(blocker / "extensions"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(kernel_build.tempfile, "tempdir", None)  # TMPDIR is read again
    return tmp_path / f"lmtrain-kernels-{os.getuid()}"


def test_a_private_folder_that_others_can_write_is_not_used(tmp_path, monkeypatch):
    private = only_the_private_folder(tmp_path, monkeypatch)
    private.mkdir()
    private.chmod(0o777)  # anyone could plant a library here
    spec = kernel_build.Spec("tiny", (SOURCE,), cflags=("-DANSWER=8",))
    module, reason = kernel_build.obtain(spec, announce=print, wait_seconds=5)
    assert module is None and reason.startswith("no folder to compile into: ")
    assert "owned or writable by another user" in reason and not list(private.iterdir())


def test_a_library_in_a_private_folder_others_can_write_is_not_loaded(tmp_path, monkeypatch):
    """Another user could have planted it: loading it would run their code as this user."""
    spec = kernel_build.Spec("tiny", (SOURCE,), cflags=("-DANSWER=14",))
    built = kernel_build.Paths(tmp_path / "elsewhere", spec)
    assert kernel_build.obtain(spec, announce=print, wait_seconds=5, root=built.root)[0].answer() == 14
    private = only_the_private_folder(tmp_path, monkeypatch)
    shutil.copytree(built.folder, private / spec.module)
    private.chmod(0o777)
    monkeypatch.setattr(kernel_build, "_import", lambda paths: pytest.fail(f"loaded {paths.library}"))
    module, reason = kernel_build.obtain(spec, announce=print, wait_seconds=5)
    assert module is None and "owned or writable by another user" in reason


def test_torch_log_lines_go_to_the_build_log_not_the_terminal(tmp_path, monkeypatch, capfd):
    """The CUDA build of torch logs "No CUDA runtime is found, using CUDA_HOME=..." when its extension
    loader is imported on a machine with a CUDA toolkit and no GPU; such lines must not reach stderr."""
    import logging

    from torch.utils import cpp_extension

    real_load = cpp_extension.load

    def noisy_load(*args, **kwargs):
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/x'")
        import warnings
        warnings.warn("a compiler warning")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(cpp_extension, "load", noisy_load)
    spec = kernel_build.Spec("tiny", (SOURCE,), cflags=("-DANSWER=9",))
    lines = []
    assert kernel_build.obtain(spec, announce=lines.append, wait_seconds=5, root=tmp_path)[0].answer() == 9
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    record = json.loads((kernel_build.Paths(tmp_path, spec).folder / kernel_build.RECORD).read_text())
    assert any("No CUDA runtime" in line for line in record["log"])
    assert any("a compiler warning" in line for line in record["log"])


def test_a_holder_that_wrote_nothing_is_named_once(tmp_path):
    lock = tmp_path / "tiny.lock"
    held = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # a second open file of the same lock conflicts, in this process too
    waiting = os.open(lock, os.O_RDWR)
    try:
        lines = []
        assert kernel_build._acquire(waiting, wait_seconds=0.3, announce=lines.append) == "another process"
        assert lines == ["lmtrain: waiting for another process to finish compiling the kernels (at most 0.3 s)"]
    finally:
        os.close(waiting)
        os.close(held)


def test_status_and_clear_show_and_remove_every_build(tmp_path):
    root = tmp_path / "cache"
    for answer in (1, 2):
        spec = kernel_build.Spec("tiny", (SOURCE,), cflags=(f"-DANSWER={answer}",))
        kernel_build.obtain(spec, announce=print, wait_seconds=5, root=root)
    kernel_build.obtain(kernel_build.Spec("tiny", (SOURCE,), cflags=("-DANSWER=(",)), announce=print,
                        wait_seconds=5, root=root)
    (root / f"{kernel_build.BUILDING}tiny_0123456789abcdef-xyz").mkdir()
    states = sorted(build["state"] for build in kernel_cache.builds(root))
    assert states == ["abandoned", "built", "built", "failed"]
    cleared = kernel_cache.clear(root)
    assert len(cleared.removed) == 4 and cleared.kept == [] and cleared.failed == {} and list(root.iterdir()) == []


# -- the real kernels, through the CLI -------------------------------------------------------------

def tiny_run(tmp_path: Path) -> tuple[Path, list[str]]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\nthe dog ran\n" * 40, encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(f"data: {{path: {corpus}, level: char, cache: false}}\n"
                      "model: {cell: lstm, embed_size: 8, hidden_size: 16, num_layers: 1}\n"
                      "train: {batch_size: 4, bptt: 8, max_steps: 3, eval_every: 3, final_samples: 0, device: cpu}\n")
    return config, [sys.executable, "-m", "lmtrain", "train", str(config), "--no-progress"]


def test_a_training_killed_while_compiling_the_kernels_does_not_wedge_the_next(tmp_path):
    """The reproduction: `lmtrain train` killed while it prints "compiling the kernels", then `lmtrain
    train` again, on a cold cache: the second one compiles and trains, and says nothing of waiting."""
    config, command = tiny_run(tmp_path)
    env = environment(tmp_path, TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"), LMTRAIN_COMPILED="1")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    victim = subprocess.Popen([*command, f"train.out_dir={tmp_path / 'killed'}"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert "compiling the kernels" in victim.stderr.readline()
        time.sleep(2)  # mid-compile
        signal_builder(victim, signal.SIGKILL)
    finally:
        end_group(victim)  # its compiler too, which would only slow the second build down
    second = subprocess.run([*command, f"train.out_dir={tmp_path / 'second'}"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stderr.splitlines() == ["lmtrain: compiling the kernels for this machine (once, under a minute): "
                                          "kernels.cpp"]
    assert (tmp_path / "second" / "last.pt").exists()


def test_without_a_compiler_training_runs_the_python_code_with_one_line(tmp_path):
    config, command = tiny_run(tmp_path)
    no_tools = tmp_path / "empty-bin"
    no_tools.mkdir()
    env = {**environment(tmp_path, TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions")), "PATH": str(no_tools)}
    env.pop("LMTRAIN_COMPILED", None)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    result = subprocess.run([*command, f"train.out_dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["lmtrain: the compiled kernels are not available (no C++ compiler (c++) on "
                                          "PATH); using the Python code (same results, slower). LMTRAIN_COMPILED=0 "
                                          "silences this."]


def test_kernels_status_build_and_clear_commands(tmp_path):
    env = environment(tmp_path, TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    env.pop("LMTRAIN_COMPILED", None)
    lmtrain = [sys.executable, "-m", "lmtrain", "kernels"]
    status = subprocess.run([*lmtrain, "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and json.loads(status.stdout)["state"].startswith("not built")
    assert json.loads(status.stdout)["bfloat16_products"] is None
    # A build in the private fallback, as a run leaves where the cache folder was read-only once, does not
    # keep `kernels build` from building into the cache folder, where an image's build must be.
    fallback = tmp_path / "tmp" / f"lmtrain-kernels-{os.getuid()}" / kernels.spec().module
    fallback.parent.mkdir(mode=0o700)
    fallback.mkdir()
    (fallback / f"{fallback.name}.so").write_bytes(b"")
    built = subprocess.run([*lmtrain, "build"], env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    folder = Path(built.stdout.strip())
    assert folder.parent == tmp_path / "extensions" / "lmtrain" and folder.name == kernels.spec().module
    status = subprocess.run([*lmtrain, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert status.stdout.splitlines()[:3] == ["kernels: built", f"this lmtrain's build: {folder.name}",
                                              f"folder: {folder}"]
    facts = json.loads(subprocess.run([*lmtrain, "status", "--json"], env=env, capture_output=True, text=True,
                                      timeout=60).stdout)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # the build asks the CPU itself; Linux lists the same instructions as flags
        assert facts["bfloat16_products"] == ("avx512_bf16" in cpuinfo.read_text().split())
    assert f"train.precision bfloat16: {kernels.BFLOAT16_LINES[facts['bfloat16_products']]}" in status.stdout
    again = subprocess.run([*lmtrain, "build"], env=env, capture_output=True, text=True, timeout=60)
    assert again.stdout.strip() == str(folder) and again.stderr == ""  # already built: nothing compiled
    cleared = subprocess.run([*lmtrain, "clear"], env=env, capture_output=True, text=True, timeout=60)
    assert cleared.stdout.splitlines() == [f"removed {folder}", f"removed {fallback}"] and not folder.exists()
    off = subprocess.run([*lmtrain, "build"], env={**env, "LMTRAIN_COMPILED": "0"}, capture_output=True, text=True,
                         timeout=60)
    assert off.returncode == 2 and off.stderr == ("error: LMTRAIN_COMPILED=0 turns the compiled kernels off; unset it "
                                                  "to build them\n")
