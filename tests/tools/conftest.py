"""debiformer_nano exported once per format per test session (random weights, seed 0), for every
tool test that needs a written file; the pytest-xdist workers of a session share one export."""

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from debiformer.tools.export import ExportOptions, export_model


@dataclass(frozen=True)
class Exported:
    """A written export: its file, the options that wrote it, and what `export_model` returned."""

    path: Path
    options: ExportOptions
    result: dict[str, Any]

    def same_options(self, options: ExportOptions) -> bool:
        """Whether `options` ask for this export, wherever they write it."""
        return replace(self.options, out=options.out) == options


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> Path:
    """The session's folder of exports: under pytest-xdist, the one temporary folder above every
    worker's own, so that the workers share them."""
    if "PYTEST_XDIST_WORKER" not in os.environ:  # not distributed
        return tmp_path_factory.mktemp("exports")
    folder = tmp_path_factory.getbasetemp().parent / "exports"
    folder.mkdir(exist_ok=True)
    return folder


def export_nano(folder: Path, name: str, **options: Any) -> Exported:
    """debiformer_nano written as `folder / name` with `options` by the first worker that asks
    (an ONNX export takes a minute or more on 2 cores), its result kept beside it for the others."""
    options = ExportOptions(out=folder / name, model="debiformer_nano", **options)
    result_file = folder / f"{name}.json"
    with FileLock(folder / f"{name}.lock"):
        if not result_file.exists():
            result_file.write_text(json.dumps(export_model(options)))
    return Exported(options.out, options, json.loads(result_file.read_text()))


@pytest.fixture(scope="session")
def exported_onnx(exports: Path) -> Exported:
    """ONNX at 33x33, any batch: stage maps of 9, 5, 3 and 2 pixels, so with nano's 2x2 regions
    every stage but the last pads on both sides, and so do the agent grids of DBRA; square, so
    that `bench --resolution 33` can run it."""
    pytest.importorskip("onnxruntime")
    return export_nano(exports, "nano.onnx", resolution=33, dynamic_batch=True)


@pytest.fixture(scope="session")
def exported_pt2(exports: Path) -> Exported:
    """A torch.export program at 33x47, any batch: stage maps of 9x12, 5x6, 3x3 and 2x2, padded
    on the first side of every stage but the last, a different count of regions on each side."""
    return export_nano(exports, "nano.pt2", resolution=(33, 47), dynamic_batch=True)


@pytest.fixture(scope="session")
def exported_safetensors(exports: Path) -> Exported:
    """The weights as safetensors, recorded for 33x47 images."""
    return export_nano(exports, "nano.safetensors", resolution=(33, 47))
