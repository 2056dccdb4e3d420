"""`debiformer bench` and `debiformer profile` on the CPU at tiny sizes."""

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from typer.testing import CliRunner

from cli.main import app
from debiformer import bench
from debiformer.errors import UserError
from debiformer.profile import FORWARD, attribute_steps, run_profile
from debiformer.profiling import step

RECORD_FIELDS = {
    "model",
    "impl",
    "mode",
    "resolution",
    "batch_size",
    "precision",
    "device",
    "params",
    "macs",
    "images_per_s",
    "peak_mem_mb",
}
DBRA_STEPS = {
    "dbra/qkv_projection",
    "dbra/offset_network",
    "dbra/agent_sampling",
    "dbra/region_routing",
    "dbra/agent_attention",
    "dbra/agent_mlp",
    "dbra/query_agent_attention",
    "dbra/output_projection",
}
TINY = {"resolution": 32, "batch_size": 2, "warmup": 1, "iterations": 1}


def test_bench_command_writes_records_measured_in_fresh_processes(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        ["bench", "--models", "debiformer_nano", "--mode", "both", "--resolution", "32"]
        + ["--batch-size", "2", "--warmup", "1", "--iterations", "1", "--device", "cpu"]
        + ["--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())
    assert [(r["model"], r["impl"], r["mode"]) for r in records] == [
        ("debiformer_nano", "fast", "infer"),
        ("debiformer_nano", "fast", "train"),
    ]
    for record in records:
        assert set(record) >= RECORD_FIELDS
        assert (record["resolution"], record["batch_size"], record["precision"]) == (32, 2, "fp32")
        assert record["device"] == "cpu"
        assert record["params"] > 1e6 and record["macs"] > 1e6
        assert record["images_per_s"] > 0 and record["peak_mem_mb"] > 0
    infer, train = records
    assert train["peak_mem_mb"] > infer["peak_mem_mb"]
    assert "debiformer_nano" in result.output


def test_bench_runs_both_implementations_and_timm_models_in_one_table():
    records = bench.run_bench(
        models=["debiformer_nano"],
        compare=["test_resnet"],
        impls=["fast", "reference"],
        modes=["train"],
        device="cpu",
        fresh_process=False,
        **TINY,
    )
    assert [(r["model"], r["impl"]) for r in records] == [
        ("debiformer_nano", "fast"),
        ("debiformer_nano", "reference"),
        ("test_resnet", "-"),
    ]
    assert records[0]["macs"] == records[1]["macs"] != records[2]["macs"]
    table = bench.bench_table(records)
    assert table.row_count == 3


def test_macs_match_the_published_count_of_debiformer_tiny():
    model = bench.build_model("debiformer_tiny")
    assert bench.count_macs(model, 224) == pytest.approx(2.636e9, rel=1e-3)


def test_out_of_memory_halves_the_batch_and_says_so(monkeypatch):
    make_step = bench.make_step
    tried = []

    def fits_two(model, mode, images, labels, precision):
        tried.append(images.shape[0])
        if images.shape[0] > 2:

            def out_of_memory():
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

            return out_of_memory
        return make_step(model, mode, images, labels, precision)

    monkeypatch.setattr(bench, "make_step", fits_two)
    settings = {**TINY, "batch_size": 8}
    (record,) = bench.run_bench(
        models=["debiformer_nano"], device="cpu", fresh_process=False, **settings
    )
    assert tried == [8, 4, 2]
    assert record["batch_size"] == 2
    assert "out of memory at batch 8" in record["note"]
    assert "out of memory at batch 4" in record["note"]
    assert "ran at batch 2" in record["note"]


def test_out_of_memory_at_batch_one_is_a_user_error(monkeypatch):
    def never_fits(model, mode, images, labels, precision):
        def out_of_memory():
            raise torch.OutOfMemoryError("simulated")

        return out_of_memory

    monkeypatch.setattr(bench, "make_step", never_fits)
    with pytest.raises(UserError, match="out of memory"):
        bench.run_bench(models=["debiformer_nano"], device="cpu", fresh_process=False, **TINY)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"models": ["debiformer_huge"]}, "unknown model"),
        ({"compare": ["no_such_timm_model"]}, "unknown timm model"),
        ({"impls": ["faster"]}, "unknown implementation"),
        ({"modes": ["serve"]}, "unknown mode"),
        ({"precision": "fp16"}, "fp16 needs a CUDA device"),
        ({"precision": "int8"}, "unknown precision"),
        ({"device": "tpu"}, "unknown device"),
        ({"grad_checkpointing": (0, 3)}, "--grad-checkpointing takes stages 1-4"),
    ],
)
def test_bench_rejects_bad_input(options, message):
    settings = {"models": ["debiformer_nano"], "device": "cpu", **TINY, **options}
    with pytest.raises(UserError, match=message):
        bench.run_bench(**settings)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_user_error():
    with pytest.raises(UserError, match="no CUDA device"):
        bench.resolve_device("cuda")


def test_profile_command_writes_dbra_steps_and_a_trace(tmp_path):
    out, trace = tmp_path / "profile.json", tmp_path / "trace.json"
    result = CliRunner().invoke(
        app,
        ["profile", "--op", "dbra", "--stage", "1", "--variant", "debiformer_nano"]
        + ["--resolution", "32", "--batch-size", "2", "--warmup", "1", "--iterations", "1"]
        + ["--device", "cpu", "--json", str(out), "--trace", str(trace)],
    )
    assert result.exit_code == 0, result.output
    profiled = json.loads(out.read_text())
    steps = {row["name"]: row for row in profiled["steps"]}
    assert set(steps) >= DBRA_STEPS
    assert profiled["coverage"] >= 0.9
    assert steps["dbra/region_routing"]["backward_ms"] == 0
    for name in DBRA_STEPS - {"dbra/region_routing"}:
        assert steps[name]["forward_ms"] > 0 and steps[name]["backward_ms"] > 0, name
    assert profiled["forward_ms"] > 0 and profiled["backward_ms"] > 0
    assert "traceEvents" in json.loads(trace.read_text())


@pytest.mark.parametrize(
    ("op", "impl"), [("bra", "fast"), ("bra", "reference"), ("block", "fast"), ("model", "fast")]
)
def test_profile_steps_cover_the_op(op, impl):
    profiled = run_profile(
        op=op,
        variant="debiformer_nano",
        device="cpu",
        impl=impl,
        resolution=32,
        batch_size=2,
        warmup=1,
        iterations=1,
    )
    outermost = [row for row in profiled["steps"] if row["parent"] is None]
    assert profiled["coverage"] == pytest.approx(sum(row["share"] for row in outermost), abs=1e-3)
    assert profiled["coverage"] >= 0.9
    if op == "bra":
        gather = next(row for row in profiled["steps"] if row["name"] == "routed_gather")
        assert gather["parent"] == "bra/routed_attention"
        assert gather["backward_ms"] > 0


def test_backward_time_goes_to_the_step_that_created_the_node():
    weight = torch.randn(256, 256, requires_grad=True)
    inputs = torch.randn(256, 256)

    def is_step(name):
        return name.startswith("t/")

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        with torch.profiler.record_function(FORWARD):
            with step("t/light"):
                torch.zeros_like(weight)
            with step("t/heavy"):
                output = (inputs @ weight).tanh()
        with torch.profiler.record_function("profile/backward"):
            output.sum().backward()
    steps = attribute_steps(list(profiler.events()), is_step, torch.device("cpu"))
    assert steps.time["backward"].get("t/light", 0) == 0
    assert steps.time["backward"]["t/heavy"] > 0


def test_profile_rejects_an_op_the_stage_lacks():
    with pytest.raises(UserError, match="no BRA"):
        run_profile(op="bra", stage=4, variant="debiformer_nano", device="cpu", **TINY)
