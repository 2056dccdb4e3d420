"""The `debiformer` command itself: subcommands, version, one-line errors, and how it installs
(as `debiformer.cli`, with the recipes inside the package, nothing named `cli` in site-packages)."""

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import debiformer
from debiformer.cli import flags, options
from debiformer.cli.main import app, command_of
from debiformer.cli.train import _process_errors

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_the_subcommands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "eval", "bench", "profile", "data", "recipes"):
        assert command in result.output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"debiformer {debiformer.__version__}"


# imports every command's --help and the version, then prints what of the heavy library it loaded
LIGHT_START = """
import sys
import typer
from typer.testing import CliRunner
from debiformer.cli.main import app

root = typer.main.get_command(app)
args = [["--version"], ["--help"]]
for name, command in root.commands.items():
    args += [[name, "--help"]]
    args += [[name, sub, "--help"] for sub in getattr(command, "commands", {})]
for arg in args:
    result = CliRunner().invoke(app, arg)
    assert result.exit_code == 0, (arg, result.output)
print(len(args), [m for m in ("torch", "timm", "debiformer.model") if m in sys.modules])
"""


def test_version_and_help_load_no_torch():
    """`debiformer --version` and each command's `--help` import no torch: the command modules
    import the library inside their command functions."""
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_START], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    count, loaded = result.stdout.split(" ", 1)
    assert int(count) > 10 and loaded.strip() == "[]"


def test_bad_input_is_a_one_line_error_not_a_traceback(run_main, monkeypatch, tmp_path):
    (tmp_path / "typo.yaml").write_text("optim:\n  lrr: 0.1\n")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main("train", "typo.yaml", "--out", str(tmp_path / "run"))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error:") and "optim.lrr" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_launched_process_hands_its_error_to_the_launcher(run_main, monkeypatch, tmp_path):
    """In a process of `train --nproc-per-node`, the `error:` message goes to a file named by the
    rank, which the launcher prints once for all processes; nothing is printed by the process."""
    (tmp_path / "typo.yaml").write_text("optim:\n  lrr: 0.1\n")
    errors = tmp_path / "errors"
    errors.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(options.PROCESS_ERRORS_ENV, str(errors))
    monkeypatch.setenv("RANK", "2")
    code, out, err = run_main("train", "typo.yaml")
    assert (code, out, err) == (2, "", "")
    message = (errors / "2").read_text()
    assert "optim.lrr" in message
    (errors / "10").write_text("another message")
    (errors / "0").write_text(message)
    assert _process_errors(errors) == [message, "another message"]


def test_a_bad_option_value_is_a_one_line_error(run_main):
    code, out, err = run_main("bench", "--grad-checkpointing", "one")
    assert code == 2
    assert err.strip() == "error: --grad-checkpointing takes stage numbers 1-4, e.g. 1,3; got 'one'"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train"], "error: Missing argument 'recipe'. (see 'debiformer train --help')"),
        (["recipes", "--bogus"], "error: No such option: --bogus"),
        (["nosuch"], "error: No such command 'nosuch'. (see 'debiformer --help')"),
        (["data", "convert", "a", "b", "--workers", "two"], "error: Invalid value for '--workers'"),
    ],
)
def test_usage_errors_are_one_line(run_main, args, expected):
    code, out, err = run_main(*args)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(expected)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--nproc-per-node", "0"], "error: --nproc-per-node: must be at least 1, got 0"),
        (["--max-restarts", "-1"], "error: --max-restarts: must be at least 0, got -1"),
        (["--resume", "x.pt", "--fresh"], "error: --resume and --fresh contradict each other"),
        (["--out", "{file}"], "error: --out {file}: is a file; give a directory"),
    ],
)
def test_train_flags_that_contradict_or_are_out_of_range_are_one_line(
    run_main, tmp_path, args, expected
):
    file = tmp_path / "a_file"
    file.write_text("")
    args = [arg.format(file=file) for arg in args]
    code, out, err = run_main("train", "quickstart", *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(expected.format(file=file)), err
    assert not (tmp_path / "runs").exists()


def test_a_bad_parameter_raised_by_a_command_is_one_line(run_main):
    def odd(n: int = typer.Option(1, "--n")) -> None:
        raise typer.BadParameter(f"{n} is not odd,\nsecond line", param_hint="--n")

    app.command("odd")(odd)
    try:
        code, out, err = run_main("odd", "--n", "2")
    finally:
        app.registered_commands.pop()
    assert code == 2
    assert err.strip() == (
        "error: Invalid value for --n: 2 is not odd, second line (see 'debiformer odd --help')"
    )


def test_a_user_error_with_brackets_is_printed_as_is(run_main):
    code, out, err = run_main("recipes", "show", "[bold]x")
    assert code == 2
    assert err.startswith("error: recipe '[bold]x' not found")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["data", "mosaics", "{tmp}/set", "--size", "40"],
            "error: --size 40: the canvas must hold the largest item (56 px at scale 2.0); "
            "use --size 56 or more, or a smaller --scale",
        ),
        (["data", "bench", "{tmp}", "--batch-size", "0"], "error: --batch-size must be at least 1"),
        (["data", "bench", "{tmp}", "--json", "{tmp}"], "error: --json {tmp}: is a directory"),
    ],
)
def test_a_user_error_names_the_flags_of_the_command(run_main, tmp_path, args, expected):
    args = [arg.format(tmp=tmp_path) for arg in args]
    code, out, err = run_main(*args)
    assert code == 2
    assert err.strip().startswith(expected.format(tmp=tmp_path)), err


def test_the_flag_table_names_the_options_of_its_commands():
    commands = typer.main.get_command(app).commands
    for command, names in flags.FLAGS.items():
        group, _, name = command.partition(" ")
        command_object = commands[group].commands[name] if name else commands[group]
        options = set()
        for param in command_object.params:
            options.update(
                param.opts if param.param_type_name == "option" else [param.name.upper()]
            )
        assert set(names.values()) <= options, (command, set(names.values()) - options)


@pytest.mark.parametrize(
    ("args", "command"),
    [(["train", "quickstart", "--fresh"], "train"), (["data", "convert", "a"], "data convert")],
)
def test_the_command_is_read_off_the_arguments(args, command):
    assert command_of(args) == command


def test_no_arguments_prints_the_help(run_main):
    code, out, err = run_main()
    assert code == 2
    assert "Usage: debiformer" in out + err
    assert "error:" not in err


def test_success_exits_0(run_main):
    code, out, err = run_main("--version")
    assert code == 0 and out.strip() == f"debiformer {debiformer.__version__}"


def test_there_is_no_cli_package(tmp_path):
    """Outside the clone a bare `cli` does not exist (the command is `debiformer.cli`)."""
    result = subprocess.run(
        [sys.executable, "-c", "import cli"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 1 and "No module named 'cli'" in result.stderr
    spec = importlib.util.find_spec("debiformer.cli.main")
    assert spec is not None and Path(spec.origin) == ROOT / "cli" / "main.py"


def test_the_cli_imports_its_siblings_through_debiformer_cli():
    for path in sorted((ROOT / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in getattr(node, "names", [])]
            modules = [getattr(node, "module", None) or "", *names]
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                assert not any(m == "cli" or m.startswith("cli.") for m in modules), (
                    f"{path.name}:{node.lineno}: import debiformer.cli..., not cli..."
                )


def test_the_library_never_imports_the_cli():
    for path in sorted((ROOT / "debiformer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for module in modules:
                assert not (module in ("cli", "debiformer.cli") or module.startswith("cli.")), (
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {module}"
                )
                assert not module.startswith("debiformer.cli."), (
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {module}"
                )


@pytest.mark.slow
def test_the_wheel_holds_debiformer_only_with_the_cli_and_recipes_inside(tmp_path):
    """Builds the wheel from a copy of the sources and checks its file list."""
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("debiformer", "cli", "recipes"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    offline = importlib.util.find_spec("setuptools") is not None
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(tmp_path)]
        + ["--no-build-isolation"] * offline,
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("debiformer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    assert "debiformer/cli/main.py" in names
    assert "debiformer/recipes/tiny.yaml" in names
    assert not any(name.startswith("cli/") for name in names)
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"debiformer", f"{wheel.name.split('-py')[0]}.dist-info"}
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "debiformer").rglob("*.py")}
    expected |= {f"debiformer/cli/{p.name}" for p in (ROOT / "cli").glob("*.py")}
    expected |= {f"debiformer/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")}
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel (a package missing from pyproject's list?): {missing}"
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "debiformer = debiformer.cli.main:main" in text
