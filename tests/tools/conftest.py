"""debiformer_nano exported once per format per session (random weights, seed 0), for every
tool test that needs a written file."""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

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


def export_nano(folder: Path, name: str, **options: Any) -> Exported:
    """debiformer_nano written as `folder / name` with `options`."""
    options = ExportOptions(out=folder / name, model="debiformer_nano", **options)
    return Exported(options.out, options, export_model(options))


@pytest.fixture(scope="session")
def exported_onnx(tmp_path_factory) -> Exported:
    """ONNX at 33x33, any batch: stage maps of 9, 5, 3 and 2 pixels, so with nano's 2x2 regions
    every stage but the last pads on both sides, and so do the agent grids of DBRA; square, so
    that `bench --resolution 33` can run it."""
    pytest.importorskip("onnxruntime")
    folder = tmp_path_factory.mktemp("onnx")
    return export_nano(folder, "nano.onnx", resolution=33, dynamic_batch=True)


@pytest.fixture(scope="session")
def exported_pt2(tmp_path_factory) -> Exported:
    """A torch.export program at 33x47, any batch: stage maps of 9x12, 5x6, 3x3 and 2x2, padded
    on the first side of every stage but the last, a different count of regions on each side."""
    folder = tmp_path_factory.mktemp("pt2")
    return export_nano(folder, "nano.pt2", resolution=(33, 47), dynamic_batch=True)


@pytest.fixture(scope="session")
def exported_safetensors(tmp_path_factory) -> Exported:
    """The weights as safetensors, recorded for 33x47 images."""
    folder = tmp_path_factory.mktemp("safetensors")
    return export_nano(folder, "nano.safetensors", resolution=(33, 47))
