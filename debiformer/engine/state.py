"""Where a training stands (`TrainState`, saved in every checkpoint) and the stop request that
SIGINT/SIGTERM/SIGUSR1 raise between two optimizer steps."""

from __future__ import annotations

import dataclasses
import signal
import threading
from dataclasses import dataclass
from typing import Any

from debiformer.runtime import STOP_SIGNALS


@dataclass
class TrainState:
    """Where training stands: everything beyond weights and optimizer that a resume needs."""

    # completed epochs; the running epoch is `epoch` (0-based)
    epoch: int = 0
    # optimizer steps done in the running epoch
    batch: int = 0
    # optimizer steps done in all
    step: int = 0
    # the finished epoch `epoch` still awaits its evaluation
    eval_pending: bool = False
    # summed per-step losses of the running epoch on this rank, and their count
    epoch_loss: float = 0.0
    epoch_steps: int = 0
    # best value of the task's best metric so far, and its epoch (1-based)
    best_value: float | None = None
    best_epoch: int | None = None
    # the latest validation metrics
    last_eval: dict[str, float] | None = None
    # wall-clock seconds of earlier attempts, seconds and images of training steps
    wall_s: float = 0.0
    train_s: float = 0.0
    train_images: int = 0

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (safe to load with `weights_only=True`)."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the fields saved by `state_dict`."""
        for key, value in state.items():
            setattr(self, key, value)


class StopRequest:
    """Turns SIGINT/SIGTERM/SIGUSR1 into a flag checked after every step; a second Ctrl-C aborts
    at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
