"""`precision: auto`: bf16 where the hardware multiplies bf16 matrices natively (a CPU with AMX, a
GPU with native bf16), else fp32; chosen once per run and said in its first line."""

from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from debiformer import runtime
from debiformer.cli.main import app
from debiformer.engine import fit
from debiformer.errors import UserError
from debiformer.tools import bench, profile
from debiformer.tools.bench import BenchOptions
from debiformer.tools.profile import ProfileOptions
from tests.helpers.toy_task import LineTask, toy_recipe

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def amx(monkeypatch):
    """`amx(flag)`: this CPU has AMX for bf16 (True) or not (False), as torch reports it."""

    def set_amx(flag: bool) -> None:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": flag})

    return set_amx


@pytest.mark.parametrize(
    ("device", "amx_bf16", "cuda_bf16", "expected"),
    [
        (CPU, True, False, ("bf16", "auto → bf16 (CPU with AMX)")),
        (CPU, False, True, ("fp32", "auto → fp32 (CPU without AMX)")),
        (CPU, None, True, ("fp32", "auto → fp32 (CPU without AMX)")),  # torch without the probe
        (CUDA, False, True, ("bf16", "auto → bf16 (CUDA device with native bf16)")),
        (CUDA, True, False, ("fp32", "auto → fp32 (CUDA device without native bf16)")),
        (torch.device("mps"), True, True, ("fp32", "auto → fp32 (mps device)")),
    ],
)
def test_auto_is_bf16_only_where_the_hardware_multiplies_it_natively(
    monkeypatch, device, amx_bf16, cuda_bf16, expected
):
    if amx_bf16 is None:
        monkeypatch.delattr(torch.cpu, "get_capabilities")
    else:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": amx_bf16})
    asked = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return cuda_bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    resolved = runtime.resolve_precision("auto", device)
    assert (resolved, runtime.precision_text("auto", device)) == expected
    assert asked == ([False, False] if device.type == "cuda" else [])  # emulated bf16 is slow
    for fixed in ("fp32", "bf16"):
        assert runtime.resolve_precision(fixed, device) == fixed
    assert runtime.precision_text("fp32", device) == "fp32"


@pytest.mark.parametrize(
    ("machine", "capabilities", "warned"),
    [
        ("x86_64", {"amx_bf16": False, "avx512_bf16": False}, True),  # AVX2, or Ice Lake
        ("x86_64", {"amx_bf16": False, "avx512_bf16": True}, False),
        ("x86_64", {"amx_bf16": True, "avx512_bf16": True}, False),
        ("aarch64", {}, False),  # torch's probe names x86 features only
        ("x86_64", None, False),  # torch without the probe
    ],
)
def test_bf16_on_a_cpu_without_bf16_instructions_is_said_to_be_slow(
    monkeypatch, machine, capabilities, warned
):
    monkeypatch.setattr(runtime.platform, "machine", lambda: machine)
    if capabilities is None:
        monkeypatch.delattr(torch.cpu, "get_capabilities")
    else:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    text = runtime.precision_text("bf16", CPU)
    assert (text != "bf16") == warned
    assert runtime.resolve_precision("bf16", CPU) == "bf16"  # a warning, not a refusal
    if warned:
        assert text.startswith("bf16 (") and "slower than fp32" in text
    assert runtime.precision_text("bf16", CUDA) == "bf16"


def test_an_unknown_precision_names_auto_among_the_choices():
    with pytest.raises(UserError, match="choose one of fp32, bf16, fp16, auto"):
        runtime.resolve_precision("int8", CPU, option="train.precision")


@pytest.mark.parametrize(
    ("has_amx", "precision", "dtype"),
    [(True, "bf16", torch.bfloat16), (False, "fp32", torch.float32)],
)
def test_a_recipe_with_precision_auto_trains_at_the_precision_it_resolves_to(
    tmp_path, amx, capsys, has_amx, precision, dtype
):
    amx(has_amx)
    outputs = []

    class Recording(LineTask):
        def loss(self, model, batch):
            outputs.append(model(batch[0]).dtype)
            return super().loss(model, batch)

    recipe = toy_recipe(train={"precision": "auto"}, schedule={"epochs": 1})
    summary = fit(recipe, Recording(), run_dir=tmp_path / "run")
    assert set(outputs) == {dtype}
    assert summary["precision"] == precision
    reason = "CPU with AMX" if has_amx else "CPU without AMX"
    assert f"precision auto → {precision} ({reason})," in capsys.readouterr().err


def test_bench_and_profile_run_and_record_the_precision_auto_resolves_to(amx):
    options = BenchOptions(models=("debiformer_nano",), device="cpu", precision="auto")
    for has_amx, precision in ((True, "bf16"), (False, "fp32")):
        amx(has_amx)
        assert {row.precision for row in bench.bench_rows(options, CPU)} == {precision}
    amx(True)
    with pytest.raises(UserError, match="runs fp32 on the CPU"):
        replace(options, runtimes=("onnxruntime",))
    tiny = {"resolution": 32, "batch_size": 2, "warmup": 1, "iterations": 1}
    options = ProfileOptions(variant="debiformer_nano", device="cpu", precision="auto", **tiny)
    assert profile.run_profile(options)["precision"] == "bf16"


@pytest.mark.parametrize("command", ["bench", "profile"])
def test_the_commands_take_precision_auto_and_say_what_it_chose(monkeypatch, amx, command):
    amx(False)
    ran = []
    tool, run, table = {
        "bench": (bench, "run_bench", "bench_table"),
        "profile": (profile, "run_profile", "profile_table"),
    }[command]
    monkeypatch.setattr(tool, run, lambda options, **kwargs: ran.append(options) or [])
    monkeypatch.setattr(tool, table, lambda result: "the table")
    result = CliRunner().invoke(app, [command, "--device", "cpu", "--precision", "auto"])
    assert result.exit_code == 0, result.output
    assert [options.precision for options in ran] == ["auto"]
    assert result.output.splitlines() == ["precision auto → fp32 (CPU without AMX)", "the table"]
    monkeypatch.setattr(runtime, "cpu_converts_bf16", lambda: True)
    result = CliRunner().invoke(app, [command, "--device", "cpu", "--precision", "bf16"])
    assert result.output.splitlines() == [
        "precision bf16 (slower than fp32 here: this CPU has no bf16 instructions)",
        "the table",
    ]
    monkeypatch.setattr(runtime, "cpu_converts_bf16", lambda: False)
    result = CliRunner().invoke(app, [command, "--device", "cpu", "--precision", "bf16"])
    assert result.output.splitlines() == ["the table"]


def test_measurements_record_the_machine_they_ran_on(amx):
    amx(True)
    record = runtime.machine(CPU)
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["amx"] is True and record["threads"] == torch.get_num_threads()
    assert record["torch"] == torch.__version__ and record["cpu"]
    assert runtime.machine_text(record).startswith(f"{record['cpu']} (")
    assert "AMX)" in runtime.machine_text(record)
    amx(False)
    assert "no AMX" in runtime.machine_text(runtime.machine(CPU))
