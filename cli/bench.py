"""`debiformer bench`: parses the options into a `BenchOptions` (checked before any work),
runs the benchmark, prints the table and writes the JSON records."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from debiformer.cli.options import DEVICE, PRECISION, say_precision
from debiformer.cli.parsing import names

LIST_HELP = "comma-separated or repeated"
MODE_CHOICES = {"infer": ("infer",), "train": ("train",), "both": ("infer", "train")}


def _stages(values: list[str]) -> tuple[int, ...]:
    """Stage numbers from `--grad-checkpointing` values such as "1,3"."""
    from debiformer.errors import UserError

    stages = names(values)
    if not all(stage.isdigit() for stage in stages):
        raise UserError(
            f"--grad-checkpointing takes stage numbers 1-4, e.g. 1,3; got {','.join(values)!r}"
        )
    return tuple(int(stage) for stage in stages)


def _runtimes(values: list[str], compile: bool) -> tuple[str, ...]:
    """The runtimes `--runtime` names; `--compile` alone is `--runtime compile`."""
    from debiformer.errors import UserError

    if compile and values:
        raise UserError("--compile is --runtime compile: give one of them")
    return tuple(names(values)) or (("compile",) if compile else ("eager",))


def _modes(mode: str) -> tuple[str, ...]:
    """The modes `--mode` names."""
    from debiformer.errors import UserError

    if mode not in MODE_CHOICES:
        raise UserError(f"--mode: unknown mode {mode!r}; choose infer, train or both")
    return MODE_CHOICES[mode]


def bench(
    models: list[str] = typer.Option(
        [],
        "--models",
        help=f"DeBiFormer variants ({LIST_HELP}); default: tiny, small, base; '' for none (the "
        "--compare models alone).",
    ),
    resolution: int = typer.Option(224, "--resolution", help="Image side in pixels (32 or more)."),
    batch_size: int = typer.Option(
        32, "--batch-size", help="Images per step (halved on out-of-memory)."
    ),
    mode: str = typer.Option(
        "infer",
        "--mode",
        help="infer (eval, no grad), train (forward + backward + AdamW step) or both.",
    ),
    precision: str = PRECISION,
    device: str = DEVICE,
    channels_last: bool = typer.Option(False, "--channels-last", help="NHWC memory format."),
    compile: bool = typer.Option(
        False, "--compile", help="torch.compile the model (the same as --runtime compile)."
    ),
    runtime: list[str] = typer.Option(
        [],
        "--runtime",
        help="eager, compile, cudagraphs (torch.compile with CUDA graphs, on a GPU), onnxruntime "
        f"(the model exported to ONNX, run on the CPU; inference, fp32) ({LIST_HELP}); default "
        "eager.",
    ),
    grad_checkpointing: list[str] = typer.Option(
        [],
        "--grad-checkpointing",
        help=f"DeBiFormer stages 1-4 recomputed in the backward pass, to save memory ({LIST_HELP}).",
    ),
    impl: list[str] = typer.Option(
        ["fast"], "--impl", help=f"Routed attention: fast, reference ({LIST_HELP})."
    ),
    compare: list[str] = typer.Option(
        [], "--compare", help=f"timm models to add, built without weights ({LIST_HELP})."
    ),
    warmup: int = typer.Option(2, "--warmup", help="Untimed steps first."),
    iterations: int = typer.Option(10, "--iterations", help="Timed steps (median is reported)."),
    rounds: int = typer.Option(
        1,
        "--rounds",
        help="Measure the whole table this many times, row after row; each row reports its "
        "median round.",
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the records here."),
) -> None:
    """Images/s, ms per batch, peak memory, parameters and MACs, as a table."""
    from debiformer.runtime import check_writable, write_json
    from debiformer.tools.bench import DEFAULT_MODELS, BenchOptions, bench_table, run_bench

    options = BenchOptions(
        models=tuple(names(models)) if models else DEFAULT_MODELS,
        compare=tuple(names(compare)),
        impls=tuple(names(impl)),
        modes=_modes(mode),
        resolution=resolution,
        batch_size=batch_size,
        precision=precision,
        device=device,
        channels_last=channels_last,
        runtimes=_runtimes(runtime, compile),
        grad_checkpointing=_stages(grad_checkpointing),
        warmup=warmup,
        iterations=iterations,
        rounds=rounds,
    )
    if json_path is not None:
        check_writable(json_path, "--json")
    console = Console()
    say_precision(console, options.precision, options.device)
    records = run_bench(options, on_record=lambda record: _say_measured(console, record, rounds))
    console.print(bench_table(records))
    if json_path is not None:
        write_json(json_path, records)


def _say_measured(console: Console, record: dict, rounds: int) -> None:
    """One line per measurement: the row, and its images/s (with rounds: this round's)."""
    row = f"{record['model']} {record['impl']} {record['mode']} {record['runtime']}"
    if rounds == 1:
        line = f"{row}: {record['images_per_s']:.1f} images/s"
    else:
        line = (
            f"round {record['round']}/{rounds}, {row}: {record['round_images_per_s']:.1f} images/s"
        )
    console.print(f"{line} {record['note']}".rstrip(), highlight=False)
