"""The `debiformer` command: parses arguments and calls one library function per subcommand.

Installed as `debiformer.cli.main` (the source folder cli/ maps to the package debiformer.cli),
so sibling modules are imported as `debiformer.cli.<module>`, never as `cli.<module>`. The
command modules import the library's heavy parts (the recipe, the model, the data) inside their
command functions, so `--version` and `--help` load no torch.
"""

import os
import sys
from pathlib import Path

import typer

import debiformer
from debiformer.cli import (
    bench,
    data,
    export,
    flags,
    options,
    plot,
    predict,
    profile,
    recipes,
    show,
    train,
)
from debiformer.cli import eval as eval_command
from debiformer.errors import UserError

# Click's exception base class, whether Typer uses click or its own copy of it.
CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

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
app.command("eval")(eval_command.evaluate)
app.command("bench")(bench.bench)
app.command("profile")(profile.profile)
app.command("export")(export.export)
app.command("show")(show.show)
app.command("predict")(predict.predict)
app.command("plot")(plot.plot)
app.add_typer(data.app, name="data")
app.add_typer(recipes.app, name="recipes")


def main() -> None:
    """Entry point: a `UserError` (its parameters named by their flags), a usage error or a bad
    option value becomes one `error:` line on stderr (exit code 2) instead of a traceback or a
    boxed usage message."""
    try:
        code = app(prog_name="debiformer", standalone_mode=False)
    except UserError as error:
        _fail(flags.message(error, command_of(sys.argv[1:])), options.USER_ERROR_EXIT)
    except CLICK_ERROR as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # no arguments: the help, already shown
            if error.format_message().strip():
                error.show()
            sys.exit(error.exit_code)
        ctx = getattr(error, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _fail(f"{error.format_message()}{hint}", error.exit_code)
    except typer.Abort:
        _fail("aborted", 1)
    sys.exit(code if isinstance(code, int) else 0)


def command_of(args: list[str]) -> str:
    """The command that the arguments after `debiformer` run: "train", or "data convert" for a
    command of a group."""
    groups = {group.name for group in app.registered_groups}
    return " ".join(args[:2] if args[:1] and args[0] in groups else args[:1])


def _fail(message: str, exit_code: int) -> None:
    """Prints `error: <message>` as one line on stderr (or hands it to the launcher of this
    process) and exits."""
    if not _hand_to_launcher(message):
        options.print_error(message)
    sys.exit(exit_code)


def _hand_to_launcher(message: str) -> bool:
    """In a process that `train --nproc-per-node` launched, writes `message` where the launcher
    reads it, which prints each different message of its processes once; False elsewhere."""
    errors, rank = os.environ.get(options.PROCESS_ERRORS_ENV), os.environ.get("RANK")
    if not errors or rank is None:
        return False
    try:
        Path(errors, rank).write_text(message)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    main()
