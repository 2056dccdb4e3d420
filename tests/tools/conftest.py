"""Runs the `debiformer` command in this process, as `main()` runs it for a user."""

import sys

import pytest

from debiformer.cli.main import main


@pytest.fixture
def run_main(monkeypatch, capsys):
    """`run_main(*args)`: runs `debiformer ARGS`; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["debiformer", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        captured = capsys.readouterr()
        return exit_info.value.code, captured.out, captured.err

    return run
