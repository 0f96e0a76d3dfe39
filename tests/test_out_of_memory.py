"""Memory the process may not allocate (`ulimit -v`, a container's limit) is named as such, in one line with
exit 2, not reported as an internal error: the checks of physical memory cannot see those limits."""

from __future__ import annotations

import pytest
import typer

from lmtrain import cli


@pytest.mark.parametrize("error, amount", [
    (MemoryError(), ""),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 6400000000 bytes. Error code 12 (Cannot allocate memory)"),
     " (it asked for 6.4 GB)"),
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
