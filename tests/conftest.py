"""Fixtures that every test package shares: a cache folder of the session's own, the `debiformer`
command run in this process, the release fixture's weights and the mosaics set (detection and
segmentation) made once per session; the skip of tests marked `cuda` where there is no CUDA GPU;
and, under pytest-xdist (`-n auto`), one worker per core, up to 8, sharing the cores' threads."""

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType

import pytest
import torch

from debiformer.data.mosaics import write_mosaics
from tests.helpers.cli import run_in_process
from tests.helpers.official_fixture import load_fixture, official_state_dict

MAX_WORKERS = 8


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` starts one worker per core this process may run on, up to MAX_WORKERS;
    pytest-xdist's own count is the machine's physical cores, blind to the CPUs a container or
    CI job is limited to. PYTEST_XDIST_AUTO_NUM_WORKERS, where set, still decides."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return min(_cores(), MAX_WORKERS)


def pytest_configure(config: pytest.Config) -> None:
    """A pytest-xdist worker takes its share of the cores as threads, no more than this process
    was given, and hands the same count to the processes it starts (OMP_NUM_THREADS); without
    it, two workers of two threads each on two cores run the suite 1.4x slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, min(torch.get_num_threads(), _cores() // workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `cuda` skip, saying why, where torch sees no CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Iterator[None]:
    """$XDG_CACHE_HOME is a folder of this test session, so what the data checks cache never
    lands in the user's ~/.cache."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture
def run_main(monkeypatch, capsys):
    """`run_main(*args)`: runs `debiformer ARGS` in this process; returns (exit code, stdout,
    stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        return run_in_process(monkeypatch, capsys, *args)

    return run


@pytest.fixture(scope="session")
def official_state() -> Mapping[str, torch.Tensor]:
    """The release fixture's DeBiFormer-T state dict in the release's names (1000 classes),
    read-only: a test that changes it changes a copy, `dict(official_state)`."""
    return MappingProxyType(official_state_dict(load_fixture()))


@pytest.fixture(scope="session")
def mosaics(tmp_path_factory) -> Path:
    """8 training and 3 validation mosaics of 64x64 with 1-2 unscaled items each, read-only."""
    out = tmp_path_factory.mktemp("mosaics") / "set"
    return write_mosaics(
        out, train_images=8, val_images=3, canvas_size=64, items=(1, 2), scale=(1.0, 1.0)
    )
