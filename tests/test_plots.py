"""lmtrain.evaluation.plots: reading metrics.jsonl and the learning-curve plot (the drawing itself only where the
optional matplotlib is installed)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmtrain.errors import LmtrainError
from lmtrain.evaluation.plots import first_of_each_folder, legend_names, plot_runs, read_metrics
from lmtrain.files import LEFTOVER_SECONDS


def write_run(folder, events, tail=""):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + tail)
    return folder


EVENTS = [{"step": s, "split": split, "loss": 3.0 / s, "elapsed_s": 0.1 * s} for s in (1, 2, 3)
          for split in ("train", "valid")]


def test_read_metrics_skips_a_line_cut_short(tmp_path):
    run = write_run(tmp_path / "run", EVENTS, tail='{"step": 4, "spl')
    assert read_metrics(run) == EVENTS


def test_missing_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(LmtrainError, match="no metrics.jsonl"):
        read_metrics(tmp_path)


def test_without_matplotlib_a_clear_error(tmp_path, no_matplotlib):
    with pytest.raises(LmtrainError, match="matplotlib"):
        plot_runs([str(write_run(tmp_path / "run", EVENTS))], str(tmp_path / "curves.png"))


def test_plot_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [str(write_run(tmp_path / name, EVENTS)) for name in ("a", "b")]
    plot_runs(runs, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bi_models_right_to_left_validation_is_drawn_too(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    events = EVENTS + [{"step": s, "split": "valid_right_to_left", "loss": 2.0 / s, "elapsed_s": 0.1 * s}
                       for s in (1, 2)]
    drawn = []
    monkeypatch.setattr("lmtrain.evaluation.plots.save_figure", lambda plt, figure, path: drawn.append(figure))
    plot_runs([str(write_run(tmp_path / "bi", events))], str(tmp_path / "curves.png"))
    by_step = drawn[0].axes[0]
    assert [line.get_label() for line in by_step.get_lines()] == ["bi train", "bi valid", "bi valid_right_to_left"]
    assert list(by_step.get_lines()[2].get_ydata()) == [2.0, 1.0]


def test_a_failed_write_leaves_the_old_image_as_it_was(tmp_path, monkeypatch):
    """The figure goes to a temporary file renamed over the old one: a full disk, a size limit or a kill
    mid-write never leaves half an image where the old one was."""
    matplotlib = pytest.importorskip("matplotlib")
    output = tmp_path / "curves.png"
    output.write_bytes(b"the old image")

    def full_disk(figure, handle, **options):
        handle.write(b"half an image")
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    with pytest.raises(LmtrainError, match=r"^cannot write .*curves\.png: (F|f)ile too large$"):
        plot_runs([str(write_run(tmp_path / "run", EVENTS))], str(output))
    assert output.read_bytes() == b"the old image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "run"]


def aged(path, seconds=2 * LEFTOVER_SECONDS):
    """`path` with its times set back, as a leftover of some time ago."""
    before = time.time() - seconds
    os.utime(path, (before, before))
    return path


def test_a_killed_writers_leftover_is_removed_by_the_next_write_and_a_live_ones_kept(tmp_path):
    """A write killed mid-way (kill -9: no handler runs) leaves its hidden temporary file; the next
    write of that name removes it, since no process holds its lock, and leaves one a running writer holds."""
    pytest.importorskip("matplotlib")
    output = tmp_path / "curves.png"
    script = ("import sys, time\nfrom lmtrain.files import writing_output\n"
              "with writing_output(sys.argv[1]) as handle:\n"
              "    handle.write(b'half'); print('writing', flush=True); time.sleep(120)")
    killed, alive = (subprocess.Popen([sys.executable, "-c", script, str(output)], stdout=subprocess.PIPE, text=True)
                     for _ in range(2))
    try:
        for writer in (killed, alive):
            assert writer.stdout.readline() == "writing\n"
        leftovers = sorted(tmp_path.iterdir())
        assert len(leftovers) == 2 and all(p.name.startswith(".curves.png.") for p in leftovers)
        for leftover in leftovers:
            aged(leftover)
        killed.kill()
        killed.wait()
        young = tmp_path / ".curves.png.abcdefgh.tmp"  # just made: its writer may not have locked it yet
        young.write_bytes(b"")
        held = [os.readlink(link) for link in Path(f"/proc/{alive.pid}/fd").iterdir()]
        (writing,) = [p.name for p in leftovers if str(p) in held]  # the live writer's own temporary file
        plot_runs([str(write_run(tmp_path / "run", EVENTS))], str(output))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["curves.png", "run", young.name, writing])
    finally:
        alive.kill()
        alive.wait()


def test_what_is_no_leftover_of_this_output_stays_and_does_not_stop_the_write(tmp_path, monkeypatch):
    """Another output's temporary file whose name begins like this one's, a folder of such a name, and a
    leftover that cannot be removed (another user's, in a shared folder) are left, and the write goes on."""
    from lmtrain import files

    other = tmp_path / ".a.png.vm-999999.png.abcdefgh.tmp"  # a leftover of the output `a.png.vm-999999.png`
    stuck = tmp_path / ".a.png.stuck000.tmp"
    for leftover in (other, stuck):
        leftover.write_bytes(b"half")
        aged(leftover)
    folder = tmp_path / ".a.png.folder00.tmp"
    folder.mkdir()
    aged(folder)
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == stuck.name:  # as another user's file in a sticky folder (/tmp) is
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        real_unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with files.writing_output(tmp_path / "a.png") as handle:
        handle.write(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, folder.name, stuck.name, "a.png"])
    monkeypatch.undo()
    with files.writing_output(tmp_path / "a.png") as handle:  # removable now: an abandoned file of this output
        handle.write(b"whole")
    assert not stuck.exists() and other.exists()


@pytest.mark.parametrize("output", ["curves", "", "curves.jpg", "run"])
def test_an_output_that_is_no_image_file_name_is_refused_before_reading(tmp_path, output):
    run = write_run(tmp_path / "run", EVENTS)
    with pytest.raises(LmtrainError, match=r"^output (needs a file name|must name a \.png or \.svg or \.pdf file)"):
        plot_runs([str(run)], str(tmp_path / output) if output else "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_values_no_run_writes_are_gaps_not_a_crash(tmp_path):
    pytest.importorskip("matplotlib")
    odd = [{"step": 1e308, "split": "train", "loss": 1e308, "elapsed_s": -5.0},
           {"step": -1e308, "split": "train", "loss": -1e308, "elapsed_s": 1e308}]
    run = write_run(tmp_path / "run", EVENTS + odd)
    plot_runs([str(run)], str(tmp_path / "curves.svg"))
    assert (tmp_path / "curves.svg").read_bytes().lstrip().startswith(b"<?xml")


def test_a_metrics_file_that_is_a_device_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").symlink_to("/dev/null")  # /dev/zero too, which was read without end
    with pytest.raises(LmtrainError, match=r"metrics\.jsonl is not a regular file"):
        read_metrics(tmp_path / "run")


def test_matplotlib_s_own_messages_stay_quiet(tmp_path):
    """A configuration folder matplotlib cannot make (a read-only home) sends it to a temporary one, with
    warnings of its own on stderr: lmtrain's output is its own lines only."""
    pytest.importorskip("matplotlib")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    environment = {**os.environ, "MPLCONFIGDIR": str(blocker / "matplotlib")}
    done = subprocess.run([sys.executable, "-c", "from lmtrain.evaluation.plots import pyplot; pyplot()"],
                          env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_runs_are_named_apart_and_drawn_once(tmp_path, monkeypatch):
    assert legend_names(["runs/char", "other/char", "runs/word"]) == ["runs/char", "other/char", "word"]
    # A name's bytes that are no UTF-8 (Python's lone surrogates) would stop matplotlib drawing the legend.
    assert legend_names(["a/r\udce9", "b/r\udce9", "c\udce9"]) == ["a/r\ufffd", "b/r\ufffd", "c\ufffd"]
    assert first_of_each_folder(["b", "a", "./b/", "c", "a"]) == ["b", "a", "c"]
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", EVENTS)
    read = []
    monkeypatch.setattr("lmtrain.evaluation.plots.read_metrics", lambda run_dir: read.append(run_dir) or EVENTS)
    plot_runs([str(run), f"{run}/", str(run)], str(tmp_path / "curves.png"))
    assert read == [str(run)]


def test_an_output_named_by_a_link_replaces_the_file_it_names(tmp_path):
    """As writing in place would: the link (latest.png -> runs/x/curves.png) stays, its file is new."""
    pytest.importorskip("matplotlib")
    target = tmp_path / "target.png"
    target.write_bytes(b"the old image")
    (tmp_path / "latest.png").symlink_to(target)
    plot_runs([str(write_run(tmp_path / "run", EVENTS))], str(tmp_path / "latest.png"))
    assert (tmp_path / "latest.png").is_symlink() and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_error_says_how_to_install_it(monkeypatch):
    """lmtrain is installed from its folder, not from PyPI: the message names commands that work."""
    from lmtrain.evaluation.plots import pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(LmtrainError, match=r"^plotting needs matplotlib: pip install matplotlib \(or, in lmtrain's "
                                           r"folder, pip install -e '\.\[plot\]'\)$"):
        pyplot()


def test_an_output_that_is_a_link_must_name_a_file_of_its_own_kind(tmp_path):
    """The output is written through a link: `curves.png` pointing to `fig.svg` (or a checkpoint) would
    have that file replaced by a PNG. A link to a file of the output's own kind is written through."""
    from lmtrain.files import check_output

    (tmp_path / "fig.svg").write_text("<svg/>")
    (tmp_path / "curves.png").symlink_to("fig.svg")
    with pytest.raises(LmtrainError, match=r"^-o .*curves.png is a link to .*fig.svg, not a .png file"):
        check_output("-o", str(tmp_path / "curves.png"), suffixes=(".png", ".svg", ".pdf"))
    (tmp_path / "kept.png").write_bytes(b"")
    (tmp_path / "other.png").symlink_to("kept.png")
    check_output("-o", str(tmp_path / "other.png"), suffixes=(".png", ".svg", ".pdf"))
