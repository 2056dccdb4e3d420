"""`debiformer bench` and `debiformer profile`: parse options, call the library, print the table
and write JSON."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

LIST_HELP = "comma-separated or repeated"


def _names(values: list[str]) -> list[str]:
    """Flatten repeated and comma-separated option values: ["a,b", "c"] -> ["a", "b", "c"]."""
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _stages(values: list[str]) -> tuple[int, ...]:
    """Stage numbers from `--grad-checkpointing` values such as "1,3"."""
    from debiformer.errors import UserError

    names = _names(values)
    if not all(name.isdigit() for name in names):
        raise UserError(
            f"--grad-checkpointing takes stage numbers 1-4, e.g. 1,3; got {','.join(values)!r}"
        )
    return tuple(int(name) for name in names)


def _write_json(path: Path | None, data: object) -> None:
    """Write `data` as indented JSON to `path`, if one was given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")


def bench(
    models: list[str] = typer.Option(
        [], "--models", help=f"DeBiFormer variants ({LIST_HELP}); default: tiny, small, base."
    ),
    resolution: int = typer.Option(224, "--resolution", help="Image side in pixels."),
    batch_size: int = typer.Option(
        32, "--batch-size", help="Images per step (halved on out-of-memory)."
    ),
    mode: str = typer.Option(
        "infer",
        "--mode",
        help="infer (eval, no grad), train (forward + backward + AdamW step) or both.",
    ),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (CUDA only)."),
    device: str | None = typer.Option(
        None, "--device", help="cpu or cuda (default: cuda if present)."
    ),
    channels_last: bool = typer.Option(False, "--channels-last", help="NHWC memory format."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
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
    json_path: Path | None = typer.Option(None, "--json", help="Also write the records here."),
) -> None:
    """Images/s, ms per batch, peak memory, parameters and MACs, as a table."""
    from debiformer.bench import bench_table, run_bench

    console = Console()
    records = run_bench(
        models=_names(models) or None,
        compare=_names(compare),
        impls=_names(impl),
        modes=["infer", "train"] if mode == "both" else [mode],
        resolution=resolution,
        batch_size=batch_size,
        precision=precision,
        device=device,
        channels_last=channels_last,
        compile=compile,
        grad_checkpointing=_stages(grad_checkpointing),
        warmup=warmup,
        iterations=iterations,
        on_record=lambda record: console.print(
            f"{record['model']} {record['impl']} {record['mode']}: "
            f"{record['images_per_s']:.1f} images/s {record['note']}",
            highlight=False,
        ),
    )
    console.print(bench_table(records))
    _write_json(json_path, records)


def profile(
    op: str = typer.Option("dbra", "--op", help="dbra, bra, block or model."),
    stage: int = typer.Option(1, "--stage", help="Stage 1-4 whose first block holds the op."),
    variant: str = typer.Option("debiformer_tiny", "--variant", help="DeBiFormer variant."),
    resolution: int = typer.Option(224, "--resolution", help="Image side in pixels."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per iteration."),
    device: str | None = typer.Option(
        None, "--device", help="cpu or cuda (default: cuda if present)."
    ),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (CUDA only)."),
    impl: str = typer.Option("fast", "--impl", help="Routed attention: fast or reference."),
    warmup: int = typer.Option(2, "--warmup", help="Unprofiled iterations first (at least 1)."),
    iterations: int = typer.Option(5, "--iterations", help="Profiled iterations (averaged)."),
    trace: Path | None = typer.Option(None, "--trace", help="Write a Chrome trace here."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the profile here."),
) -> None:
    """Forward and backward time and memory of each named step of an op, with its share."""
    from debiformer.profile import profile_table, run_profile

    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
    result = run_profile(
        op=op,
        stage=stage,
        variant=variant,
        resolution=resolution,
        batch_size=batch_size,
        device=device,
        precision=precision,
        impl=impl,
        warmup=warmup,
        iterations=iterations,
        trace_path=trace,
    )
    Console().print(profile_table(result))
    _write_json(json_path, result)
