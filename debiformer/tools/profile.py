"""`debiformer profile`: forward and backward time and memory of each named step of one op
(a DBRA or BRA attention, a block, or the whole model) under the PyTorch profiler.

The steps are the `debiformer.regions.step` regions in the model code. A step's forward time
is the time of its regions. Its backward time is that of the autograd nodes its forward ops
created: the profiler tags each forward op and each backward node with the autograd sequence
number, which links them. Steps can nest (`routed_gather` inside the attention that runs it);
the coverage is the share of the op's measured time that its outermost steps account for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table
from torch import Tensor, nn
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, record_function
from torch.profiler import profile as torch_profile

import debiformer
from debiformer.errors import UserError
from debiformer.model import BiLevelRoutingAttention
from debiformer.routing import IMPLEMENTATIONS, implementation
from debiformer.runtime import (
    atomic_writer,
    autocast,
    check_precision,
    keep_freed_memory,
    machine,
    peak_memory,
    resolve_precision,
    select_device,
    synchronize,
)
from debiformer.tools.common import MIN_RESOLUTION, check_at_least, fitting_table, memory_kind
from debiformer.weights import ModelSpec, build_model

OPS = ("dbra", "bra", "block", "model")
FORWARD = "profile/forward"
BACKWARD = "profile/backward"
BACKWARD_NODE = "autograd::engine::evaluate_function"
ROUTED_GATHER = "routed_gather"


@dataclass(frozen=True)
class ProfileOptions:
    """What `debiformer profile` measures and how. Checked when made: a bad name or value is a
    one-line `UserError` before any work.

    `op` of the first block of `stage` (ignored for "model") of DeBiFormer `variant`, fed the
    input it gets in the model at `resolution`. `warmup` iterations (at least one: peak memory
    is measured over them) run outside the profiler, `iterations` inside; `trace` is where to
    write a Chrome trace of the profiled iterations, if anywhere.
    """

    op: str = "dbra"
    stage: int = 1
    variant: str = "debiformer_tiny"
    resolution: int = 224
    batch_size: int = 8
    device: str = "auto"
    precision: str = "fp32"
    impl: str = "fast"
    warmup: int = 2
    iterations: int = 5
    trace: Path | None = None

    def __post_init__(self) -> None:
        check_precision(self.precision, select_device(self.device))
        if self.op not in OPS:
            raise UserError(f": unknown op {self.op!r}; choose one of {', '.join(OPS)}", about="op")
        if not 1 <= self.stage <= 4:
            raise UserError(f"must be 1 to 4, got {self.stage}", about="stage")
        if self.variant not in debiformer.list_models():
            raise UserError(
                f": unknown model {self.variant!r}; "
                f"choose from {', '.join(debiformer.list_models())}",
                about="variant",
            )
        if self.impl not in IMPLEMENTATIONS:
            raise UserError(
                f": unknown implementation {self.impl!r}; choose from {', '.join(IMPLEMENTATIONS)}",
                about="impl",
            )
        check_at_least("resolution", self.resolution, MIN_RESOLUTION)
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("warmup", self.warmup, 1)
        check_at_least("iterations", self.iterations, 1)


def _stage_size(resolution: int, stage: int) -> int:
    """Side of the stage's feature map: the stem's two and each downsample's stride-2 convs."""
    size = resolution
    for _ in range(stage + 1):
        size = (size - 1) // 2 + 1
    return size


def build_op(
    op: str, variant: str, stage: int, resolution: int, batch_size: int, device: torch.device
) -> tuple[nn.Module, Tensor]:
    """The module to profile and a random input for it, as the model would feed it.

    dbra: the second attention of the stage's first block; bra: its first attention, where
    that is a BRA; block: that block; model: the whole network on images. `op` and `stage` are
    those of a `ProfileOptions`.
    """
    model = build_model(ModelSpec(variant))[0].to(device).train()
    if op == "model":
        return model, torch.randn(batch_size, 3, resolution, resolution, device=device)
    block = model.stages[stage - 1][0]
    size = _stage_size(resolution, stage)
    dim = model.arch.dims[stage - 1]
    if op == "block":
        return block, torch.randn(batch_size, size, size, dim, device=device, requires_grad=True)
    attention = block.attn2 if op == "dbra" else block.attn1
    if op == "bra" and not isinstance(attention, BiLevelRoutingAttention):
        raise UserError(
            f"stage {stage} of {variant} has no BRA (its blocks are all DBRA); pick another stage"
        )
    return attention, torch.randn(batch_size, size, size, dim, device=device, requires_grad=True)


def _ancestors(event: FunctionEvent) -> list[FunctionEvent]:
    """The events enclosing `event`, innermost first."""
    chain = []
    parent = event.cpu_parent
    while parent is not None:
        chain.append(parent)
        parent = parent.cpu_parent
    return chain


def _phase(event: FunctionEvent) -> str | None:
    """ "forward", "backward", or None for events outside both (setup, the optimizer...)."""
    for outer in [event, *_ancestors(event)]:
        if outer.name == FORWARD:
            return "forward"
        if outer.name == BACKWARD or outer.name.startswith(BACKWARD_NODE):
            return "backward"
    return None


class _StepTimes:
    """Per-step sums of time (µs) and net memory (bytes) over the profiled iterations."""

    def __init__(self, is_step, device: torch.device):
        self.is_step = is_step
        self.cuda = device.type == "cuda"
        self.order: list[str] = []
        self.parent: dict[str, str | None] = {}
        self.time = {"forward": {}, "backward": {}}
        self.memory = {"forward": {}, "backward": {}}
        self.total = {"forward": 0.0, "backward": 0.0}
        self.outside: dict[str, float] = {}

    def add_outside(self, name: str, event: FunctionEvent) -> None:
        """Count `event` towards the work outside every step, under `name`."""
        self.outside[name] = self.outside.get(name, 0.0) + self.duration(event)

    def duration(self, event: FunctionEvent) -> float:
        """Device time (kernels) on CUDA, wall time on the CPU; inclusive of nested events."""
        return event.device_time_total if self.cuda else event.cpu_time_total

    def net_memory(self, event: FunctionEvent) -> int:
        """Bytes allocated minus freed inside the event."""
        return event.device_memory_usage if self.cuda else event.cpu_memory_usage

    def add(self, phase: str, name: str, event: FunctionEvent) -> None:
        """Count `event` (a step region, or a backward node) towards step `name`."""
        if name not in self.parent:
            self.order.append(name)
            self.parent[name] = next(
                (outer.name for outer in _ancestors(event) if self.is_step(outer.name)), None
            )
        self.time[phase][name] = self.time[phase].get(name, 0.0) + self.duration(event)
        self.memory[phase][name] = self.memory[phase].get(name, 0) + self.net_memory(event)


def attribute_steps(events: list[FunctionEvent], is_step, device: torch.device) -> _StepTimes:
    """Forward and backward time and memory of each step in the profiled `events`."""
    steps = _StepTimes(is_step, device)
    events = sorted(events, key=lambda event: event.time_range.start)
    node_owner: dict[int, FunctionEvent] = {}
    for event in events:
        phase = _phase(event)
        if event.name == FORWARD:
            steps.total["forward"] += steps.duration(event)
        elif phase == "forward" and event.sequence_nr >= 0:
            # The op that created autograd node N is the last forward op tagged N.
            node_owner[event.sequence_nr] = event
        if is_step(event.name) and phase is not None:
            steps.add(phase, event.name, event)
        elif phase == "forward" and _is_outermost_op(event, is_step):
            steps.add_outside(event.name, event)
    for event in events:
        if not event.name.startswith(BACKWARD_NODE) or any(
            outer.name.startswith(BACKWARD_NODE) for outer in _ancestors(event)
        ):
            continue
        steps.total["backward"] += steps.duration(event)
        owner = node_owner.get(event.sequence_nr)
        owning_steps = [
            outer.name for outer in (_ancestors(owner) if owner else []) if is_step(outer.name)
        ]
        for name in owning_steps:
            steps.add("backward", name, event)
        if not owning_steps:
            # Named by the forward op that made the node, or, for nodes made outside the forward
            # pass (the loss, gradient accumulation into parameters), by the node itself.
            steps.add_outside(
                f"{owner.name} (backward)" if owner else event.name.split(": ")[-1], event
            )
    return steps


def _is_outermost_op(event: FunctionEvent, is_step) -> bool:
    """Whether `event` is an operator called directly by the op's code outside every step."""
    return event.name.startswith("aten::") and not any(
        outer.name.startswith("aten::") or is_step(outer.name) for outer in _ancestors(event)
    )


def _step_filter(op: str):
    """Which region names are steps of `op`: its own prefix, and the routed gather for attention."""
    prefix = op + "/"
    if op in ("dbra", "bra"):
        return lambda name: name.startswith(prefix) or name == ROUTED_GATHER
    return lambda name: name.startswith(prefix)


def run_profile(options: ProfileOptions) -> dict:
    """Profiles forward + backward of the op of `options`: per-step times (ms per iteration),
    shares and memory, and the Chrome trace if `options.trace` names a file.

    Peak memory is measured over the warm-up iterations, outside the profiler.
    """
    device = select_device(options.device)
    precision = resolve_precision(options.precision, device)
    keep_freed_memory()
    torch.manual_seed(0)

    def forward_backward() -> None:
        with record_function(FORWARD), autocast(device, precision):
            output = module(inputs)
        with record_function(BACKWARD):
            output.float().mean().backward()
        module.zero_grad(set_to_none=True)
        inputs.grad = None
        synchronize(device)

    with implementation(options.impl):
        with peak_memory(device) as peak:
            module, inputs = build_op(
                options.op,
                options.variant,
                options.stage,
                options.resolution,
                options.batch_size,
                device,
            )
            for _ in range(options.warmup):
                forward_backward()
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with torch_profile(activities=activities, profile_memory=True) as profiler:
            for _ in range(options.iterations):
                forward_backward()
    if options.trace is not None:
        # The profiler writes to a file name: that of the atomic writer's temporary file, which
        # replaces `options.trace` once written.
        with atomic_writer(options.trace) as file:
            profiler.export_chrome_trace(file.name)
    steps = attribute_steps(list(profiler.events()), _step_filter(options.op), device)
    return _profile_record(steps, options.iterations, peak["mb"]) | {
        "op": options.op,
        "stage": None if options.op == "model" else options.stage,
        "variant": options.variant,
        "impl": options.impl,
        "resolution": options.resolution,
        "batch_size": options.batch_size,
        "input_shape": list(inputs.shape),
        "device": device.type,
        "precision": precision,
        "peak_mem": memory_kind(device),
        "warmup": options.warmup,
        "iterations": options.iterations,
        "trace": str(options.trace) if options.trace is not None else None,
        "machine": machine(device),
    }


def _profile_record(steps: _StepTimes, iterations: int, peak_mb: float) -> dict:
    """Per-iteration milliseconds and MB of the op and of each step, with shares and coverage."""
    total_us = steps.total["forward"] + steps.total["backward"]
    rows = []
    for name in steps.order:
        forward_us = steps.time["forward"].get(name, 0.0)
        backward_us = steps.time["backward"].get(name, 0.0)
        rows.append(
            {
                "name": name,
                "parent": steps.parent[name],
                "forward_ms": round(forward_us / iterations / 1000, 3),
                "backward_ms": round(backward_us / iterations / 1000, 3),
                "share": round((forward_us + backward_us) / total_us, 4) if total_us else 0.0,
                "forward_mem_mb": round(
                    steps.memory["forward"].get(name, 0) / iterations / 2**20, 2
                ),
                "backward_mem_mb": round(
                    steps.memory["backward"].get(name, 0) / iterations / 2**20, 2
                ),
            }
        )
    covered = sum(row["share"] for row in rows if row["parent"] is None)
    outside = sorted(steps.outside.items(), key=lambda item: -item[1])
    return {
        "forward_ms": round(steps.total["forward"] / iterations / 1000, 3),
        "backward_ms": round(steps.total["backward"] / iterations / 1000, 3),
        "coverage": round(covered, 4),
        "outside_steps": [
            {"name": name, "ms": round(us / iterations / 1000, 3)} for name, us in outside
        ],
        "peak_mem_mb": round(peak_mb, 1),
        "steps": rows,
    }


PROFILE_COLUMNS = (
    ("step", "left"),
    ("fwd ms", "right"),
    ("bwd ms", "right"),
    ("share", "right"),
    ("fwd MB", "right"),
    ("bwd MB", "right"),
)


def profile_table(result: dict) -> Table:
    """The profile as a table: one row per step (nested steps indented, names without the op's
    prefix), then the op's totals, with the units in its caption."""
    where = "" if result["stage"] is None else f" stage {result['stage']}"
    title = (
        f"{result['op']}{where} of {result['variant']} ({result['impl']}), input "
        f"{'×'.join(map(str, result['input_shape']))}, {result['device']} {result['precision']}"
    )
    caption = (
        "fwd/bwd ms: milliseconds per iteration in the forward/backward pass; share: of the op's "
        "forward + backward time; fwd/bwd MB: net memory the step's forward/backward leaves "
        f"allocated. Peak memory {result['peak_mem_mb']:.0f} MB "
        f"({result['peak_mem']}, over the warm-up). Outside every step: "
        + (
            ", ".join(f"{row['name']} {row['ms']:.2f} ms" for row in result["outside_steps"][:3])
            or "none"
        )
    )
    table = fitting_table(title, caption, PROFILE_COLUMNS)
    prefix = f"{result['op']}/"
    for row in result["steps"]:
        name = row["name"].removeprefix(prefix)
        if row["parent"] is not None:
            name = f"└ {name} (in {row['parent'].removeprefix(prefix)})"
        table.add_row(
            name,
            f"{row['forward_ms']:.2f}",
            f"{row['backward_ms']:.2f}",
            f"{row['share']:.1%}",
            f"{row['forward_mem_mb']:.1f}",
            f"{row['backward_mem_mb']:.1f}",
        )
    table.add_section()
    table.add_row(
        f"{result['op']} (steps cover {result['coverage']:.1%})",
        f"{result['forward_ms']:.2f}",
        f"{result['backward_ms']:.2f}",
        "100%",
        "",
        "",
    )
    return table
