"""The training engine: `fit(recipe, task, run_dir=...)` trains any `Task`.

task.py      the Task protocol and its `Metric` declarations
trainer.py   `fit` and the Trainer: the epoch loop, checkpoints, resume, the NaN stop
progress.py  the progress bar, and the loss window of the `train` metrics lines
state.py     TrainState (where training stands) and the SIGINT/SIGTERM/SIGUSR1 stop request
schedule.py  parameter groups, layer decay, freezing, the learning rate of every step
rundir.py    the run directory: lock, recipe history, metrics.jsonl, summary, curves.png
"""

from debiformer.engine.schedule import LrSchedule, freeze, lr_factor, param_groups
from debiformer.engine.state import StopRequest, TrainState
from debiformer.engine.task import Metric, Task
from debiformer.engine.trainer import NonFiniteLossError, Trainer, fit, micro_batches

__all__ = [
    "LrSchedule",
    "Metric",
    "NonFiniteLossError",
    "StopRequest",
    "Task",
    "TrainState",
    "Trainer",
    "fit",
    "freeze",
    "lr_factor",
    "micro_batches",
    "param_groups",
]
