"""How the model is compiled (without inductor's layout optimisation, in training and `bench`),
and a torch.compile cache that a killed run left damaged: one line naming the folder to delete,
in training and in `bench`; every other error passes unchanged."""

import errno
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from debiformer.cli.flags import message
from debiformer.engine import fit
from debiformer.errors import UserError
from debiformer.runtime import compile_cache_errors, compile_model
from debiformer.tools import bench
from debiformer.tools.bench import BenchRow
from tests.helpers.toy_task import LineTask, toy_recipe


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """The compile cache folder of this test (TORCHINDUCTOR_CACHE_DIR)."""
    folder = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder))
    return folder


def load_truncated_kernel(*args) -> None:
    """Loads a compiled kernel of the cache that a killed run left empty, as inductor loads its
    kernels: the real ImportError ("file too short"). Takes a compiler backend's arguments."""
    path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / "t4" / "kernel.so"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    importlib.util.module_from_spec(importlib.util.spec_from_file_location("kernel", path))


def raise_as_dynamo(error: Exception) -> None:
    """Raises `error` inside the block, wrapped the way dynamo wraps its backend's errors."""
    try:
        raise error
    except Exception:
        raise RuntimeError("backend='inductor' raised: ...") from None


def one_line(error: UserError, *parts: str) -> None:
    """`error` is one line holding each of `parts`."""
    assert "\n" not in str(error)
    for part in parts:
        assert part in str(error)


@pytest.mark.parametrize(
    "damage",
    [
        load_truncated_kernel,
        lambda: raise_as_dynamo(
            OSError(errno.EIO, "Input/output error", os.environ["TORCHINDUCTOR_CACHE_DIR"] + "/x")
        ),
    ],
)
def test_a_cache_file_that_does_not_load_is_one_line_naming_the_folder(cache, damage):
    with pytest.raises(UserError) as error, compile_cache_errors("train.compile"):
        damage()
    one_line(error.value, "torch.compile's cache is damaged", f"delete {cache} and run again")
    assert str(error.value).endswith("or run without train.compile")


@pytest.mark.parametrize(
    "make_error",
    [
        lambda cache: ImportError("No module named 'triton'"),
        lambda cache: OSError(errno.ENOENT, "No such file", f"{cache}_elsewhere/kernel.so"),
        lambda cache: RuntimeError(f"{cache}/kernel.so: file too short"),
    ],
)
def test_other_errors_pass_unchanged(cache, make_error):
    error = make_error(cache)
    with pytest.raises(type(error)) as raised, compile_cache_errors("train.compile"):
        raise error
    assert raised.value is error


def test_a_damaged_cache_stops_a_compiled_training_in_one_line(cache, monkeypatch, tmp_path):
    """The real chain: dynamo compiles the model at its first step, and its backend finds a
    truncated kernel in the cache."""
    real_compile = torch.compile
    monkeypatch.setattr(
        torch,
        "compile",
        lambda model, **options: real_compile(model, backend=load_truncated_kernel),
    )
    recipe = toy_recipe(train={"compile": True}, schedule={"epochs": 1})
    with pytest.raises(UserError) as error:
        fit(recipe, LineTask(), run_dir=tmp_path / "run")
    one_line(error.value, "kernel.so: file too short", f"delete {cache}", "without train.compile")


def test_a_damaged_cache_stops_a_compiled_bench_row_in_one_line(cache, monkeypatch):
    def first_step_loads(model, *args):
        return lambda: load_truncated_kernel()

    monkeypatch.setattr(bench, "make_step", first_step_loads)
    row = BenchRow("debiformer_nano", "fast", "infer", 32, 2, "fp32", "cpu", runtime="compile")
    with pytest.raises(UserError) as error:
        bench.measure(row)
    one_line(error.value, f"delete {cache}")
    assert message(error.value, "bench").endswith("or run without --runtime compile")


@pytest.fixture
def compile_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of each torch.compile call; the model runs eagerly."""
    calls = []

    def recording_compile(model, **options):
        calls.append(options)
        return model

    monkeypatch.setattr(torch, "compile", recording_compile)
    return calls


def test_debiformer_compiles_without_inductors_layout_optimisation(compile_calls):
    """With it, inductor stored DBRA's query-agent attention with the (image, head) index fastest
    and every batched product copied each matrix (results.md, 2026-12-05)."""
    compile_model(torch.nn.Linear(2, 2))
    compile_model(torch.nn.Linear(2, 2), "reduce-overhead")
    assert compile_calls == [
        {"options": {"layout_optimization": False}},
        {"options": {"triton.cudagraphs": True, "layout_optimization": False}},
    ]


def test_training_and_bench_compile_debiformer_so_and_timm_models_as_torch_does(
    compile_calls, tmp_path
):
    fit(toy_recipe(train={"compile": True}, schedule={"epochs": 1}), LineTask(), run_dir=tmp_path)
    for model in ("debiformer_nano", "test_resnet"):
        bench.measure(BenchRow(model, "fast", "infer", 32, 2, "fp32", "cpu", runtime="compile"))
    assert compile_calls == [
        {"options": {"layout_optimization": False}},
        {"options": {"layout_optimization": False}},
        {"mode": "default"},
    ]
