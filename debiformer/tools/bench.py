"""`debiformer bench`: images/s, ms per batch, peak memory, parameters and MACs of DeBiFormer
variants (and timm models to compare with), in inference or training, as records and a table.

Each row (model × routed-attention implementation × mode) is warmed up, then timed over several
iterations with the device synchronised around every step; the median step time gives images/s.
Peak memory is what the row (model, optimizer state, data, activations) adds: over what was
allocated before, the CUDA allocator's maximum on a GPU, the process's peak resident set size on
the CPU (`debiformer.runtime.peak_memory`). Memory freed by one row stays in the CPU process for
the next to reuse unseen, so each CPU row runs in a fresh Python process
(`python -m debiformer.tools.bench`) by default.

A row runs its model in one of four runtimes: eager PyTorch, `torch.compile`, `torch.compile`
with CUDA graphs (`cudagraphs`, its "reduce-overhead" mode: each step's kernels replayed as one
graph, on a GPU), or onnxruntime on the CPU (the model exported to ONNX and checked against
PyTorch by `debiformer.tools.export` first, then run with as many threads as PyTorch uses;
inference, fp32, DeBiFormer models).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import debiformer
from debiformer.engine.schedule import adamw
from debiformer.errors import UserError, mention
from debiformer.routing import IMPLEMENTATIONS, implementation
from debiformer.runtime import (
    autocast,
    check_precision,
    compile_cache_errors,
    compile_model,
    keep_freed_memory,
    machine,
    machine_text,
    peak_memory,
    resolve_precision,
    select_device,
    synchronize,
    write_json,
)
from debiformer.tools.common import (
    MIN_RESOLUTION,
    check_at_least,
    figure,
    fitting_table,
    memory_kind,
)
from debiformer.tools.export import (
    ExportOptions,
    export_model,
    onnx_session,
    require_onnx_packages,
)
from debiformer.weights import ModelSpec, build_model

MODES = ("infer", "train")
RUNTIMES = ("eager", "compile", "cudagraphs", "onnxruntime")
# the runtimes that torch.compile the model, and the mode of each
COMPILE_MODES = {"compile": "default", "cudagraphs": "reduce-overhead"}
DEFAULT_MODELS = ("debiformer_tiny", "debiformer_small", "debiformer_base")
NO_IMPL = "-"
WORKER = "debiformer.tools.bench"


class OutOfMemory(Exception):
    """A row did not fit in memory at the batch size it was tried with."""


def is_debiformer(name: str) -> bool:
    """Whether `name` is one of this package's variants (others are built by timm)."""
    return name in debiformer.list_models()


def check_timm_model(name: str, resolution: int) -> None:
    """Rejects a name that timm does not know, and a model made for one input size that cannot
    be made for `resolution`² (built on the meta device: no memory, a fraction of a second)."""
    if not timm.list_models(name):
        raise UserError(f": unknown timm model {name!r} (see timm.list_models())", about="compare")
    if _fixed_input_size(name, resolution):
        with torch.device("meta"):
            _timm_model(name, resolution)


def _fixed_input_size(name: str, resolution: int) -> int | None:
    """The side of the only input size timm's model `name` is made for (Swin, ViT: timm's
    `fixed_input_size`), where it is not `resolution`; else None."""
    config = timm.models.get_pretrained_cfg(name)
    if config is None or not config.fixed_input_size or config.input_size[1:] == (resolution,) * 2:
        return None
    return config.input_size[1]


def _timm_model(name: str, resolution: int) -> nn.Module:
    """timm's model `name`, randomly initialised, for `resolution`² images: one made for another
    input size is made for this one, where it takes the size as `img_size`."""
    side = _fixed_input_size(name, resolution)
    if side is None:
        return timm.create_model(name, pretrained=False)
    try:
        return timm.create_model(name, pretrained=False, img_size=resolution)
    except TypeError as error:
        raise UserError(
            f"{resolution}: timm's {name} takes {side}² images only ({error}); measure it at "
            "that resolution",
            about="resolution",
        ) from None


@dataclass(frozen=True)
class BenchOptions:
    """What `debiformer bench` measures and how. Checked when made: a bad name or value is a
    one-line `UserError` before any work.

    `models`: DeBiFormer variants, each run with every routed-attention implementation in
    `impls`; `compare`: timm models, built without weights. `grad_checkpointing`: DeBiFormer
    stages whose attention and MLP branches are recomputed in the backward pass (train mode).
    `runtimes`: each row runs in each of them (eager PyTorch, `torch.compile`, `torch.compile`
    with CUDA graphs on a GPU, onnxruntime; the last for DeBiFormer models with the fast
    implementation only, in inference at fp32 on the CPU).
    `fresh_process` (None: on the CPU) measures each row in a new process so that its CPU peak
    memory is its own; in-process CPU peaks are a lower bound after a larger one. `rounds`
    measures the whole table that many times, row after row, and reports each row's median
    round: on a machine whose speed drifts over minutes, every row then meets the same drift.
    """

    models: tuple[str, ...] = DEFAULT_MODELS
    compare: tuple[str, ...] = ()
    impls: tuple[str, ...] = ("fast",)
    modes: tuple[str, ...] = ("infer",)
    resolution: int = 224
    batch_size: int = 32
    precision: str = "fp32"
    device: str = "auto"
    channels_last: bool = False
    runtimes: tuple[str, ...] = ("eager",)
    grad_checkpointing: tuple[int, ...] = ()
    warmup: int = 2
    iterations: int = 10
    rounds: int = 1
    fresh_process: bool | None = None

    def __post_init__(self) -> None:
        for name in ("models", "compare", "impls", "modes", "runtimes", "grad_checkpointing"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        check_precision(self.precision, select_device(self.device))
        if not self.models and not self.compare:
            raise UserError(
                f": nothing to measure; name a DeBiFormer variant or {mention('compare')}",
                about="models",
            )
        if not self.impls or not self.modes:
            raise UserError(": give at least one", about="impls" if not self.impls else "modes")
        for name in self.models:
            if not is_debiformer(name):
                raise UserError(
                    f": unknown model {name!r}; choose from {', '.join(debiformer.list_models())} "
                    f"(timm models go in {mention('compare')})",
                    about="models",
                )
        for impl in self.impls:
            if impl not in IMPLEMENTATIONS:
                raise UserError(
                    f": unknown implementation {impl!r}; choose from {', '.join(IMPLEMENTATIONS)}",
                    about="impls",
                )
        for mode in self.modes:
            if mode not in MODES:
                raise UserError(
                    f": unknown mode {mode!r}; choose infer, train or both", about="modes"
                )
        check_at_least("resolution", self.resolution, MIN_RESOLUTION)
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("warmup", self.warmup, 0)
        check_at_least("iterations", self.iterations, 1)
        check_at_least("rounds", self.rounds, 1)
        if not set(self.grad_checkpointing) <= {1, 2, 3, 4}:
            raise UserError(
                f"takes stages 1-4, got {list(self.grad_checkpointing)}", about="grad_checkpointing"
            )
        for name in self.compare:
            check_timm_model(name, self.resolution)
        self._check_runtimes()

    def _check_runtimes(self) -> None:
        """Rejects an unknown runtime, and CUDA graphs or onnxruntime where they cannot run."""
        if not self.runtimes:
            raise UserError(": give at least one", about="runtimes")
        for runtime in self.runtimes:
            if runtime not in RUNTIMES:
                raise UserError(
                    f": unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}",
                    about="runtimes",
                )
        if "cudagraphs" in self.runtimes and select_device(self.device).type != "cuda":
            raise UserError(
                f"{mention('runtimes', 'cudagraphs')} replays CUDA graphs: use "
                f"{mention('device', 'cuda')} on a machine with an NVIDIA GPU"
            )
        if "onnxruntime" not in self.runtimes:
            return
        onnxruntime = mention("runtimes", "onnxruntime")
        if "train" in self.modes:
            raise UserError(
                f"{onnxruntime} measures inference only: use {mention('modes', 'infer')}"
            )
        device = select_device(self.device)
        if resolve_precision(self.precision, device) != "fp32" or device.type != "cpu":
            raise UserError(
                f"{onnxruntime} runs fp32 on the CPU: use {mention('device', 'cpu')} and "
                f"{mention('precision', 'fp32')}"
            )
        if not self.models or "fast" not in self.impls:
            raise UserError(f"{onnxruntime} runs DeBiFormer models with {mention('impls', 'fast')}")
        require_onnx_packages("runtimes", "onnxruntime")


@dataclass(frozen=True)
class BenchRow:
    """One row of the benchmark: one model, implementation and mode, and how to run it
    (`onnx_file`: the exported model an onnxruntime row runs)."""

    model: str
    impl: str
    mode: str
    resolution: int
    batch_size: int
    precision: str
    device: str
    channels_last: bool = False
    runtime: str = "eager"
    grad_checkpointing: tuple[int, ...] = ()
    warmup: int = 2
    iterations: int = 10
    onnx_file: str = ""


def bench_rows(options: BenchOptions, device: torch.device) -> list[BenchRow]:
    """Every row to measure: each mode, then each DeBiFormer model × implementation, then each
    timm model, each in every runtime (onnxruntime: DeBiFormer's fast implementation only), at
    the precision that `options.precision` is on `device`."""
    names = [(name, impl) for name in options.models for impl in options.impls]
    names += [(name, NO_IMPL) for name in options.compare]
    settings = dict(
        resolution=options.resolution,
        batch_size=options.batch_size,
        precision=resolve_precision(options.precision, device),
        device=device.type,
        channels_last=options.channels_last,
        grad_checkpointing=options.grad_checkpointing,
        warmup=options.warmup,
        iterations=options.iterations,
    )
    return [
        BenchRow(model=name, impl=impl, mode=mode, runtime=runtime, **settings)
        for mode in options.modes
        for name, impl in names
        for runtime in options.runtimes
        if runtime != "onnxruntime" or impl == "fast"
    ]


def build_benchmark_model(name: str, resolution: int) -> nn.Module:
    """A DeBiFormer variant or a timm model (`_timm_model`), randomly initialised, 1000 classes,
    for images of `resolution`² pixels. Names come from `BenchOptions`, which checked them."""
    if is_debiformer(name):
        return build_model(ModelSpec(name))[0]
    return _timm_model(name, resolution)


def count_macs(model: nn.Module, resolution: int) -> int:
    """Multiply-accumulates (matmuls and convolutions) of one image's forward pass at fp32.

    DeBiFormer is counted with the reference routed attention, which computes exactly the
    routed products; the fast path sometimes runs a masked dense product instead (a few % more).
    """
    images = torch.randn(1, 3, resolution, resolution)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), implementation("reference"), counter:
        model.eval()(images)
    return counter.get_total_flops() // 2


def model_size(name: str, resolution: int) -> tuple[int, int]:
    """Parameters and MACs per image of model `name`."""
    model = build_benchmark_model(name, resolution)
    params = sum(parameter.numel() for parameter in model.parameters())
    return params, count_macs(model, resolution)


def make_step(
    model: nn.Module, mode: str, images: torch.Tensor, labels: torch.Tensor, precision: str
) -> Callable[[], None]:
    """One benchmark step: an inference forward, or forward + backward + AdamW step."""
    device = images.device
    if mode == "infer":
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast(device, precision):
                model(images)

        return infer

    model.train()
    optimizer = adamw(model, model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def train() -> None:
        with autocast(device, precision):
            loss = F.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return train


def time_steps(
    run_step: Callable[[], None], warmup: int, iterations: int, device: torch.device
) -> list[float]:
    """Seconds of each of `iterations` synchronised steps after `warmup` untimed ones."""
    for _ in range(warmup):
        run_step()
    synchronize(device)
    seconds = []
    for _ in range(iterations):
        start = time.perf_counter()
        run_step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def _is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OOM error, or the CPU allocator's failure to allocate."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in message or "not enough memory" in message
    )


def export_for_onnxruntime(row: BenchRow, folder: str) -> str:
    """The row's model (random weights, seed 0) exported to ONNX in `folder` with a dynamic batch
    and checked against PyTorch (`debiformer.tools.export`); returns the file's path."""
    path = Path(folder) / f"{row.model}_{row.resolution}.onnx"
    export_model(
        ExportOptions(out=path, model=row.model, resolution=row.resolution, dynamic_batch=True)
    )
    return str(path)


def _timed_onnxruntime_steps(row: BenchRow) -> tuple[list[float], float]:
    """Times onnxruntime's CPU runs of `row.onnx_file` with PyTorch's number of threads; seconds
    per step and the peak MB that the session (weights included) and its runs add."""
    images = torch.randn(row.batch_size, 3, row.resolution, row.resolution).numpy()
    cpu = torch.device("cpu")
    with peak_memory(cpu) as peak:
        session = onnx_session(row.onnx_file, threads=torch.get_num_threads())
        feed = {session.get_inputs()[0].name: images}
        seconds = time_steps(lambda: session.run(None, feed), row.warmup, row.iterations, cpu)
    return seconds, peak["mb"]


def _timed_steps(row: BenchRow) -> tuple[list[float], float]:
    """Builds the model and data of `row` and times its steps; seconds per step and peak MB."""
    device = torch.device(row.device)
    torch.manual_seed(0)
    if row.runtime == "onnxruntime":
        return _timed_onnxruntime_steps(row)
    memory_format = torch.channels_last if row.channels_last else torch.contiguous_format
    size = (row.batch_size, 3, row.resolution, row.resolution)
    with peak_memory(device) as peak:
        model = build_benchmark_model(row.model, row.resolution)
        model = model.to(device, memory_format=memory_format)
        if row.grad_checkpointing and is_debiformer(row.model):
            model.set_grad_checkpointing(stages=row.grad_checkpointing)
        if row.runtime in COMPILE_MODES:
            mode = COMPILE_MODES[row.runtime]
            if is_debiformer(row.model):
                model = compile_model(model, mode)
            else:
                model = torch.compile(model, mode=mode)
        images = torch.randn(size, device=device).contiguous(memory_format=memory_format)
        labels = torch.randint(0, 1000, (row.batch_size,), device=device)
        run_step = make_step(model, row.mode, images, labels, row.precision)
        if row.runtime == "cudagraphs":
            run_step = _marking_new_steps(run_step)
        with (
            implementation(row.impl if row.impl != NO_IMPL else "fast"),
            compile_cache_errors(mention("runtimes", row.runtime)),
        ):
            seconds = time_steps(run_step, row.warmup, row.iterations, device)
    return seconds, peak["mb"]


def _marking_new_steps(run_step: Callable[[], None]) -> Callable[[], None]:
    """`run_step` that first tells CUDA graphs a new step begins (the last step's outputs, which
    nothing keeps, may be overwritten)."""

    def marked_step() -> None:
        torch.compiler.cudagraph_mark_step_begin()
        run_step()

    return marked_step


def measure(row: BenchRow) -> dict:
    """Times one row in this process: ms per batch, images/s and peak memory.

    Raises `OutOfMemory` when it does not fit at `row.batch_size`. Freed host memory is kept
    for reuse, as in training (`keep_freed_memory`; the record says whether it applied).
    """
    kept = keep_freed_memory()
    try:
        seconds, peak_mb = _timed_steps(row)
    except Exception as error:
        if not _is_out_of_memory(error):
            raise
        seconds = None
    if seconds is None:
        gc.collect()
        if row.device == "cuda":
            torch.cuda.empty_cache()
        raise OutOfMemory(f"out of memory at batch {row.batch_size}")
    step_s = statistics.median(seconds)
    return {
        "ms_per_batch": round(step_s * 1000, 2),
        "images_per_s": round(row.batch_size / step_s, 2),
        "peak_mem_mb": round(peak_mb, 1),
        "keeps_freed_memory": kept,
    }


def _package_root() -> str:
    """The directory holding the `debiformer` package, for the worker's PYTHONPATH."""
    return str(Path(debiformer.__file__).resolve().parent.parent)


def measure_in_fresh_process(row: BenchRow) -> dict:
    """`measure` in a new Python process, so that its peak RSS belongs to this row."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_package_root(), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        command = [sys.executable, "-m", WORKER, json.dumps(asdict(row)), str(result_path)]
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        if completed.returncode == -signal.SIGKILL:
            raise OutOfMemory(f"killed at batch {row.batch_size} (out of memory?)")
        if not result_path.exists():
            raise RuntimeError(f"benchmark worker failed:\n{completed.stderr[-4000:]}")
        result = json.loads(result_path.read_text())
    if "out_of_memory" in result:
        raise OutOfMemory(result["out_of_memory"])
    if "error" in result:
        raise UserError(result["error"], about=result["about"])
    return result


def measure_with_backoff(row: BenchRow, fresh_process: bool) -> tuple[BenchRow, dict, str]:
    """Measures, halving the batch after each out-of-memory; returns the row that ran, its
    measurements and a note on the halvings ("" when there were none)."""
    halvings = []
    while True:
        try:
            result = measure_in_fresh_process(row) if fresh_process else measure(row)
        except OutOfMemory as error:
            if row.batch_size == 1:
                raise UserError(f"{row.model}: {error}; nothing smaller to try") from None
            halvings.append(str(error))
            row = replace(row, batch_size=row.batch_size // 2)
            continue
        note = f"{'; '.join(halvings)}: ran at batch {row.batch_size}" if halvings else ""
        return row, result, note


def run_bench(options: BenchOptions, on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Measures every row of `options`; returns one record per row, in table order.
    `on_record` is called after every measurement with the row's record so far (its median over
    the rounds measured; `round` and `round_images_per_s`: this round's). onnxruntime rows run a file
    exported once per model in this process, so that a fresh process's memory is the session's."""
    with tempfile.TemporaryDirectory() as folder:
        return _run_rows(options, folder, on_record)


def _run_rows(
    options: BenchOptions, folder: str, on_record: Callable[[dict], None] | None
) -> list[dict]:
    """`run_bench` with exported ONNX files kept in `folder`."""
    device = select_device(options.device)
    fresh_process = options.fresh_process
    if fresh_process is None:
        fresh_process = device.type == "cpu"
    sizes: dict[str, tuple[int, int]] = {}
    onnx_files: dict[str, str] = {}
    rows = bench_rows(options, device)
    for index, row in enumerate(rows):
        if row.model not in sizes:
            sizes[row.model] = model_size(row.model, row.resolution)
        if row.runtime == "onnxruntime":
            if row.model not in onnx_files:
                onnx_files[row.model] = export_for_onnxruntime(row, folder)
            rows[index] = replace(row, onnx_file=onnx_files[row.model])
    ran_on = machine(device)
    rounds: list[list[dict]] = [[] for _ in rows]
    notes = [""] * len(rows)
    records = []
    for round_number in range(1, options.rounds + 1):
        for index, row in enumerate(rows):
            # a batch halved after out-of-memory stays halved in the later rounds
            rows[index], result, note = measure_with_backoff(row, fresh_process)
            rounds[index].append(result)
            notes[index] = notes[index] or note
            record = _record(rows[index], rounds[index], notes[index], sizes, device) | {
                "machine": ran_on
            }
            if on_record is not None:
                on_record(
                    record | {"round": round_number, "round_images_per_s": result["images_per_s"]}
                )
            if round_number == options.rounds:
                records.append(record)
    return records


def _record(
    ran: BenchRow,
    results: list[dict],
    note: str,
    sizes: dict[str, tuple[int, int]],
    device: torch.device,
) -> dict:
    """One row's record from its rounds' measurements: the median round's speed (of an even
    number, the faster middle one; all rounds' images/s listed when more than one), the largest
    peak memory."""
    params, macs = sizes[ran.model]
    median = sorted(results, key=lambda result: result["ms_per_batch"])[(len(results) - 1) // 2]
    record = {
        "model": ran.model,
        "impl": ran.impl,
        "mode": ran.mode,
        "resolution": ran.resolution,
        "batch_size": ran.batch_size,
        "precision": ran.precision,
        "device": ran.device,
        "channels_last": ran.channels_last,
        "runtime": ran.runtime,
        "compile": ran.runtime in COMPILE_MODES,
        "grad_checkpointing": list(ran.grad_checkpointing),
        "params": params,
        "macs": macs,
        **median,
        "peak_mem_mb": max(result["peak_mem_mb"] for result in results),
        "peak_mem": memory_kind(device),
        "warmup": ran.warmup,
        "iterations": ran.iterations,
        "note": note,
    }
    if len(results) > 1:
        record["rounds_images_per_s"] = [result["images_per_s"] for result in results]
    return record


BENCH_COLUMNS = (
    ("model", "left"),
    ("impl", "left"),
    ("mode", "left"),
    ("batch", "right"),
    ("params M", "right"),
    ("GMACs", "right"),
    ("img/s", "right"),
    ("ms", "right"),
    ("MB", "right"),
)


def bench_table(records: list[dict]) -> Table:
    """The records as a table, one row per record, with the units in its caption. A batch
    marked * ran smaller than asked after out-of-memory; the caption says why. A runtime column
    follows the mode when any row ran other than eagerly."""
    first = records[0] if records else {}
    title = (
        f"{first.get('device', '')} {first.get('precision', '')}, {first.get('resolution', '')}²"
    )
    if first.get("grad_checkpointing"):
        stages = ",".join(map(str, first["grad_checkpointing"]))
        title += f", DeBiFormer stages {stages} recomputed in backward"
    caption = (
        "params M: millions of parameters; GMACs: 10⁹ multiply-accumulates per image; "
        "img/s and ms (per batch): from the median step; "
        f"MB: peak memory the row adds ({first.get('peak_mem', '')})."
    )
    if "machine" in first:
        caption += f" On {machine_text(first['machine'])}."
    show_runtime = any(record.get("runtime", "eager") != "eager" for record in records)
    columns = list(BENCH_COLUMNS)
    if show_runtime:
        columns.insert(3, ("runtime", "left"))
    table = fitting_table(title, caption, columns)
    notes = []
    for record in records:
        names = [record["model"], record["impl"], record["mode"]]
        if show_runtime:
            names.append(record["runtime"])
        batch = str(record["batch_size"])
        if record["note"]:
            batch += "*"
            notes.append(f"{' '.join(names)}: {record['note']}")
        table.add_row(
            *names,
            batch,
            f"{record['params'] / 1e6:.2f}",
            f"{record['macs'] / 1e9:.3f}",
            figure(record["images_per_s"]),
            figure(record["ms_per_batch"]),
            f"{record['peak_mem_mb']:.0f}",
        )
    if notes:
        table.caption += " * " + ". ".join(notes) + "."
    return table


def _worker(row_json: str, result_path: str) -> None:
    """Entry point of `measure_in_fresh_process`: measures one row, writes its JSON."""
    row = BenchRow(**json.loads(row_json))
    try:
        result = measure(row)
    except OutOfMemory as error:
        result = {"out_of_memory": str(error)}
    except UserError as error:
        result = {"error": error.message, "about": error.about}
    write_json(result_path, result)


if __name__ == "__main__":
    _worker(*sys.argv[1:])
