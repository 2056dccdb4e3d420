"""`debiformer profile` and the named regions it splits ops into, on the CPU at tiny sizes."""

import io
import json
from contextlib import nullcontext

import pytest
import torch
from rich.console import Console
from torch.profiler import ProfilerActivity, profile
from typer.testing import CliRunner

from debiformer.cli.main import app
from debiformer.errors import UserError
from debiformer.regions import step
from debiformer.tools import profile as profile_tool
from debiformer.tools.profile import FORWARD, ProfileOptions, attribute_steps, run_profile

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
# What may run outside every step: the profile's own loss, gradient accumulation into the
# parameters, and a view (the crop of the routed agents' padding), which computes nothing.
OUTSIDE_STEPS = {
    "MeanBackward0",
    "torch::autograd::AccumulateGrad",
    "aten::alias",
    "aten::alias (backward)",
}
TINY = {"resolution": 32, "batch_size": 2, "warmup": 1, "iterations": 1}
NANO = {"variant": "debiformer_nano", "device": "cpu", **TINY}


def test_profile_command_writes_dbra_steps_and_a_trace(tmp_path):
    out, trace = tmp_path / "profile.json", tmp_path / "traces" / "trace.json"
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
    assert {row["name"] for row in profiled["outside_steps"]} <= OUTSIDE_STEPS
    assert steps["dbra/region_routing"]["backward_ms"] == 0
    for name in DBRA_STEPS - {"dbra/region_routing"}:
        assert steps[name]["forward_ms"] > 0 and steps[name]["backward_ms"] > 0, name
    assert profiled["forward_ms"] > 0 and profiled["backward_ms"] > 0
    assert profiled["trace"] == str(trace)
    assert "traceEvents" in json.loads(trace.read_text())
    assert [path.name for path in trace.parent.iterdir()] == ["trace.json"]  # no temporary left


@pytest.mark.parametrize(
    ("op", "impl"),
    [
        ("bra", "fast"),
        ("bra", "reference"),
        ("block", "fast"),
        pytest.param("model", "fast", marks=pytest.mark.slow),
    ],
)
def test_profile_steps_cover_the_op(op, impl):
    profiled = run_profile(ProfileOptions(op=op, impl=impl, **NANO))
    outermost = [row for row in profiled["steps"] if row["parent"] is None]
    assert profiled["coverage"] == pytest.approx(sum(row["share"] for row in outermost), abs=1e-3)
    # every operator of the op runs in a step; the coverage's shortfall is time between them
    assert {row["name"] for row in profiled["outside_steps"]} <= OUTSIDE_STEPS
    assert profiled["outside_steps"][0]["ms"] > 0
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


def test_regions_are_empty_contexts_outside_a_profiler():
    assert isinstance(step("anything"), nullcontext)


def test_profile_rejects_an_op_the_stage_lacks():
    with pytest.raises(UserError, match="no BRA"):
        run_profile(ProfileOptions(op="bra", stage=4, **NANO))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"op": "attention"}, "op: unknown op 'attention'"),
        ({"stage": 0}, "stage must be 1 to 4, got 0"),
        ({"stage": 5}, "stage must be 1 to 4, got 5"),
        ({"variant": "debiformer_huge"}, "variant: unknown model 'debiformer_huge'"),
        ({"impl": "faster"}, "impl: unknown implementation 'faster'"),
        ({"precision": "fp16"}, "fp16 needs a CUDA device"),
        ({"device": "tpu"}, "device: unknown device 'tpu'"),
        ({"warmup": 0}, "warmup must be at least 1, got 0"),
        ({"iterations": 0}, "iterations must be at least 1, got 0"),
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
        ({"resolution": 0}, "resolution must be at least 32, got 0"),
    ],
)
def test_profile_options_reject_bad_input(options, message):
    with pytest.raises(UserError, match=message):
        ProfileOptions(**{**NANO, **options})


@pytest.fixture
def no_work(monkeypatch):
    """Fails a test if profiling starts."""

    def started(*args, **kwargs):
        raise AssertionError("the profile ran")

    monkeypatch.setattr(profile_tool, "run_profile", started)


@pytest.mark.parametrize("option", ["--trace", "--json"])
def test_profile_command_checks_output_paths_before_any_work(no_work, tmp_path, option):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for path, problem in ((blocker / "out.json", "cannot create"), (tmp_path, "is a directory")):
        result = CliRunner().invoke(
            app, ["profile", "--variant", "debiformer_nano", "--device", "cpu", option, str(path)]
        )
        assert isinstance(result.exception, UserError)
        assert str(result.exception).startswith(f"{option} ") and problem in str(result.exception)


def test_unwritable_trace_is_a_one_line_error_with_exit_code_2(no_work, run_main, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    trace = blocker / "trace.json"
    code, out, err = run_main("profile", "--device", "cpu", "--trace", str(trace))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --trace {trace}: cannot create")


def test_profile_table_fits_80_columns_without_cutting_anything():
    result = {
        "op": "bra",
        "stage": 3,
        "variant": "debiformer_small",
        "impl": "reference",
        "input_shape": [32, 14, 14, 256],
        "device": "cpu",
        "precision": "fp32",
        "forward_ms": 12345.678,
        "backward_ms": 23456.789,
        "coverage": 0.987,
        "outside_steps": [{"name": "torch::autograd::AccumulateGrad", "ms": 12.345}],
        "peak_mem_mb": 4321.0,
        "peak_mem": "CPU peak RSS rise",
        "steps": [
            {
                "name": "bra/routed_attention",
                "parent": None,
                "forward_ms": 1234.5,
                "backward_ms": 2345.6,
                "share": 0.456,
                "forward_mem_mb": 1234.5,
                "backward_mem_mb": -1234.5,
            },
            {
                "name": "routed_gather",
                "parent": "bra/routed_attention",
                "forward_ms": 123.4,
                "backward_ms": 234.5,
                "share": 0.045,
                "forward_mem_mb": 12.5,
                "backward_mem_mb": -12.5,
            },
        ],
    }
    output = io.StringIO()
    Console(file=output, width=80, force_terminal=False, color_system=None).print(
        profile_tool.profile_table(result)
    )
    text = output.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for cell in ("fwd ms", "bwd ms", "share", "fwd MB", "bwd MB", "2345.60", "-1234.5", "45.6%"):
        assert cell in text
    assert "4321 MB" in text
    assert "Outside every step: torch::autograd::AccumulateGrad 12.35" in " ".join(text.split())
    assert "└ routed_gather (in routed_attention)" in text
