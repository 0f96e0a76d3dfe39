"""Memory the process may not allocate (`ulimit -v`, a container's limit) is named as such, in one line with
exit 2, not reported as an internal error: the checks of physical memory cannot see those limits."""

from __future__ import annotations

import pytest
import typer

from lmtrain import cli
from lmtrain.speed import memory


@pytest.mark.parametrize("error, amount", [
    (MemoryError(), ""),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 6400000000 bytes. Error code 12 (Cannot allocate memory)"),
     " (it asked for 6.4 GB)"),
    (RuntimeError("std::bad_alloc"), ""),  # a C++ allocation inside torch, near a `ulimit -v`
])
def test_out_of_memory_is_one_line_naming_it(capsys, error, amount):
    with pytest.raises(typer.Exit) as stopped, cli.user_errors():
        raise error
    assert stopped.value.exit_code == 2
    assert capsys.readouterr().err == (f"error: out of memory{amount}: make the model, the batch or the number of "
                                       f"samples smaller, or give the process more memory\n")


def test_other_errors_stay_internal_errors(capsys):
    with pytest.raises(typer.Exit) as stopped, cli.user_errors():
        raise RuntimeError("something else")
    assert stopped.value.exit_code == 1
    assert capsys.readouterr().err.startswith("error: internal error RuntimeError: something else")


def test_an_error_raised_over_a_memory_error_is_out_of_memory(capsys):
    """A C extension that fails to allocate can surface as a SystemError whose context is the MemoryError."""
    with pytest.raises(typer.Exit) as stopped, cli.user_errors():
        try:
            raise MemoryError
        except MemoryError:
            raise SystemError("<built-in method> returned NULL without setting an exception") from None
    assert stopped.value.exit_code == 1, "`from None` hides the context: this one is not named out of memory"
    with pytest.raises(typer.Exit) as stopped, cli.user_errors():
        try:
            raise MemoryError
        except MemoryError:
            raise SystemError("<built-in method> returned NULL without setting an exception")
    assert stopped.value.exit_code == 2
    assert capsys.readouterr().err.endswith("error: out of memory: make the model, the batch or the number of "
                                            "samples smaller, or give the process more memory\n")


def test_the_memory_a_process_may_take_is_capped_by_its_own_limits(monkeypatch, tmp_path):
    """`ulimit -v` (RLIMIT_AS) leaves its limit less what is mapped; `ulimit -d` its limit less the data."""
    meminfo, status = tmp_path / "meminfo", tmp_path / "status"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    status.write_text("Name:\tpython\nVmSize:\t 3000000 kB\nVmData:\t 1000000 kB\n")
    limits = {memory.resource.RLIMIT_AS: memory.resource.RLIM_INFINITY,
              memory.resource.RLIMIT_DATA: memory.resource.RLIM_INFINITY}
    monkeypatch.setattr(memory.resource, "getrlimit", lambda which: (limits[which], memory.resource.RLIM_INFINITY))
    monkeypatch.setattr(memory, "open", _without_cgroups(open), raising=False)
    assert memory.available_bytes(str(meminfo), str(status)) == 20000000 * 1024
    limits[memory.resource.RLIMIT_AS] = 4000000 * 1024
    assert memory.available_bytes(str(meminfo), str(status)) == 1000000 * 1024
    limits[memory.resource.RLIMIT_DATA] = 1500000 * 1024
    assert memory.available_bytes(str(meminfo), str(status)) == 500000 * 1024
    limits[memory.resource.RLIMIT_AS] = 1000 * 1024  # already past it: nothing left, not a negative size
    assert memory.available_bytes(str(meminfo), str(status)) == 0


def _without_cgroups(real_open):
    """`open` as this process sees it, less the cgroup limits of the machine the tests run on."""
    def opened(path, *args, **kwargs):
        if str(path).startswith("/sys/fs/cgroup"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)
    return opened


def test_training_past_ulimit_v_is_refused_before_it_allocates(monkeypatch, tmp_path, config_factory):
    """Under `ulimit -v` with room for torch but not for the model, its optimizer and gradients, training stops
    at the size check, naming the keys, where it used to fail inside an allocation as an internal error."""
    from lmtrain.config import ConfigError
    from lmtrain.training.trainer import train

    vm_size = int([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmSize:")][0]) * 1024
    monkeypatch.setattr(memory.resource, "getrlimit", lambda which: (
        vm_size + (200 << 20) if which == memory.resource.RLIMIT_AS else memory.resource.RLIM_INFINITY,
        memory.resource.RLIM_INFINITY))
    assert memory.available_bytes() <= 200 << 20
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat\nthe dog ran\n" * 20, encoding="utf-8")
    config = config_factory(**{"data.path": str(corpus), "model.hidden_size": 64, "model.num_layers": 2000,
                               "train.out_dir": str(tmp_path / "run"), "data.cache": False})
    with pytest.raises(ConfigError, match=r"model.num_layers=2000\): .* more than the .* of memory this process "
                                          r"may still take; make it smaller$"):
        train(config)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
