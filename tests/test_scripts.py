"""The benchmark scripts' arguments: a malformed one is argparse's one-line error and exit 2, before any
kernel is built or any timing starts."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
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


@pytest.mark.parametrize("script", ["bench_cells.py", "profile_layer.py", "compare_gemms.py", "compare_tiles.py",
                                    "compare_input_gradient.py", "speed_targets.py", "bench_placement.py",
                                    "loops_over_time.py"])
def test_every_layer_benchmark_refuses_malformed_sizes_in_one_line(script):
    result = subprocess.run([sys.executable, str(SCRIPTS / script), "--sizes", "[[1, 2]]"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"{script}: error: argument --sizes: ")


def test_speed_targets_prints_each_target_with_its_verdict():
    result = subprocess.run([sys.executable, str(SCRIPTS / "speed_targets.py"), "--cells", "rnn", "--sizes",
                             "[[2, 3, 8]]", "--repeats", "1", "--tokens", "2", "--rss-processes", "1",
                             "--placements", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| rnn layer", "| sampling"))]
    assert len(rows) == 4
    assert all(line.endswith(("| met |", "| **not met** |")) for line in rows)
    met = sum(line.endswith("| met |") for line in rows)
    assert f"{met} of 4 targets met." in result.stdout


def test_bench_placement_times_both_sides_in_every_placement():
    result = subprocess.run([sys.executable, str(SCRIPTS / "bench_placement.py"), "--sizes", "[[2, 3, 8]]",
                             "--placements", "3", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(re.findall(r"placement \d: torch.nn [\d.]+ ms, lmtrain manual [\d.]+ ms", result.stdout)) == 3
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| lstm | 2, 3, 8 |")]
    assert [row[2] for row in rows] == ["torch.nn", "lmtrain manual"] * 2  # printed as measured, then in the table
    for row in rows:
        fastest, median, slowest = (float(value) for value in row[3:6])
        assert fastest <= median <= slowest and float(row[6].removesuffix("x |")) >= 1.0


@pytest.mark.parametrize("script, option", [("bench_placement.py", "--placements"), ("bench_placement.py", "--repeats"),
                                            ("speed_targets.py", "--placements"),
                                            ("bench_cells.py", "--rss-processes")])
def test_placement_scripts_refuse_no_placements_or_repeats_in_one_line(script, option):
    result = subprocess.run([sys.executable, str(SCRIPTS / script), option, "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"{script}: error: {option} must be 1 or more"


def test_compare_input_gradient_makes_few_rows_by_torch_mm_and_times_the_layer_there():
    result = subprocess.run([sys.executable, str(SCRIPTS / "compare_input_gradient.py"), "--cells", "gru",
                             "--sizes", "[[1, 4, 64]]", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| gru | 1, 4, 64 |")]
    assert rows[0].startswith("| gru | 1, 4, 64 | 4 x (192, 64) |") and rows[0].endswith("| torch.mm |")
    # the layer's step both ways, where the choice differs from oneDNN's route: on CPUs whose float32
    # products are oneDNN's (on AVX2 CPUs they are all MKL's, and there is nothing to compare)
    from lmtrain.speed.route import ONEDNN_FLOAT32, ONEDNN_LINEAR
    assert len(rows) == (2 if ONEDNN_FLOAT32 and ONEDNN_LINEAR is not None else 1)
    for row in rows[1:]:
        assert re.fullmatch(r"\| gru \| 1, 4, 64 \| [\d.]+ \| [\d.]+ \| [\d.]+x \| \d+ / \d+ \|", row)


@pytest.mark.parametrize("option, message", [("--ptb", "no ptb.train.txt, ptb.valid.txt, ptb.test.txt there"),
                                             ("--shakespeare", "no such file")])
def test_speed_targets_refuses_a_missing_corpus_in_one_line(tmp_path, option, message):
    result = subprocess.run([sys.executable, str(SCRIPTS / "speed_targets.py"), option, str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_gpu_check_says_in_one_line_that_there_is_no_gpu():
    """Without a GPU (tests/conftest.py hides one from the processes the tests start), before any stage."""
    result = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["gpu_check.sh: no CUDA device here"], result.stderr
    assert "===" not in result.stdout
