"""The `debiformer` command for tests: run in this process, as `main()` runs it for a user, or in
a child process (under torchrun when given its options)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CLI_ENTRY = Path(__file__).resolve().with_name("cli_entry.py")


def run_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Runs `debiformer ARGS` through `main()`; returns (exit code, stdout, stderr)."""
    from debiformer.cli.main import main

    monkeypatch.setattr(sys, "argv", ["debiformer", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def child_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: this repository importable, this process's thread
    count, and `extra`."""
    threads = str(torch.get_num_threads())
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads, **extra}


def run_in_child(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    torchrun: list[str] | None = None,
    timeout: float = 240,
) -> subprocess.CompletedProcess:
    """Runs `debiformer ARGS` in a child process (`tests/helpers/cli_entry.py`, which can kill
    itself at a checkpoint save); `torchrun`: the launcher's options for two processes, e.g.
    ["--nproc-per-node=2"]."""
    launcher, env = [sys.executable], env or child_env()
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", *torchrun]
        # the two processes share this process's threads, as they would share its cores
        env = {**env, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // 2))}
    return subprocess.run(
        [*launcher, str(CLI_ENTRY), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    """A TCP port on this host that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
