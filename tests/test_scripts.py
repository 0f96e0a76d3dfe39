"""The benchmark scripts' arguments: a malformed one is argparse's one-line error and exit 2, before any
kernel is built or any timing starts."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _comparison():
    spec = importlib.util.spec_from_file_location("comparison", SCRIPTS / "comparison.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_sizes_reads_a_list_of_sizes():
    assert _comparison().layer_sizes("[[32, 64, 128], [1, 256, 512]]") == [(32, 64, 128), (1, 256, 512)]


@pytest.mark.parametrize("text", ["[[1, 2", "[[1, 2]]", "[]", "[[1, 2, 0]]", "[[1, 2, 3.5]]", "[[1, 2, true]]",
                                  "[1, 2, 3]", '{"B": 1}'])
def test_layer_sizes_refuses_what_is_not_a_list_of_sizes(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"\[\[32, 64, 128\], \[1, 256, 512\]\]"):
        _comparison().layer_sizes(text)


@pytest.mark.parametrize("script", ["bench_cells.py", "profile_layer.py", "compare_gemms.py", "compare_tiles.py"])
def test_every_layer_benchmark_refuses_malformed_sizes_in_one_line(script):
    result = subprocess.run([sys.executable, str(SCRIPTS / script), "--sizes", "[[1, 2]]"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"{script}: error: argument --sizes: ")
