"""`debiformer profile`: parses the options into a `ProfileOptions` (checked, with the output
paths, before any work), profiles the op, prints the table and writes the JSON result."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from debiformer.cli.options import DEVICE, PRECISION, say_precision


def profile(
    op: str = typer.Option("dbra", "--op", help="dbra, bra, block or model."),
    stage: int = typer.Option(1, "--stage", help="Stage 1-4 whose first block holds the op."),
    variant: str = typer.Option("debiformer_tiny", "--variant", help="DeBiFormer variant."),
    resolution: int = typer.Option(224, "--resolution", help="Image side in pixels (32 or more)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per iteration."),
    device: str = DEVICE,
    precision: str = PRECISION,
    impl: str = typer.Option("fast", "--impl", help="Routed attention: fast or reference."),
    warmup: int = typer.Option(2, "--warmup", help="Unprofiled iterations first (at least 1)."),
    iterations: int = typer.Option(5, "--iterations", help="Profiled iterations (averaged)."),
    trace: Path | None = typer.Option(None, "--trace", help="Write a Chrome trace here."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the profile here."),
) -> None:
    """Forward and backward time and memory of each named step of an op, with its share."""
    from debiformer.runtime import check_writable, write_json
    from debiformer.tools.profile import ProfileOptions, profile_table, run_profile

    options = ProfileOptions(
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
        trace=trace,
    )
    if trace is not None:
        check_writable(trace, "--trace")
    if json_path is not None:
        check_writable(json_path, "--json")
    console = Console()
    say_precision(console, options.precision, options.device)
    result = run_profile(options)
    console.print(profile_table(result))
    if json_path is not None:
        write_json(json_path, result)
