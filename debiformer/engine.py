"""The training engine: `fit(recipe, task)` runs any task's training, top to bottom.

    fit                      processes and devices, then `_run`
      open_run               lock the run directory, clear temporaries of killed writes
      Trainer.__init__       model, EMA, optimizer, grad scaler, DDP/compile wrapping
      Trainer.resume         the checkpoint's weights, optimizer, TrainState and RNG streams
      Trainer.train_epoch    the optimizer steps of one epoch, logging and periodic checkpoints
      Trainer.finish_epoch   checkpoint, evaluate (model and EMA), metrics line, best.pt
      Trainer.summary        summary.json

A task (`Task`) supplies what differs between tasks: the model, the loaders, the loss of a batch,
evaluation into a metrics dict and the name of the metric that picks `best.pt`. Everything else,
DDP, precision, accumulation, clipping, EMA, the schedule, exact resume, signals, the NaN stop,
metrics.jsonl, progress and the summary, lives here once.

One process: `fit(recipe, task)`. Several: start it under `torchrun` (the CLI does this for
`--nproc-per-node N`); `train.batch_size` is the global batch. Exact resume: a checkpoint holds
the model, EMA, optimizer, grad scaler, the `TrainState` (position, metric windows, best, history)
and every rank's RNG states; data augmentations draw from generators seeded by (seed, epoch,
rank, batch), and a loader starts an epoch at any batch, so on the CPU a resumed run continues bit
for bit like an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import json
import math
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm.utils
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from debiformer import runtime
from debiformer.checkpoint import (
    FORMAT,
    is_training_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from debiformer.data.draws import TASK_STREAM, batch_generator
from debiformer.errors import UserError
from debiformer.recipe import Recipe, fixed_on_resume, recipe_to_dict, recipe_to_yaml


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the last checkpoint written before it is kept."""


# ----------------------------------------------------------------------------- the task interface


class Task:
    """What a task gives the engine. Subclass it and implement the methods that raise.

    `batch` is whatever the task's loaders yield; the engine only moves it along and splits it
    into micro-batches with `x[k::n]` on each of its items (tensors and lists alike).
    """

    #: key of `evaluate`'s metrics that picks best.pt (higher is better)
    best_metric: str = "loss"

    def build_model(self) -> nn.Module:
        """The network to train, on the CPU. Called after `build_loaders`, so it may use what
        the data says (e.g. the class count)."""
        raise NotImplementedError

    def build_loaders(self, device: torch.device, batch_size: int, eval_batch_size: int):
        """(train loader, validation loader) for this process. A loader has `len()` (batches per
        epoch) and `batches(epoch, start_batch)`, an iterator over that epoch's batches from
        `start_batch` on, the same batches whatever batch it starts at."""
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Called before each training epoch (0-based); nothing by default."""

    def prepare_batch(self, batch: Any, generator: torch.Generator) -> Any:
        """The batch as the loss sees it (e.g. mixed up), drawing only from `generator`, which
        the engine seeds from (seed, epoch, rank, batch). The batch itself by default."""
        return batch

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The mean loss of `batch` (a scalar tensor with a graph)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        """Validation metrics of `model` over all ranks' shards of `loader`."""
        raise NotImplementedError

    def describe(self, metrics: dict[str, float]) -> str:
        """A short console text for validation metrics."""
        return ", ".join(f"{key} {value:.4g}" for key, value in metrics.items())


# ----------------------------------------------------------------------------- training state


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


# ----------------------------------------------------------------------------- helpers


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked after every step; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def freeze(model: nn.Module, names: list[str]) -> None:
    """Keeps the modules `names` (e.g. "stem", "stages.0") fixed: no gradients for their
    parameters, and their BatchNorm statistics frozen (timm's `freeze`)."""
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules or not name]
    if unknown:
        children = ", ".join(name for name, _ in model.named_children())
        raise UserError(
            f"model.freeze: {unknown[0]!r} names no module of the model (top-level ones: "
            f"{children}; deeper ones as stages.0)"
        )
    if names:
        timm.utils.freeze(model, names)


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float | None = None
) -> list[dict]:
    """AdamW groups: weight decay on weights; none on norms, biases and position-bias tables.
    With `layer_decay`, timm's layer-wise groups through the model's `group_matcher`, each with
    an `lr_scale` that the schedule multiplies in. Frozen parameters are left out."""
    if layer_decay is not None:
        if not hasattr(model, "group_matcher"):
            raise UserError("optim.layer_decay: this model has no group_matcher; set it to null")
        return param_groups_layer_decay(
            model,
            weight_decay,
            no_weight_decay_list=model.no_weight_decay(),
            layer_decay=layer_decay,
        )
    keywords = (
        model.no_weight_decay_keywords() if hasattr(model, "no_weight_decay_keywords") else set()
    )
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or any(word in name for word in keywords)
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    warmup_ratio: float,
    min_ratio: float,
    decay: str = "cosine",
    power: float = 1.0,
    milestone_steps: list[int] | None = None,
    gamma: float = 0.1,
) -> float:
    """Peak-lr multiplier at `step`, after a linear warm-up from `warmup_ratio`:
    - cosine: from the end of the warm-up down to `min_ratio` at `total_steps` (timm's);
    - poly: (1 - step / total_steps) ** power down to `min_ratio`, the warm-up scaling it
      (mmcv's, as mmsegmentation's schedules);
    - step: times `gamma` at each of `milestone_steps` passed, the warm-up scaling it
      (mmdetection's)."""
    warmup = warmup_ratio + (1 - warmup_ratio) * step / warmup_steps if step < warmup_steps else 1
    if decay == "step":
        return warmup * gamma ** sum(step >= milestone for milestone in milestone_steps or [])
    if decay == "poly":
        remaining = max(0.0, 1 - step / total_steps) ** power
        return warmup * (min_ratio + (1 - min_ratio) * remaining)
    if step < warmup_steps:
        return warmup
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def micro_batches(batch: Any, parts: int) -> Iterator[Any]:
    """`batch` cut into `parts` micro-batches: part k takes every parts-th sample from k, the way
    the loaders shard a global batch over ranks, so accumulation computes what ranks would."""
    if parts == 1:
        yield batch
        return
    for k in range(parts):
        if isinstance(batch, (tuple, list)):
            yield type(batch)(item[k::parts] for item in batch)
        else:
            yield batch[k::parts]


class MetricsLog:
    """Appends JSON lines to metrics.jsonl from rank 0; on resume, drops lines written after the
    checkpoint it resumes from. With `tensorboard_dir` (`output.tensorboard`) the same scalars
    go to TensorBoard event files there too, an earlier attempt's events after the resumed step
    purged."""

    def __init__(
        self,
        path: Path,
        resume_step: int | None,
        enabled: bool,
        tensorboard_dir: Path | None = None,
    ) -> None:
        self.path = path
        self.enabled = enabled
        self.tensorboard = None
        if not enabled:
            return
        if tensorboard_dir is not None:
            purge_step = None if resume_step is None else resume_step + 1
            self.tensorboard = summary_writer_class()(str(tensorboard_dir), purge_step=purge_step)
        kept = []
        if resume_step is not None and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json_step(line) <= resume_step
            ]
        runtime.write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Appends one record; its numbers also go to TensorBoard as `<kind>/<key>` at its step."""
        if self.enabled:
            with open(self.path, "a") as file:
                file.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in TENSORBOARD_SKIPPED and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        """Closes the TensorBoard writer, if any."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


# bookkeeping fields of metrics.jsonl lines that are no curves
TENSORBOARD_SKIPPED = frozenset({"kind", "step", "epoch", "images"})


def summary_writer_class() -> type:
    """torch's TensorBoard `SummaryWriter`; a one-line error without the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "output.tensorboard: needs the tensorboard package (pip install "
            "'debiformer[tensorboard]'), or set it to false"
        ) from None
    return SummaryWriter


def json_step(line: str) -> int:
    """The `step` of one metrics.jsonl line."""
    return json.loads(line)["step"]


def progress_bar(enabled: bool, console: Console) -> Progress:
    """The rank-0 progress bar: step count, loss, lr, images/s, elapsed and remaining time."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
        console=console,
    )


# ----------------------------------------------------------------------------- the run directory


@contextmanager
def open_run(run_dir: Path, is_main: bool) -> Iterator[None]:
    """Holds the run directory's lock for the block (rank 0 only; every rank learns the outcome).

    A second training into a live run directory stops with one line naming the other process.
    The lock is an `fcntl` lock, which dies with its process, so a killed run's lock is simply
    taken over. Temporary files of writes a killed run left behind are removed. A run directory
    this call created is removed again if the block fails before anything was written into it.
    """
    created = is_main and not run_dir.exists()
    lock_file = None
    failure: str | None = None
    if is_main:
        lock_file, failure = _take_lock(run_dir)
    failure = runtime.broadcast(failure)
    if failure is not None:
        raise UserError(failure)
    try:
        if is_main:
            for folder in (run_dir, run_dir / "checkpoints"):
                runtime.remove_stale_temporaries(folder)
        yield
    except BaseException:
        checkpoints = run_dir / "checkpoints"
        unused = not checkpoints.is_dir() or not any(checkpoints.iterdir())
        if created and unused and {p.name for p in run_dir.iterdir()} <= {".lock", "checkpoints"}:
            (run_dir / ".lock").unlink(missing_ok=True)
            if checkpoints.is_dir():
                checkpoints.rmdir()
            run_dir.rmdir()
        raise
    finally:
        if lock_file is not None:
            lock_file.close()


def _take_lock(run_dir: Path):
    """(open lock file, None) when this process now holds the run directory's lock and can write
    its checkpoints, else (None, the one-line reason)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_file = open(run_dir / ".lock", "a+")  # noqa: SIM115 (held for the whole run)
    except OSError as error:
        return None, f"--out {run_dir}: cannot create the run directory ({error.strerror})"
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "another process"
        lock_file.close()
        return None, (
            f"run directory {run_dir} is in use by {holder}: wait for it to finish, stop it, "
            "or choose another --out"
        )
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"process {os.getpid()} on {os.uname().nodename}\n")
    lock_file.flush()
    try:
        runtime.check_writable(run_dir / "checkpoints" / "last.pt", "--out")
    except UserError as error:
        lock_file.close()
        return None, str(error)
    return lock_file, None


def save_recipe_history(recipe: Recipe, run_dir: Path) -> None:
    """Writes recipe.yaml; a different earlier recipe.yaml is kept as recipe.N.yaml first."""
    path = run_dir / "recipe.yaml"
    text = recipe_to_yaml(recipe)
    if path.exists() and path.read_text() != text:
        number = 1
        while (run_dir / f"recipe.{number}.yaml").exists():
            number += 1
        os.replace(path, run_dir / f"recipe.{number}.yaml")
    runtime.write_text(path, text)


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """One training run of one process: built once, then driven by `_run`."""

    def __init__(self, recipe: Recipe, task: Task, device: torch.device, run_dir: Path) -> None:
        self.recipe, self.task, self.device, self.run_dir = recipe, task, device, run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.rank, self.world_size = runtime.rank_and_world()
        self.is_main = self.rank == 0
        self.console = Console(stderr=True, quiet=not self.is_main, soft_wrap=True)
        self.started = time.perf_counter()
        self.state = TrainState()
        # written from rank 0 once the run is validated and resumed (`_run`)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", None, enabled=False)
        self.epoch_train_loss: float | None = None
        cfg = recipe.train
        self.local_batch = cfg.batch_size // self.world_size
        eval_batch = cfg.eval_batch_size or self.local_batch // cfg.accum_steps
        self.train_loader, self.val_loader = task.build_loaders(
            device, self.local_batch, eval_batch
        )
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise UserError(
                f"train.batch_size: {cfg.batch_size} is larger than the training set "
                f"({getattr(self.train_loader, 'num_samples', '?')} samples)"
            )
        schedule = recipe.schedule
        self.total_steps = schedule.steps or schedule.epochs * self.steps_per_epoch
        # with `schedule.steps`, the last epoch stops part-way
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self._build_model()
        self._build_optimizer()

    def _build_model(self) -> None:
        """The model (same initial weights on every rank), its EMA, and the wrapped model."""
        cfg = self.recipe.train
        seed_everything(cfg.seed)
        self.model = self.task.build_model()
        freeze(self.model, self.recipe.model.freeze)
        self.model.to(self.device)
        if hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(
                bool(cfg.grad_checkpointing), stages=cfg.grad_checkpointing
            )
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.ema = (
            ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
            if cfg.ema
            else None
        )
        seed_everything(cfg.seed + self.rank)
        self.train_model: nn.Module = self.model
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # Depthwise-conv weight gradients come back from oneDNN with other strides on their
            # size-1 dimension; DDP copies them into its buckets and warns once per process.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)

    def _build_optimizer(self) -> None:
        """AdamW at the recipe's peak lr (scaled by the global batch), and the grad scaler."""
        optim = self.recipe.optim
        scale = self.recipe.train.batch_size / optim.lr_base_batch if optim.lr_base_batch else 1
        self.peak_lr = optim.lr * scale
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, optim.weight_decay, optim.layer_decay),
            lr=self.peak_lr,
            betas=tuple(optim.betas),
            eps=optim.eps,
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.recipe.train.precision == "fp16"
        )

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step`: a pure function of the recipe and step,
        so a resumed run follows the schedule of the recipe it is given."""
        schedule = self.recipe.schedule
        steps_per_unit = 1 if schedule.steps else self.steps_per_epoch
        warmup_steps = schedule.warmup_steps
        if warmup_steps is None:
            warmup_steps = round(schedule.warmup_epochs * self.steps_per_epoch)
        factor = lr_factor(
            step,
            warmup_steps=warmup_steps,
            total_steps=self.total_steps,
            warmup_ratio=min(1.0, schedule.warmup_lr / self.peak_lr),
            min_ratio=min(1.0, schedule.min_lr / self.peak_lr),
            decay=schedule.decay,
            power=schedule.power,
            milestone_steps=[round(m * steps_per_unit) for m in schedule.milestones],
            gamma=schedule.gamma,
        )
        return self.peak_lr * factor

    # ------------------------------------------------------------------------- checkpoints

    def checkpoint(self) -> dict[str, Any]:
        """Everything needed to continue exactly from here (collective: every rank calls it)."""
        state = self.state.state_dict()
        state["wall_s"] = self.state.wall_s + time.perf_counter() - self.started
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "train_state": runtime.gather(state),
            "rng": runtime.gather(rng_state()),
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.world_size,
            "recipe": recipe_to_dict(self.recipe),
        }

    def save(self, *names: str) -> None:
        """Writes the checkpoint as checkpoints/<name> for each name, from rank 0."""
        state = self.checkpoint()
        if self.is_main:
            for name in names:
                save_checkpoint(state, self.ckpt_dir / name)

    def resume(self, path: Path) -> None:
        """Continues from the checkpoint at `path`, refusing one this run cannot continue."""
        checkpoint = load_checkpoint(path)
        try:
            self._check_resumable(checkpoint, path)
            self._restore(checkpoint)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as error:
            detail = " ".join(f"{type(error).__name__}: {error}".split())[:200]
            raise UserError(
                f"--resume {path}: a damaged training checkpoint ({detail}); resume from another "
                "checkpoint or start over with --fresh"
            ) from None
        self.console.print(
            f"resuming from {path} at epoch {self.state.epoch + 1}, step {self.state.step}",
            highlight=False,
        )

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        """Loads weights, optimizer, grad scaler, TrainState and this rank's RNG states."""
        self.model.load_state_dict(checkpoint["model"])
        if self.ema is not None and checkpoint.get("ema") is not None:
            self.ema.module.load_state_dict(checkpoint["ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        same_world = checkpoint["world_size"] == self.world_size
        self.state.load_state_dict(checkpoint["train_state"][self.rank if same_world else 0])
        if same_world:
            set_rng_state(checkpoint["rng"][self.rank])
        else:
            self.console.print(
                f"[yellow]warning:[/] checkpoint made with {checkpoint['world_size']} "
                "processes: RNG streams restart",
                highlight=False,
            )

    def _check_resumable(self, checkpoint: dict[str, Any], path: Path) -> None:
        """One line for a checkpoint this run cannot continue: not a training checkpoint, an
        older format, or a recipe that changed what cannot change (model, data, batch)."""
        if not is_training_checkpoint(checkpoint):
            raise UserError(
                f"--resume {path}: not a training checkpoint of this tool (use it with eval, or "
                "as model weights)"
            )
        if checkpoint["format"] != FORMAT:
            raise UserError(
                f"--resume {path}: made by an older version ({checkpoint['format']}); evaluate "
                "it with `debiformer eval`, or start over with --fresh"
            )
        before = fixed_on_resume(checkpoint["recipe"])
        now = fixed_on_resume(recipe_to_dict(self.recipe))
        changed = [key for key in now if before.get(key) != now[key]]
        if changed:
            key = changed[0]
            raise UserError(
                f"--resume {path}: {key} was {before.get(key)!r}, the recipe now says {now[key]!r};"
                " the model, data and batch cannot change on resume (use --fresh or another --out)"
            )
        if checkpoint["steps_per_epoch"] != self.steps_per_epoch:
            raise UserError(
                f"--resume {path}: it was made with {checkpoint['steps_per_epoch']} steps per "
                f"epoch, this run has {self.steps_per_epoch} (the data set changed)"
            )

    # ------------------------------------------------------------------------- training

    def check_finite(self, loss_value: float, where: str) -> None:
        """Stops the run on a NaN/infinite loss, before any checkpoint could hold its weights."""
        if math.isfinite(loss_value):
            return
        last = self.ckpt_dir / "last.pt"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint yet"
        raise NonFiniteLossError(
            f"training loss is {loss_value} {where}: stopping; {kept}. Try a lower optim.lr, "
            "optim.clip_grad, or train.precision: bf16 instead of fp16"
        )

    def optimizer_step(self, batch: Any) -> torch.Tensor:
        """One optimizer step over `batch` in `train.accum_steps` micro-batches; its loss."""
        cfg = self.recipe.train
        lr = self.lr_at(self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        total = torch.zeros((), device=self.device)
        parts = list(micro_batches(batch, cfg.accum_steps))
        for k, part in enumerate(parts):
            sync = k == len(parts) - 1 or self.world_size == 1
            with nullcontext() if sync else self.train_model.no_sync():
                with runtime.autocast(self.device, cfg.precision):
                    loss = self.task.loss(self.train_model, part) / len(parts)
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.recipe.optim.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def train_epoch(self, stop: StopRequest, progress: Progress, bar) -> str | None:
        """Trains the running epoch from `state.batch` on; the signal that stopped it, if any."""
        state, cfg, out = self.state, self.recipe.train, self.recipe.output
        self.task.start_epoch(state.epoch)
        self.train_model.train()
        window = {"loss": torch.zeros((), device=self.device), "steps": 0, "s": 0.0, "images": 0}
        epoch_loss = torch.full((), state.epoch_loss, device=self.device)
        tick = time.perf_counter()
        for batch in self.train_loader.batches(state.epoch, state.batch):
            generator = batch_generator(
                cfg.seed, state.epoch, self.rank, state.batch, self.device, TASK_STREAM
            )
            loss = self.optimizer_step(self.task.prepare_batch(batch, generator))
            state.step, state.batch = state.step + 1, state.batch + 1
            if self.ema is not None:
                self.ema.update(self.model, step=state.step)
            if self.device.type == "cuda" and state.step % out.log_every == 0:
                runtime.synchronize(self.device)
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            window["loss"] += loss
            epoch_loss += loss
            window["steps"] += 1
            window["s"] += elapsed
            window["images"] += cfg.batch_size
            state.epoch_steps += 1
            state.train_s += elapsed
            state.train_images += cfg.batch_size
            progress.advance(bar)
            if state.step % out.log_every == 0:
                self.log_window(window, progress, bar)
            if state.step == self.total_steps:
                break
            stop_now = runtime.any_rank(stop.signal_name is not None, self.device)
            periodic = out.checkpoint_every and state.step % out.checkpoint_every == 0
            if (periodic and state.batch < self.steps_per_epoch) or stop_now:
                state.epoch_loss = float(epoch_loss)
                where = f"in epoch {state.epoch + 1} (by step {state.step})"
                self.check_finite(runtime.mean_over_ranks(epoch_loss), where)
                self.save("last.pt")
                tick = time.perf_counter()
            if stop_now:
                return stop.signal_name or "signal on another rank"
        state.epoch_loss = float(epoch_loss)
        return None

    def log_window(self, window: dict[str, Any], progress: Progress, bar) -> None:
        """Writes one `train` metrics line for the steps since the last one, and resets them."""
        step = self.state.step
        mean_loss = runtime.mean_over_ranks(window["loss"] / window["steps"])
        self.check_finite(mean_loss, f"between steps {step - window['steps'] + 1} and {step}")
        lr = self.optimizer.param_groups[0]["lr"]
        images_per_s = window["images"] / max(window["s"], 1e-9)
        epoch = self.state.epoch + self.state.batch / self.steps_per_epoch
        self.metrics.write(
            {
                "kind": "train",
                "epoch": epoch,
                "step": step,
                "loss": mean_loss,
                "lr": lr,
                "images_per_s": images_per_s,
            }
        )
        progress.update(bar, loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", ips=f"{images_per_s:.0f}")
        window["loss"].zero_()
        window.update(steps=0, s=0.0, images=0)

    def end_epoch(self) -> None:
        """Closes the trained epoch: its checkpoint first (so a failing evaluation loses no
        training), then `finish_epoch`."""
        state = self.state
        mean = runtime.mean_over_ranks(
            torch.tensor(state.epoch_loss / max(state.epoch_steps, 1), device=self.device)
        )
        self.check_finite(mean, f"in epoch {state.epoch + 1}")
        self.epoch_train_loss = mean
        state.epoch, state.batch = state.epoch + 1, 0
        state.epoch_loss, state.epoch_steps = 0.0, 0
        state.eval_pending = True
        self.save("last.pt")
        self.finish_epoch()

    def finish_epoch(self) -> None:
        """Evaluates the finished epoch when due, writes its metrics line, last.pt and best.pt."""
        state, cfg = self.state, self.recipe.train
        record = {"kind": "epoch", "epoch": state.epoch, "step": state.step}
        if self.epoch_train_loss is not None:
            record["train_loss"] = self.epoch_train_loss
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        improved, evaluated = False, False
        if state.epoch % cfg.eval_every == 0 or state.epoch == self.epochs:
            state.last_eval, evaluated = self.evaluate(), True
            record.update(state.last_eval)
            metric = self.task.best_metric
            value = max(state.last_eval[metric], state.last_eval.get(f"ema_{metric}", -math.inf))
            if state.best_value is None or value > state.best_value:
                state.best_value, state.best_epoch, improved = value, state.epoch, True
        state.eval_pending = False
        self.epoch_train_loss = None
        self.console.print(self.describe_epoch(record, evaluated), highlight=False)
        self.metrics.write(record)
        self.save(*(("last.pt", "best.pt") if improved else ("last.pt",)))

    def evaluate(self) -> dict[str, float]:
        """The task's validation metrics of the model, and of its EMA prefixed `ema_`."""
        with runtime.autocast(self.device, self.recipe.train.precision):
            metrics = self.task.evaluate(self.model, self.val_loader)
            if self.ema is not None:
                ema_metrics = self.task.evaluate(self.ema.module, self.val_loader)
                metrics.update({f"ema_{key}": value for key, value in ema_metrics.items()})
        return metrics

    def describe_epoch(self, record: dict[str, Any], evaluated: bool) -> str:
        """One console line for an epoch record."""
        text = f"epoch {record['epoch']}"
        if "train_loss" in record:
            text += f": train loss {record['train_loss']:.4f}"
        metrics = self.state.last_eval
        if evaluated and metrics:
            plain = {k: v for k, v in metrics.items() if not k.startswith("ema_")}
            text += f"; val {self.task.describe(plain)}"
            ema = {k[4:]: v for k, v in metrics.items() if k.startswith("ema_")}
            if ema:
                text += f"; EMA {self.task.describe(ema)}"
        return text

    def summary(self, stopped: str | None) -> dict[str, Any]:
        """The run's summary: what ran, the last and best metrics, times and throughput."""
        state, cfg = self.state, self.recipe.train
        return {
            "model": self.recipe.model.name,
            "recipe": self.recipe.name,
            "parameters": self.num_params,
            "device": self.device.type,
            "world_size": self.world_size,
            "global_batch": cfg.batch_size,
            "epochs": round(state.step / self.steps_per_epoch, 4),
            "steps": state.step,
            **(state.last_eval or {}),
            "best_metric": self.task.best_metric,
            f"best_{self.task.best_metric}": state.best_value,
            "best_epoch": state.best_epoch,
            "wall_s": state.wall_s + time.perf_counter() - self.started,
            "train_s": state.train_s,
            "images_per_s": state.train_images / max(state.train_s, 1e-9),
            "stopped": stopped,
            "run_dir": str(self.run_dir),
        }


# ----------------------------------------------------------------------------- fit


def fit(
    recipe: Recipe,
    task: Task,
    *,
    run_dir: str | Path,
    resume: str | Path | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Trains `task` as `recipe` says and returns the summary (also <run_dir>/summary.json).

    Resumes from `resume`, or else from <run_dir>/checkpoints/last.pt when it exists (unless
    `fresh`; a torchrun restart always resumes). SIGINT/SIGTERM save a checkpoint after the
    current step and return early, with `stopped` set in the returned summary.
    """
    if resume is not None and fresh:
        raise UserError("--resume and --fresh contradict each other: give one of them")
    device = runtime.select_device(recipe.train.device, option="train.device")
    runtime.check_precision(recipe.train.precision, device, option="train.precision")
    own_group = runtime.is_distributed() and not dist.is_initialized()
    if own_group:
        runtime.init_process_group(device)
    try:
        return _run(recipe, task, device, Path(run_dir), resume, fresh)
    finally:
        if own_group:
            dist.destroy_process_group()


def _run(
    recipe: Recipe,
    task: Task,
    device: torch.device,
    run_dir: Path,
    resume: str | Path | None,
    fresh: bool,
) -> dict[str, Any]:
    """`fit` once processes and devices are set up."""
    check_batch(recipe)
    if recipe.output.tensorboard:
        summary_writer_class()  # without the package, stop before any work
    with open_run(run_dir, is_main=runtime.rank_and_world()[0] == 0):
        trainer = Trainer(recipe, task, device, run_dir)
        resume_path = resume_source(run_dir, resume, fresh)
        if resume_path is not None:
            trainer.resume(resume_path)
        if trainer.is_main:
            save_recipe_history(recipe, run_dir)
        trainer.metrics = MetricsLog(
            run_dir / "metrics.jsonl",
            trainer.state.step if resume_path else None,
            enabled=trainer.is_main,
            tensorboard_dir=run_dir / "tensorboard" if recipe.output.tensorboard else None,
        )
        trainer.console.print(
            f"{recipe.model.name}: {trainer.num_params / 1e6:.2f} M parameters, "
            f"{trainer.world_size} process(es) on {device.type}, batch {recipe.train.batch_size} "
            f"(global), {trainer.steps_per_epoch} steps/epoch, {trainer.epochs} epochs "
            f"({trainer.total_steps} steps), "
            f"peak lr {trainer.peak_lr:.3g}; run directory {run_dir}",
            highlight=False,
        )
        try:
            stopped = train_epochs(trainer)
        finally:
            trainer.metrics.close()
        summary = trainer.summary(stopped)
        report(trainer, summary)
        write_curves(trainer)
    return summary


def check_batch(recipe: Recipe) -> None:
    """The global batch splits evenly over processes and accumulation steps."""
    world_size = runtime.rank_and_world()[1]
    cfg = recipe.train
    if cfg.batch_size % (world_size * cfg.accum_steps):
        raise UserError(
            f"train.batch_size: {cfg.batch_size} does not divide into {world_size} processes "
            f"x {cfg.accum_steps} accumulation steps"
        )


def resume_source(run_dir: Path, resume: str | Path | None, fresh: bool) -> Path | None:
    """The checkpoint to resume from: `resume`, else the run's last.pt unless `fresh`; a
    torchrun restart continues from the run's last.pt whatever was asked."""
    last = run_dir / "checkpoints" / "last.pt"
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    if (restarted or (resume is None and not fresh)) and last.exists():
        return last
    return Path(resume) if resume is not None else None


def train_epochs(trainer: Trainer) -> str | None:
    """The epoch loop; returns the signal that stopped it early, if any."""
    state, epochs = trainer.state, trainer.epochs
    enabled = trainer.is_main and trainer.recipe.output.progress
    with StopRequest() as stop, progress_bar(enabled, trainer.console) as progress:
        bar = progress.add_task(
            "train", total=trainer.total_steps, completed=state.step, loss="-", lr="-", ips="-"
        )
        if state.eval_pending:
            trainer.finish_epoch()
        while state.epoch < epochs:
            progress.update(bar, description=f"epoch {state.epoch + 1}/{epochs}")
            stopped = trainer.train_epoch(stop, progress, bar)
            if stopped:
                return stopped
            trainer.end_epoch()
    return None


def report(trainer: Trainer, summary: dict[str, Any]) -> None:
    """Writes summary.json (a finished run) or says how to resume (a stopped one)."""
    if summary["stopped"]:
        trainer.console.print(
            f"stopped by {summary['stopped']} at step {summary['steps']}; checkpoint saved to "
            f"{trainer.ckpt_dir / 'last.pt'}. Run the same command again to resume.",
            highlight=False,
        )
        return
    if trainer.is_main:
        runtime.write_json(trainer.run_dir / "summary.json", summary)
        metric = trainer.task.best_metric
        value = summary.get(metric)
        shown = "n/a" if value is None else f"{value:.4g}"
        trainer.console.print(
            f"done: {metric} {shown} after {summary['wall_s'] / 60:.1f} min "
            f"({summary['images_per_s']:.0f} img/s training); {trainer.run_dir / 'summary.json'}",
            highlight=False,
        )


def write_curves(trainer: Trainer) -> None:
    """<run>/curves.png (`debiformer plot` of the run) from rank 0 at the end of a training,
    stopped or finished; skipped with a one-line notice without matplotlib. Never fails the
    training: a drawing error is a one-line warning."""
    if not trainer.is_main:
        return
    if importlib.util.find_spec("matplotlib") is None:
        trainer.console.print(
            "curves.png skipped: matplotlib is not installed (pip install 'debiformer[viz]')",
            highlight=False,
        )
        return
    from debiformer.tools.plot import write_run_curves

    try:
        write_run_curves(trainer.run_dir)
    except Exception as error:  # a figure must never fail a training that has finished
        detail = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        trainer.console.print(
            f"[yellow]warning:[/] curves.png not written ({detail})", highlight=False
        )
