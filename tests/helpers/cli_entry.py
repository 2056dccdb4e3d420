"""The `debiformer` command for child processes, with checkpoint saving wrapped so that the process
SIGKILLs itself right after its KILL_AT_SAVE-th checkpoint write (first torchrun attempt only), or
sends itself SIGUSR1 after its USR1_AT_SAVE-th: an interruption at a known point, through the real
signal. Run it as `python cli_entry.py ARGS`."""

import os
import signal

import debiformer.engine.trainer
from debiformer.cli.main import main

kill_at = int(os.environ.get("KILL_AT_SAVE", "0"))
usr1_at = int(os.environ.get("USR1_AT_SAVE", "0"))
saves = 0
save = debiformer.engine.trainer.save_checkpoint


def save_then_maybe_die(state, path):
    """Saves, then SIGKILLs this process after the KILL_AT_SAVE-th save, or sends it SIGUSR1 (as
    Slurm does before a job's time ends) after the USR1_AT_SAVE-th."""
    global saves
    save(state, path)
    saves += 1
    if saves == kill_at and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    if saves == usr1_at:
        os.kill(os.getpid(), signal.SIGUSR1)


if __name__ == "__main__":
    debiformer.engine.trainer.save_checkpoint = save_then_maybe_die
    main()
