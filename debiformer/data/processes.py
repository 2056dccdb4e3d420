"""Work in a child process group that stops as a whole: Ctrl-C, SIGTERM, kill -9 of the parent, or
one failing process of the group ends every process of it within seconds.

`run_in_process_group(work, *args)` forks a child in a process group of its own and calls
`work(report, *args)` there. Processes the child starts stay in its group and call
`die_with_parent` first; a process of the group that fails sends one line with
`report_failure(report, ...)`. The parent waits for the child's result; on that failure, on
KeyboardInterrupt or SIGTERM, or when the child dies, it kills the whole group and raises.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection
from typing import Any

from debiformer.errors import UserError

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.1
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


def die_with_parent(parent_pid: int) -> None:
    """Have Linux SIGKILL this process when its parent `parent_pid` exits (nothing elsewhere);
    exit at once if the parent is already gone."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def one_line(error: BaseException) -> str:
    """`error` as "Type: message" on one line."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def report_failure(report: Connection, message: str) -> None:
    """Tell the parent that this process of the group failed, with a one-line `message`."""
    report.send(("error", UserError(message[:2000])))


def _child_main(parent_pid: int, report: Connection, work: Callable, args: tuple) -> None:
    """The child: its own process group, dies with the parent, sends `work`'s result or error."""
    os.setpgid(0, 0)
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        result = work(report, *args)
    except UserError as error:  # sent whole, so the parent can name its parameters as it likes
        report.send(("error", error))
    except BaseException as error:  # anything else still ends as one line in the parent
        report_failure(report, one_line(error))
    else:
        report.send(("done", result))


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM handler: leave through SystemExit, so cleanup code runs."""
    raise SystemExit(SIGTERM_EXIT_CODE)


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """While the block runs, SIGTERM raises SystemExit(143) instead of ending the process on the
    spot, so `finally` blocks clean up. Only where SIGTERM has its default action (a handler the
    program installed stays) and in the main thread (the only one that can set handlers)."""
    default = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if not default or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _kill_group(child: multiprocessing.Process) -> None:
    """SIGKILL every process of the child's group (the child alone if it has none yet), reap it."""
    if child.pid is None:
        return
    for kill, target in ((os.killpg, child.pid), (os.kill, child.pid)):
        with suppress(ProcessLookupError, PermissionError):
            kill(target, signal.SIGKILL)
    child.join()


def _await_result(reader: Connection, child: multiprocessing.Process) -> Any:
    """The child's result; UserError with the first failure a process of the group reports."""
    while True:
        if reader.poll(POLL_SECONDS):
            try:
                kind, payload = reader.recv()
            except EOFError:
                child.join()
                raise UserError(
                    f"the worker process stopped (exit code {child.exitcode}) without a result"
                ) from None
            if kind == "done":
                return payload
            raise payload
        if not child.is_alive() and not reader.poll(0):
            raise UserError(
                f"the worker process stopped (exit code {child.exitcode}) without a result"
            )


def run_in_process_group(work: Callable[..., Any], *args: Any) -> Any:
    """`work(report, *args)` run in a forked child in a process group of its own; its result.

    A failure reported by any process of the group is raised here as a UserError, after the
    whole group is killed; so is a child that dies without a result. KeyboardInterrupt, and
    SIGTERM (as SystemExit(143), where SIGTERM had its default action) kill the group and pass on.
    The result and `args` are not pickled to start the child, only to send the result back.
    """
    from multiprocessing import resource_tracker

    # started here, the tracker stays out of the child's group and frees the shared memory
    # of a killed group when this process exits
    resource_tracker.ensure_running()
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    with sigterm_exits():
        child = context.Process(target=_child_main, args=(os.getpid(), writer, work, args))
        try:
            child.start()
            with suppress(OSError):  # fails if the child got there first, or has exited
                os.setpgid(child.pid, child.pid)
            writer.close()
            return _await_result(reader, child)
        finally:
            _kill_group(child)
            reader.close()
