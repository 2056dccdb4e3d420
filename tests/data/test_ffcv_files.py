"""FFCV files: conversion (validated, atomic, stoppable), stored class names, summary, CLI."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from debiformer.cli import flags
from debiformer.cli.data import app
from debiformer.data import (
    WriterOptions,
    check_labels,
    classes_path,
    convert_to_ffcv,
    ensure_ffcv_file,
    ffcv_files,
    ffcv_summary,
)
from debiformer.errors import UserError
from tests.data.common import FASHION, needs_fashion_mnist, write_idx_folder

REPO = Path(__file__).parents[2]


def test_summary_has_counts_sizes_and_the_stored_class_names(photos_ffcv):
    summary = ffcv_summary(photos_ffcv)
    assert (summary.num_samples, summary.num_classes, summary.class_counts) == (30, 3, [10] * 3)
    assert summary.width_range == (100, 100) and summary.height_range == (75, 75)
    assert summary.jpeg_fraction == 1.0 and summary.label_range == (0, 2)
    assert summary.class_names == ["00_astronaut", "01_coffee", "02_chelsea"]
    assert json.loads(classes_path(photos_ffcv).read_text())["classes"] == summary.class_names


def _copy_classes(photos: Path, out: Path, per_class: int = 3, empty: tuple[str, ...] = ()) -> Path:
    """A copy of `per_class` images of each class of `photos`, plus empty class folders `empty`."""
    for class_dir in sorted(photos.iterdir()):
        (out / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            (out / class_dir.name / image.name).write_bytes(image.read_bytes())
    for name in empty:
        (out / name).mkdir()
    return out


def test_an_empty_last_class_folder_is_kept_as_a_class(photos, tmp_path, capsys):
    folder = _copy_classes(photos, tmp_path / "folder", empty=("03_empty",))
    out = convert_to_ffcv(str(folder), tmp_path / "out.beton", WriterOptions(num_workers=1)).path
    assert "03_empty" in capsys.readouterr().err
    summary = ffcv_summary(out)
    assert summary.num_classes == 4 and summary.class_counts == [3, 3, 3, 0]
    check_labels(summary, 4, "train")
    with pytest.raises(UserError, match=r"^val data .*out.beton: has 4 classes, the model 3"):
        check_labels(summary, 3, "val")


def test_files_without_stored_classes_count_them_from_their_labels(photos, tmp_path):
    folder = _copy_classes(photos, tmp_path / "folder", per_class=2, empty=("03_empty",))
    out = convert_to_ffcv(str(folder), tmp_path / "out.beton", WriterOptions(num_workers=1)).path
    classes_path(out).unlink()
    summary = ffcv_summary(out)
    assert summary.class_names is None and summary.num_classes == 3
    classes_path(out).write_text(json.dumps({"classes": ["a"], "samples": 5}))
    with pytest.raises(UserError, match="does not describe"):
        ffcv_summary(out)


def test_labels_outside_the_classes_are_refused_before_conversion(tmp_path):
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    folder = write_idx_folder(tmp_path / "idx", images, np.array([0, 3, 10, 2]))
    out = tmp_path / "out.beton"
    with pytest.raises(UserError, match="labels run from 0 to 10 but there are 10 classes"):
        convert_to_ffcv(f"fashion-mnist:{folder}", out)
    assert os.listdir(tmp_path) == ["idx"]


def test_corrupt_image_stops_by_default_and_is_skipped_on_request(photos, tmp_path, capsys):
    folder = _copy_classes(photos, tmp_path / "folder")
    bad = sorted((folder / "01_coffee").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    out = tmp_path / "out.beton"
    with pytest.raises(UserError, match=str(bad)) as error:
        convert_to_ffcv(str(folder), out)
    assert str(error.value).endswith("or skip unreadable images with on_bad_image=skip")
    assert flags.message(error.value, "data convert").endswith("images with --skip-bad")
    assert not out.exists()
    conversion = convert_to_ffcv(str(folder), out, WriterOptions(on_bad_image="skip"))
    assert conversion.skipped == [str(bad)]
    assert str(bad) in capsys.readouterr().err
    assert ffcv_summary(out).class_counts == [3, 2, 3]


def test_a_failing_writer_process_stops_the_conversion_with_one_line(tmp_path, monkeypatch):
    def fail_late(self, index):
        if index >= 40:
            raise ValueError("cannot encode\nthis sample")
        return np.zeros((28, 28, 3), dtype=np.uint8), 0

    monkeypatch.setattr(ffcv_files._ArrayDataset, "__getitem__", fail_late)
    out = tmp_path / "out.beton"
    start = time.monotonic()
    with pytest.raises(UserError) as error:
        convert_to_ffcv(FASHION, out, WriterOptions(subset=200, chunk_size=10, write_mode="raw"))
    assert time.monotonic() - start < 30
    message = str(error.value)
    assert "\n" not in message and "ValueError: cannot encode this sample" in message
    assert os.listdir(tmp_path) == []


BAD_OPTIONS = [  # the command's arguments, the library's message, the command's message
    (["--chunk-size", "0"], "chunk_size must be at least 1", "--chunk-size must be at least 1"),
    (["--workers", "0"], "num_workers must be at least 1", "--workers must be at least 1"),
    (["--max-resolution", "0"], "max_resolution must be at least 1", "--max-resolution must be"),
    (["--subset", "-5"], "subset must be a positive", "--subset must be a positive"),
    (["--jpeg-quality", "-1"], "jpeg quality must be in 1..100", "jpeg quality must be in"),
    (["--write-mode", "png"], "unknown write mode", "unknown write mode"),
]


@pytest.mark.parametrize("args, library, command", BAD_OPTIONS)
def test_bad_options_are_one_line_errors_before_any_work(args, library, command, tmp_path):
    out = tmp_path / "new" / "out.beton"
    result = CliRunner().invoke(app, ["convert", FASHION, str(out), *args])
    assert isinstance(result.exception, UserError), result.output
    assert str(result.exception).startswith(library) and "\n" not in str(result.exception)
    assert flags.message(result.exception, "data convert").startswith(command)
    assert os.listdir(tmp_path) == []


def test_an_output_that_cannot_be_written_is_an_error_before_any_work(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        convert_to_ffcv(FASHION, tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as a user who can write anywhere")
    with pytest.raises(UserError, match="is not writable"):
        convert_to_ffcv(FASHION, locked / "out.beton")
    assert os.listdir(locked) == []


def _processes_marked(mark: str) -> list[int]:
    """Processes whose environment holds `mark`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and mark.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def _start_cli_conversion(out: Path) -> tuple[subprocess.Popen, str]:
    """`debiformer data convert` of all Fashion-MNIST training images (as JPEG, so it takes a
    while) in a subprocess whose processes carry a mark; returns once the partial file exists."""
    mark = f"DEBIFORMER_TEST_{uuid.uuid4().hex}"
    command = [sys.executable, "-m", "cli.main", "data", "convert", FASHION, str(out)]
    process = subprocess.Popen(
        [*command, "--write-mode", "jpg", "--workers", "2"],
        cwd=REPO,
        env={**os.environ, mark: "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # Ctrl-C's default action, as in a terminal: a test run started in the background by a
        # non-interactive shell inherits SIGINT ignored, and Python then keeps it ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(f"{out.name}.partial-*")):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.05)
    time.sleep(0.5)
    return process, mark


def _wait_for_no_process(mark: str, seconds: float) -> list[int]:
    """The marked processes still alive after up to `seconds`."""
    deadline = time.monotonic() + seconds
    while _processes_marked(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _processes_marked(mark)


@pytest.mark.slow
@needs_fashion_mnist
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_cli_conversion_and_all_its_processes(signum, code, tmp_path):
    out = tmp_path / "fashion.beton"
    process, mark = _start_cli_conversion(out)
    process.send_signal(signum)
    start = time.monotonic()
    process.wait(timeout=10)
    assert time.monotonic() - start < 10 and process.returncode == code
    assert _wait_for_no_process(mark, 1.0) == []
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@needs_fashion_mnist
def test_killing_the_cli_conversion_kills_its_workers_and_the_next_one_cleans_up(tmp_path):
    out = tmp_path / "fashion.beton"
    process, mark = _start_cli_conversion(out)
    process.kill()
    process.wait(timeout=10)
    assert _wait_for_no_process(mark, 5.0) == []
    assert list(tmp_path.glob("fashion.beton.partial-*")) and not out.exists()
    ensured = ensure_ffcv_file(FASHION, out, subset=50, write_mode="raw", num_workers=1)
    assert ffcv_summary(ensured).num_samples == 50
    assert sorted(os.listdir(tmp_path)) == ["fashion.beton", "fashion.beton.json"]
    stamp = out.stat().st_mtime_ns
    ensure_ffcv_file(FASHION, out, subset=50, write_mode="raw")
    assert out.stat().st_mtime_ns == stamp


def test_ensure_refuses_a_file_that_is_not_ffcv(tmp_path):
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"\0" * 100)
    with pytest.raises(UserError, match="not an FFCV"):
        ensure_ffcv_file(FASHION, junk)
    with pytest.raises(UserError, match="unknown FFCV writer option"):
        ensure_ffcv_file(FASHION, junk, workers=2)


@pytest.mark.slow
def test_cli_convert_inspect_and_bench(photos, tmp_path):
    runner = CliRunner()
    out = tmp_path / "photos.beton"
    converted = runner.invoke(app, ["convert", str(photos), str(out), "--write-mode", "jpg"])
    assert converted.exit_code == 0, converted.output
    inspected = runner.invoke(app, ["inspect", str(out)])
    assert inspected.exit_code == 0 and "30 samples, 3 classes" in inspected.output
    assert "width 100-100, height 75-75" in inspected.output
    assert "01_coffee" in inspected.output
    result = tmp_path / "bench.json"
    args = ["bench", str(photos), "--image-size", "32", "--batch-size", "10", "--workers", "0"]
    benched = runner.invoke(app, [*args, "--ffcv-file", str(out), "--json", str(result)])
    assert benched.exit_code == 0, benched.output
    numbers = json.loads(result.read_text())
    assert numbers["num_images"] == 30 and numbers["speedup"] > 0 and numbers["uint8_speedup"] > 0
