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
                                    "loops_over_time.py", "rss_parts.py"])
def test_every_layer_benchmark_refuses_malformed_sizes_in_one_line(script):
    result = subprocess.run([sys.executable, str(SCRIPTS / script), "--sizes", "[[1, 2]]"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"{script}: error: argument --sizes: ")


def test_rss_parts_measures_both_sides_three_ways_and_wants_cells_with_sizes():
    result = subprocess.run([sys.executable, str(SCRIPTS / "rss_parts.py"), "--cells", "rnn", "--sizes", "[[2, 3, 8]]",
                             "--processes", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("| rnn | 2, 3, 8 |")]
    assert len(re.findall(r"-?\d+\.\d / -?\d+\.\d \(-?\d+\.\d\dx\)", row)) == 4, row
    alone = subprocess.run([sys.executable, str(SCRIPTS / "rss_parts.py"), "--cells", "rnn"],
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode == 2 and alone.stderr.strip().splitlines()[-1].endswith(
        "error: give --cells and --sizes together, or neither")


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
    assert result.stderr.strip().splitlines()[-1] == f"{script}: error: argument {option}: must be 1 or more; got 0"


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
                                             ("--shakespeare", "not a file")])
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


@pytest.mark.parametrize("text", ["0", "-3", "2.5", "many", ""])
def test_counts_are_whole_numbers_of_at_least_their_minimum(text):
    comparison = _comparison()
    assert comparison.positive_integer("7") == 7 and comparison.integer_at_least(11)("11") == 11
    with pytest.raises(argparse.ArgumentTypeError):
        comparison.positive_integer(text)
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be 11 or more \(each variant\); got 10"):
        comparison.integer_at_least(11, "each variant")("10")


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "soon"])
def test_seconds_are_finite_numbers_above_zero(text):
    comparison = _comparison()
    assert comparison.positive_number("0.5") == 0.5
    with pytest.raises(argparse.ArgumentTypeError):
        comparison.positive_number(text)


def test_corpus_arguments_are_a_file_or_the_folder_of_ptb(tmp_path):
    comparison = _comparison()
    (tmp_path / "input.txt").write_text("to be\n", encoding="utf-8")
    assert comparison.corpus(str(tmp_path / "input.txt")) == tmp_path / "input.txt"
    assert comparison.corpus_settings(tmp_path / "input.txt") == ["data.corpus=null",
                                                                  f"data.path={tmp_path / 'input.txt'}"]
    with pytest.raises(argparse.ArgumentTypeError, match="no such file"):
        comparison.text_file(str(tmp_path / "missing.txt"))
    with pytest.raises(argparse.ArgumentTypeError, match="not a file"):
        comparison.text_file(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="no ptb.train.txt, ptb.valid.txt, ptb.test.txt there"):
        comparison.corpus(str(tmp_path))
    for name in comparison.PTB_FILES:
        (tmp_path / name).write_text("to be\n", encoding="utf-8")
    assert comparison.ptb_folder(str(tmp_path)) == tmp_path
    assert comparison.corpus_settings(tmp_path)[1:] == [f"data.{split}={tmp_path / f'ptb.{split}.txt'}"
                                                        for split in ("train", "valid", "test")]


def test_a_doc_file_needs_a_folder_that_is_there(tmp_path):
    comparison = _comparison()
    assert comparison.doc_file(str(tmp_path / "new.md")) == tmp_path / "new.md"
    with pytest.raises(argparse.ArgumentTypeError, match="no folder"):
        comparison.doc_file(str(tmp_path / "missing" / "x.md"))
    with pytest.raises(argparse.ArgumentTypeError, match="a folder, not a file"):
        comparison.doc_file(str(tmp_path))


def test_a_baseline_must_be_an_lmtrain_checkout(tmp_path):
    comparison = _comparison()
    assert comparison.lmtrain_checkout(str(SCRIPTS.parent)) == SCRIPTS.parent
    with pytest.raises(argparse.ArgumentTypeError, match="not an lmtrain checkout"):
        comparison.lmtrain_checkout(str(tmp_path))


def test_checked_config_refuses_what_lmtrain_refuses_in_argparse_line(capsys):
    comparison = _comparison()
    parser = argparse.ArgumentParser(prog="script.py")
    config = comparison.checked_config(parser, comparison.ROOT / "configs" / "quickstart.yaml", ["model.hidden_size=8"])
    assert config.model.hidden_size == 8
    with pytest.raises(SystemExit) as stopped:
        comparison.checked_config(parser, comparison.ROOT / "configs" / "quickstart.yaml", ["model.hiden_size=8"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("script.py: error: unknown config key 'model.hiden_")


def test_a_failed_child_stops_the_script_with_its_own_last_line():
    comparison = _comparison()
    assert comparison.run_child([sys.executable, "-c", "print('out')"]).stdout == "out\n"
    child = "import sys; print('a warning', file=sys.stderr); sys.exit('error: the cause')"
    with pytest.raises(SystemExit) as stopped:
        comparison.run_child([sys.executable, "-c", child])
    first, last = str(stopped.value.code).splitlines()
    assert first.startswith("failed (1): ") and last == "error: the cause"
    with pytest.raises(SystemExit, match="timed out after 0.5 s"):
        comparison.run_child([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)


def test_the_reference_trainers_import_nothing_from_lmtrain():
    """They measure torch alone, though they take their argument types from scripts/comparison.py."""
    code = ("import sys; sys.path.insert(0, %r); import reference_nn_lstm, reference_word_lm; "
            "print(sorted(name for name in sys.modules if name.startswith('lmtrain')))" % str(SCRIPTS))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("script, arguments, message", [
    ("compare_train_speed.py", ["CORPUS", "--steps", "3", "model.hiden_size=3"], "unknown config key"),
    ("compare_train_speed.py", ["CORPUS", "--rounds", "0"], "argument --rounds: must be 1 or more; got 0"),
    ("compare_ptb_epoch.py", ["TMP", "--repeats", "1"], "argument folder: TMP: no ptb.train.txt"),
    ("compare_shakespeare.py", ["CORPUS", "--seconds", "-1"], "argument --seconds: must be a number above 0; got -1"),
    ("compare_shakespeare.py", ["CORPUS", "--variant", "model.hidden_size=abc"], "must be an integer"),
    ("bench_precision.py", ["CORPUS", "--steps", "10"], "argument --steps: must be 11 or more"),
    ("bench_precision.py", ["TMP"], "no ptb.train.txt, ptb.valid.txt, ptb.test.txt there"),
    ("bench_precision.py", ["CORPUS", "--config", "TMP/none.yaml"], "config file not found"),
    ("bench_train_step.py", ["TMP/none.txt"], "argument corpus: TMP/none.txt: no such file"),
    ("compare_backward.py", ["TMP/none.txt"], "is not KEY=VALUE"),
    ("compare_defaults.py", ["TMP/none.txt"], "no such file"),
    ("page_faults.py", ["TMP"], "argument folder: TMP: no ptb.train.txt"),
    ("profile_train_step.py", ["TMP/none.txt"], "no such file"),
    ("bench_cells.py", ["--repeats", "1", "--doc", "TMP/missing/x.md"], "argument --doc: TMP/missing/x.md: no folder"),
    ("bench_sampling.py", ["--num", "0"], "argument --num: must be 1 or more; got 0"),
])
def test_scripts_refuse_bad_input_in_one_line_before_any_work(tmp_path, script, arguments, message):
    corpus = tmp_path / "input.txt"
    corpus.write_text("to be or not to be\n" * 50, encoding="utf-8")
    arguments = [str(corpus) if argument == "CORPUS" else argument.replace("TMP", str(tmp_path))
                 for argument in arguments]
    # From another folder: the scripts' default configs are the repository's, not the current folder's.
    result = subprocess.run([sys.executable, str(SCRIPTS / script), *arguments], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: ") and message.replace("TMP", str(tmp_path)) in last, last


@pytest.mark.parametrize("script", ["bench_optimizer.py", "profile_train_step.py"])
def test_help_prints_help_and_runs_nothing(script):
    result = subprocess.run([sys.executable, str(SCRIPTS / script), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {script}"), result.stderr


def test_bench_precision_says_which_loops_ran():
    """Where the compiled loops cannot make bfloat16 products (here: an odd hidden size), the row says so."""
    code = ("import sys; sys.path.insert(0, %r); from bench_precision import time_loops; "
            "print(time_loops('bfloat16', True, 32, 33)); print(time_loops('bfloat16', False, 32, 32))" % str(SCRIPTS))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    odd, python = result.stdout.splitlines()
    assert odd.startswith("compiled, float32 per-step products (") and python == "Python"
