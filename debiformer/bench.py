"""`debiformer bench`: images/s, ms per batch, peak memory, parameters and MACs of DeBiFormer
variants (and timm models to compare with), in inference or training, as records and a table.

Each configuration is warmed up, then timed over several iterations with the device
synchronised around every step; the median step time gives images/s. Peak memory is what the
configuration (model, optimizer state, data, activations) adds: over what was allocated before,
the CUDA allocator's maximum on a GPU, the process's peak resident set size on the CPU. Memory
freed by one configuration stays in the CPU process for the next to reuse unseen, so each CPU
configuration runs in a fresh Python process (`python -m debiformer.bench`) by default.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import debiformer
from debiformer.errors import UserError
from debiformer.routing import IMPLEMENTATIONS, implementation

MODES = ("infer", "train")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NO_IMPL = "-"
CPU_MEMORY = "CPU peak RSS rise"
CUDA_MEMORY = "CUDA max allocated"


class OutOfMemory(Exception):
    """A configuration did not fit in memory at the batch size it was tried with."""


@dataclass(frozen=True)
class BenchConfig:
    """One row of the benchmark: what to run and how."""

    model: str
    impl: str
    mode: str
    resolution: int
    batch_size: int
    precision: str
    device: str
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: tuple[int, ...] = ()
    warmup: int = 2
    iterations: int = 10


def resolve_device(name: str | None) -> torch.device:
    """`name` as a torch device; None picks CUDA when present, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; choose cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    return torch.device(name)


def check_precision(precision: str, device: torch.device) -> None:
    """Reject precisions that do not exist or that the device cannot autocast to."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("fp16 needs a CUDA device; use bf16 or fp32 on the CPU")


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """Mixed precision for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM") in MB; None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where Linux can't."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return _proc_status_mb("VmHWM") is not None


def _ru_maxrss_mb() -> float:
    """Process-lifetime peak RSS in MB (`ru_maxrss` is kB on Linux, bytes on macOS)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Yields a dict whose "mb" is set on exit to the peak memory the block added.

    CUDA: the allocator's maximum minus what was allocated before. CPU: the peak resident set
    size minus the RSS before, after resetting the peak (Linux); elsewhere the rise of the
    lifetime peak `ru_maxrss`, which stays 0 until an earlier, higher peak is passed.
    """
    result: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device) / 2**20
        yield result
        result["mb"] = torch.cuda.max_memory_allocated(device) / 2**20 - start
    elif _reset_cpu_peak():
        start = _proc_status_mb("VmRSS")
        yield result
        result["mb"] = _proc_status_mb("VmHWM") - start
    else:
        start = _ru_maxrss_mb()
        yield result
        result["mb"] = _ru_maxrss_mb() - start


def is_debiformer(name: str) -> bool:
    """Whether `name` is one of this package's variants (others are built by timm)."""
    return name in debiformer.list_models()


def check_timm_model(name: str) -> None:
    """Reject names that timm does not know."""
    if not timm.list_models(name):
        raise UserError(f"unknown timm model {name!r} (see timm.list_models())")


def build_model(name: str) -> nn.Module:
    """A DeBiFormer variant or a timm model, randomly initialised, 1000 classes."""
    if is_debiformer(name):
        return debiformer.create_model(name)
    check_timm_model(name)
    return timm.create_model(name, pretrained=False)


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
    model = build_model(name)
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
            with torch.inference_mode(), autocast(precision, device):
                model(images)

        return infer

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def train() -> None:
        with autocast(precision, device):
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


def _timed_steps(config: BenchConfig) -> tuple[list[float], float]:
    """Build the model and data of `config`, time its steps; seconds per step and peak MB."""
    device = torch.device(config.device)
    torch.manual_seed(0)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    size = (config.batch_size, 3, config.resolution, config.resolution)
    with peak_memory(device) as peak:
        model = build_model(config.model).to(device, memory_format=memory_format)
        if config.grad_checkpointing and is_debiformer(config.model):
            model.set_grad_checkpointing(stages=config.grad_checkpointing)
        if config.compile:
            model = torch.compile(model)
        images = torch.randn(size, device=device).contiguous(memory_format=memory_format)
        labels = torch.randint(0, 1000, (config.batch_size,), device=device)
        run_step = make_step(model, config.mode, images, labels, config.precision)
        with implementation(config.impl if config.impl != NO_IMPL else "fast"):
            seconds = time_steps(run_step, config.warmup, config.iterations, device)
    return seconds, peak["mb"]


def measure(config: BenchConfig) -> dict:
    """Time one configuration in this process: ms per batch, images/s and peak memory.

    Raises `OutOfMemory` when it does not fit at `config.batch_size`.
    """
    try:
        seconds, peak_mb = _timed_steps(config)
    except Exception as error:
        if not _is_out_of_memory(error):
            raise
        seconds = None
    if seconds is None:
        gc.collect()
        if config.device == "cuda":
            torch.cuda.empty_cache()
        raise OutOfMemory(f"out of memory at batch {config.batch_size}")
    step_s = statistics.median(seconds)
    return {
        "ms_per_batch": round(step_s * 1000, 2),
        "images_per_s": round(config.batch_size / step_s, 2),
        "peak_mem_mb": round(peak_mb, 1),
    }


def _package_root() -> str:
    """The directory holding the `debiformer` package, for the worker's PYTHONPATH."""
    return str(Path(debiformer.__file__).resolve().parent.parent)


def measure_in_fresh_process(config: BenchConfig) -> dict:
    """`measure` in a new Python process, so that its peak RSS belongs to this configuration."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_package_root(), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        command = [
            sys.executable,
            "-m",
            "debiformer.bench",
            json.dumps(asdict(config)),
            str(result_path),
        ]
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        if completed.returncode == -signal.SIGKILL:
            raise OutOfMemory(f"killed at batch {config.batch_size} (out of memory?)")
        if not result_path.exists():
            raise RuntimeError(f"benchmark worker failed:\n{completed.stderr[-4000:]}")
        result = json.loads(result_path.read_text())
    if "out_of_memory" in result:
        raise OutOfMemory(result["out_of_memory"])
    if "error" in result:
        raise UserError(result["error"])
    return result


def measure_with_backoff(config: BenchConfig, fresh_process: bool) -> tuple[BenchConfig, dict, str]:
    """Measure, halving the batch after each out-of-memory; returns the config that ran,
    its measurements and a note on the halvings ("" when there were none)."""
    halvings = []
    while True:
        try:
            result = measure_in_fresh_process(config) if fresh_process else measure(config)
        except OutOfMemory as error:
            if config.batch_size == 1:
                raise UserError(f"{config.model}: {error}; nothing smaller to try") from None
            halvings.append(str(error))
            config = replace(config, batch_size=config.batch_size // 2)
            continue
        note = f"{'; '.join(halvings)}: ran at batch {config.batch_size}" if halvings else ""
        return config, result, note


def bench_configs(
    models: list[str],
    compare: list[str],
    impls: list[str],
    modes: list[str],
    resolution: int,
    batch_size: int,
    precision: str,
    device: torch.device,
    channels_last: bool = False,
    compile: bool = False,
    grad_checkpointing: tuple[int, ...] = (),
    warmup: int = 2,
    iterations: int = 10,
) -> list[BenchConfig]:
    """Every configuration to measure, after checking the names and settings."""
    for name in models:
        if not is_debiformer(name):
            raise UserError(
                f"unknown model {name!r}; choose from {', '.join(debiformer.list_models())} "
                "(timm models go in --compare)"
            )
    for impl in impls:
        if impl not in IMPLEMENTATIONS:
            raise UserError(
                f"unknown implementation {impl!r}; choose from {', '.join(IMPLEMENTATIONS)}"
            )
    for mode in modes:
        if mode not in MODES:
            raise UserError(f"unknown mode {mode!r}; choose infer, train or both")
    if resolution < 32 or batch_size < 1 or warmup < 0 or iterations < 1:
        raise UserError(
            "need --resolution >= 32, --batch-size >= 1, --warmup >= 0, --iterations >= 1"
        )
    check_precision(precision, device)
    if not set(grad_checkpointing) <= {1, 2, 3, 4}:
        raise UserError(f"--grad-checkpointing takes stages 1-4, got {list(grad_checkpointing)}")
    for name in compare:
        check_timm_model(name)
    rows = [(name, impl) for name in models for impl in impls] + [
        (name, NO_IMPL) for name in compare
    ]
    settings = dict(
        resolution=resolution,
        batch_size=batch_size,
        precision=precision,
        device=device.type,
        channels_last=channels_last,
        compile=compile,
        grad_checkpointing=tuple(grad_checkpointing),
        warmup=warmup,
        iterations=iterations,
    )
    return [
        BenchConfig(model=name, impl=impl, mode=mode, **settings)
        for mode in modes
        for name, impl in rows
    ]


def run_bench(
    models: list[str] | None = None,
    compare: list[str] = (),
    impls: list[str] = ("fast",),
    modes: list[str] = ("infer",),
    resolution: int = 224,
    batch_size: int = 32,
    precision: str = "fp32",
    device: str | None = None,
    channels_last: bool = False,
    compile: bool = False,
    grad_checkpointing: tuple[int, ...] = (),
    warmup: int = 2,
    iterations: int = 10,
    fresh_process: bool | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Benchmark DeBiFormer `models` (default: tiny, small, base) in each of `impls` and the
    timm `compare` models, in each of `modes`; returns one record per configuration.

    `grad_checkpointing` names the DeBiFormer stages whose attention and MLP branches are
    recomputed in the backward pass (train mode). `fresh_process` (default: on the CPU) measures
    each configuration in a new process so that its CPU peak memory is its own; in-process CPU
    peaks are a lower bound after a larger one.
    `on_record` is called with each record as soon as it is measured.
    """
    torch_device = resolve_device(device)
    configs = bench_configs(
        list(models or ["debiformer_tiny", "debiformer_small", "debiformer_base"]),
        list(compare),
        list(impls),
        list(modes),
        resolution,
        batch_size,
        precision,
        torch_device,
        channels_last,
        compile,
        tuple(grad_checkpointing),
        warmup,
        iterations,
    )
    if fresh_process is None:
        fresh_process = torch_device.type == "cpu"
    sizes: dict[str, tuple[int, int]] = {}
    records = []
    for config in configs:
        if config.model not in sizes:
            sizes[config.model] = model_size(config.model, resolution)
        ran, result, note = measure_with_backoff(config, fresh_process)
        params, macs = sizes[config.model]
        record = {
            "model": ran.model,
            "impl": ran.impl,
            "mode": ran.mode,
            "resolution": ran.resolution,
            "batch_size": ran.batch_size,
            "precision": ran.precision,
            "device": ran.device,
            "channels_last": ran.channels_last,
            "compile": ran.compile,
            "grad_checkpointing": list(ran.grad_checkpointing),
            "params": params,
            "macs": macs,
            **result,
            "peak_mem": CUDA_MEMORY if torch_device.type == "cuda" else CPU_MEMORY,
            "iterations": ran.iterations,
            "note": note,
        }
        records.append(record)
        if on_record is not None:
            on_record(record)
    return records


def bench_table(records: list[dict]) -> Table:
    """The records as a rich table, one row per configuration."""
    first = records[0] if records else {}
    title = (
        f"{first.get('device', '')} {first.get('precision', '')}, {first.get('resolution', '')}², "
        f"peak memory = {first.get('peak_mem', '')}"
    )
    if first.get("grad_checkpointing"):
        stages = ",".join(map(str, first["grad_checkpointing"]))
        title += f", DeBiFormer stages {stages} recomputed in backward"
    table = Table(title=title)
    for column in (
        "model",
        "impl",
        "mode",
        "batch",
        "params (M)",
        "MACs (G)",
        "images/s",
        "ms/batch",
        "peak MB",
        "note",
    ):
        table.add_column(
            column, justify="left" if column in ("model", "impl", "mode", "note") else "right"
        )
    for record in records:
        table.add_row(
            record["model"],
            record["impl"],
            record["mode"],
            str(record["batch_size"]),
            f"{record['params'] / 1e6:.2f}",
            f"{record['macs'] / 1e9:.3f}",
            f"{record['images_per_s']:.1f}",
            f"{record['ms_per_batch']:.1f}",
            f"{record['peak_mem_mb']:.0f}",
            record["note"],
        )
    return table


def _worker(config_json: str, result_path: str) -> None:
    """Entry point of `measure_in_fresh_process`: measure one configuration, write JSON."""
    config = BenchConfig(**json.loads(config_json))
    try:
        result = measure(config)
    except OutOfMemory as error:
        result = {"out_of_memory": str(error)}
    except UserError as error:
        result = {"error": str(error)}
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(*sys.argv[1:])
