"""Fixtures that every test package shares: a cache folder of the session's own, the `debiformer`
command run in this process, the release fixture's weights and the mosaics set (detection and
segmentation) made once per session; and the skip of tests marked `cuda` where there is no CUDA
GPU."""

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType

import pytest
import torch

from debiformer.data.mosaics import write_mosaics
from tests.helpers.cli import run_in_process
from tests.helpers.official_fixture import load_fixture, official_state_dict


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
