"""The `debiformer` command: parses arguments and calls one library function per subcommand."""

import sys

import typer
from rich.console import Console

import debiformer
from cli import bench, data, train
from debiformer.errors import UserError

app = typer.Typer(
    name="debiformer",
    help="Train, evaluate, benchmark and profile DeBiFormer vision transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"debiformer {debiformer.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        help="Print the version and exit.",
        callback=_print_version,
        is_eager=True,
    ),
) -> None:
    """Train, evaluate, benchmark and profile DeBiFormer vision transformers."""


app.command("train")(train.train)
app.command("eval")(train.evaluate)
app.command("bench")(bench.bench)
app.command("profile")(bench.profile)
app.add_typer(data.app, name="data")


def main() -> None:
    """Entry point: runs the app and turns a `UserError` into a one-line message and exit code 2."""
    try:
        app()
    except UserError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
