"""The training loop: `fit(recipe, task, run_dir=...)` trains any task, top to bottom.

    fit                        processes and devices, the run directory's lock, then:
      Trainer.__init__         data, model, EMA, optimizer, schedule; resume; recipe history
      Trainer.fit              per epoch: train_one_epoch, save_epoch, evaluate, log_epoch
      Trainer.summary/report   summary.json, then curves.png

A task (`Task`) supplies what differs between tasks: the data, the model, the loss of a batch
and the validation metrics it declares. Everything else, DDP, precision, accumulation, clipping,
EMA, the schedule, exact resume, signals, the NaN stop, metrics.jsonl, progress and the summary,
lives here once.

One process: `fit(recipe, task)`. Several: start it under `torchrun` (`debiformer train` does
this when asked for several processes); `train.batch_size` is the global batch. Exact resume: a checkpoint holds
the model, EMA, optimizer, grad scaler, the `TrainState` (position, metric windows, best, history)
and every rank's RNG states; data augmentations draw from generators seeded by (seed, epoch,
rank, batch), and a loader starts an epoch at any batch, so on the CPU a resumed run continues bit
for bit like an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
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
from debiformer.engine.progress import LossWindow, ProgressBar
from debiformer.engine.rundir import (
    MetricsLog,
    open_run,
    save_recipe_history,
    summary_writer_class,
    write_curves,
)
from debiformer.engine.schedule import LrSchedule, build_optimizer, freeze, set_lr
from debiformer.engine.state import StopRequest, TrainState
from debiformer.engine.task import Task
from debiformer.engine.trackers import open_trackers
from debiformer.errors import UserError, mention
from debiformer.recipe import Recipe, fixed_on_resume, recipe_to_dict
from debiformer.weights import require_finite, spec_entry


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the last checkpoint written before it is kept."""


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
    `fresh`; a torchrun restart always resumes). SIGINT/SIGTERM/SIGUSR1 save a checkpoint after the
    current step and return early, with `stopped` set in the returned summary.
    """
    if resume is not None and fresh:
        raise UserError(
            f"{mention('resume')} and {mention('fresh')} contradict each other: give one of them"
        )
    task.best()  # a task that declares no metric to pick best.pt stops before any work
    device = runtime.select_device(recipe.train.device, option="train.device")
    runtime.check_precision(recipe.train.precision, device, option="train.precision")
    own_group = runtime.is_distributed() and not dist.is_initialized()
    if own_group:
        runtime.init_process_group(device)
    try:
        check_batch(recipe)
        if recipe.output.tensorboard:
            summary_writer_class()  # without the package, stop before any work
        run_dir = Path(run_dir)
        with open_run(run_dir, is_main=runtime.rank_and_world()[0] == 0):
            trainer = Trainer(recipe, task, device, run_dir, resume_source(run_dir, resume, fresh))
            return trainer.fit()
    finally:
        if own_group:
            dist.destroy_process_group()


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


class Trainer:
    """One training run of one process: set up by `__init__` (resumed from `resume_from` when
    given), run by `fit`."""

    def __init__(
        self,
        recipe: Recipe,
        task: Task,
        device: torch.device,
        run_dir: Path,
        resume_from: Path | None = None,
    ) -> None:
        self.recipe, self.task, self.device, self.run_dir = recipe, task, device, run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.rank, self.world_size = runtime.rank_and_world()
        self.is_main = self.rank == 0
        self.precision = runtime.resolve_precision(
            recipe.train.precision, device, option="train.precision"
        )
        self.console = Console(stderr=True, quiet=not self.is_main, soft_wrap=True)
        self.started = time.perf_counter()
        self.state = TrainState()
        self._build_loaders()
        self._build_model()
        self.optimizer = build_optimizer(
            self.model,
            recipe.optim,
            self.schedule.peak_lr,
            pretrained=recipe.model.pretrained is not None,
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        if resume_from is not None:
            self.resume(resume_from)
        if self.is_main:
            save_recipe_history(recipe, run_dir)
        output = recipe.output
        tensorboard = output.tensorboard or "tensorboard" in output.trackers
        self.metrics = MetricsLog(
            run_dir / "metrics.jsonl",
            self.state.step if resume_from is not None else None,
            enabled=self.is_main,
            tensorboard_dir=run_dir / "tensorboard" if tensorboard else None,
            trackers=self._trackers(run_dir) if self.is_main else None,
        )

    def _trackers(self, run_dir: Path) -> list:
        """The experiment trackers `output.trackers` names, started or resumed."""
        output = self.recipe.output
        return open_trackers(
            output.trackers,
            run_dir,
            recipe_to_dict(self.recipe),
            wandb_project=output.wandb_project,
            mlflow_uri=output.mlflow_uri,
            console=self.console,
        )

    def _build_loaders(self) -> None:
        """The data (rank 0 prepares it while the others wait), this rank's loaders, and the
        schedule on the training set's length."""
        cfg = self.recipe.train
        if self.is_main:
            self.task.prepare_data()
        runtime.barrier()
        local_batch = cfg.batch_size // self.world_size
        eval_batch = cfg.eval_batch_size or local_batch // cfg.accum_steps
        self.train_loader, self.val_loader = self.task.build_loaders(
            self.device, local_batch, eval_batch
        )
        steps_per_epoch = len(self.train_loader)
        if steps_per_epoch == 0:
            raise UserError(
                f"train.batch_size: {cfg.batch_size} is larger than the training set "
                f"({getattr(self.train_loader, 'num_samples', '?')} samples)"
            )
        self.schedule = LrSchedule(self.recipe.schedule, self.recipe.optim, cfg.batch_size,
                                   steps_per_epoch)  # fmt: skip

    def _build_model(self) -> None:
        """The model (same initial weights on every rank), its EMA, and the wrapped model."""
        cfg = self.recipe.train
        seed_everything(cfg.seed)
        self.model = self.task.build_model()
        self.model_spec = self.task.model_spec()
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
            self.train_model = runtime.compile_model(self.train_model)

    # ------------------------------------------------------------------------- the loop

    def fit(self) -> dict[str, Any]:
        """Trains to the end of the schedule or a stop signal; returns the run's summary."""
        state, epochs = self.state, self.schedule.epochs
        self.print_start()
        stopped, summary = None, None
        try:
            with (
                StopRequest() as stop,
                self.progress_bar() as progress,
                runtime.compile_cache_errors("train.compile"),
            ):
                if state.eval_pending:  # saved before its evaluation, which did not finish
                    self.log_epoch(None, self.evaluate_if_due())
                while stopped is None and state.epoch < epochs:
                    progress.start_epoch(state.epoch, epochs)
                    stopped = self.train_one_epoch(stop, progress)
                    if stopped is None:
                        train_loss = self.save_epoch()
                        self.log_epoch(train_loss, self.evaluate_if_due())
            summary = self.summary(stopped)
        finally:
            self.metrics.close(summary if stopped is None else None)
        self.report(summary)
        if self.is_main:
            write_curves(self.run_dir, self.task.best_metric, self.console)
        return summary

    def train_one_epoch(self, stop: StopRequest, progress: ProgressBar) -> str | None:
        """Trains the running epoch from `state.batch` on; the signal that stopped it, if any."""
        state, cfg = self.state, self.recipe.train
        self.task.start_epoch(state.epoch)
        self.train_model.train()
        window = LossWindow(self.device)
        epoch_loss = torch.full((), state.epoch_loss, device=self.device)
        tick = time.perf_counter()
        for batch in self.train_loader.batches(state.epoch, state.batch):
            generator = batch_generator(
                cfg.seed, state.epoch, self.rank, state.batch, self.device, TASK_STREAM
            )
            loss = self.optimizer_step(self.task.prepare_batch(batch, generator))
            self.count_step()
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            window.add(loss, elapsed, cfg.batch_size)
            epoch_loss += loss
            state.epoch_steps += 1
            state.train_s += elapsed
            state.train_images += cfg.batch_size
            progress.advance()
            if state.step % self.recipe.output.log_every == 0:
                self.log_window(window, progress)
            if state.step == self.schedule.total_steps:
                break
            stop_now = runtime.any_rank(stop.signal_name is not None, self.device)
            if stop_now or self.periodic_checkpoint_due():
                state.epoch_loss = float(epoch_loss)
                where = f"in epoch {state.epoch + 1} (by step {state.step})"
                self.check_finite(runtime.mean_over_ranks(epoch_loss), where)
                self.save("last.pt")
                tick = time.perf_counter()
            if stop_now:
                return stop.signal_name or "signal on another rank"
        state.epoch_loss = float(epoch_loss)
        return None

    def optimizer_step(self, batch: Any) -> torch.Tensor:
        """One optimizer step over `batch` in `train.accum_steps` micro-batches; its loss."""
        cfg = self.recipe.train
        set_lr(self.optimizer, self.schedule.lr_at(self.state.step))
        total = torch.zeros((), device=self.device)
        parts = list(micro_batches(batch, cfg.accum_steps))
        for k, part in enumerate(parts):
            sync = k == len(parts) - 1 or self.world_size == 1
            with nullcontext() if sync else self.train_model.no_sync():
                with runtime.autocast(self.device, self.precision):
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

    def count_step(self) -> None:
        """Counts the optimizer step just taken and updates the EMA (on CUDA, synchronised every
        `output.log_every` steps, so step times measure the GPU's work)."""
        state = self.state
        state.step, state.batch = state.step + 1, state.batch + 1
        if self.ema is not None:
            self.ema.update(self.model, step=state.step)
        if self.device.type == "cuda" and state.step % self.recipe.output.log_every == 0:
            runtime.synchronize(self.device)

    def periodic_checkpoint_due(self) -> bool:
        """Whether `output.checkpoint_every` asks for last.pt now (not at an epoch's end, which
        `save_epoch` saves anyway)."""
        every = self.recipe.output.checkpoint_every
        at_end = self.state.batch >= self.schedule.steps_per_epoch
        return bool(every) and self.state.step % every == 0 and not at_end

    def save_epoch(self) -> float:
        """Counts the trained epoch done and saves last.pt before its evaluation (so a failing
        evaluation loses no training); the epoch's mean training loss over all ranks."""
        state = self.state
        mean = runtime.mean_over_ranks(
            torch.tensor(state.epoch_loss / max(state.epoch_steps, 1), device=self.device)
        )
        self.check_finite(mean, f"in epoch {state.epoch + 1}")
        state.epoch, state.batch = state.epoch + 1, 0
        state.epoch_loss, state.epoch_steps = 0.0, 0
        state.eval_pending = True
        self.save("last.pt")
        return mean

    def evaluate_if_due(self) -> dict[str, Any] | None:
        """The validation metrics after the finished epoch, every `train.eval_every` epochs and
        after the last one; None between."""
        epoch = self.state.epoch
        due = epoch % self.recipe.train.eval_every == 0 or epoch == self.schedule.epochs
        return self.evaluate() if due else None

    def evaluate(self) -> dict[str, Any]:
        """The task's validation metrics of the model, and of its EMA prefixed `ema_`."""
        with runtime.autocast(self.device, self.precision):
            metrics = self.task.evaluate(self.model, self.val_loader)
            if self.ema is not None:
                ema_metrics = self.task.evaluate(self.ema.module, self.val_loader)
                metrics.update({f"ema_{key}": value for key, value in ema_metrics.items()})
        return metrics

    def log_epoch(self, train_loss: float | None, metrics: dict[str, Any] | None) -> None:
        """The finished epoch's metrics line and console line; last.pt, and best.pt when its
        best metric (of the model or its EMA) is the best so far."""
        state = self.state
        record: dict[str, Any] = {"kind": "epoch", "epoch": state.epoch, "step": state.step}
        if train_loss is not None:
            record["train_loss"] = train_loss
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        improved = False
        if metrics is not None:
            state.last_eval = metrics
            record.update(metrics)
            best = self.task.best()
            value = best.best_of(
                [metrics[k] for k in (best.key, f"ema_{best.key}") if k in metrics]
            )
            if best.better(value, state.best_value):
                state.best_value, state.best_epoch, improved = value, state.epoch, True
        state.eval_pending = False
        self.console.print(self.describe_epoch(record, metrics), highlight=False)
        self.metrics.write(record)
        self.save(*(("last.pt", "best.pt") if improved else ("last.pt",)))

    def log_window(self, window: LossWindow, progress: ProgressBar) -> None:
        """Writes one `train` metrics line for the steps since the last one, and resets them."""
        step = self.state.step
        mean_loss = runtime.mean_over_ranks(window.loss / window.steps)
        self.check_finite(mean_loss, f"between steps {step - window.steps + 1} and {step}")
        lr = self.optimizer.param_groups[0]["lr"]
        images_per_s = window.images / max(window.seconds, 1e-9)
        epoch = self.state.epoch + self.state.batch / self.schedule.steps_per_epoch
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
        progress.show(mean_loss, lr, images_per_s)
        window.reset()

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
            "steps_per_epoch": self.schedule.steps_per_epoch,
            "world_size": self.world_size,
            "recipe": recipe_to_dict(self.recipe),
            **({} if self.model_spec is None else spec_entry(self.model_spec)),
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
                f"{path}: a damaged training checkpoint ({detail}); resume from another "
                f"checkpoint or start over with {mention('fresh')}",
                about="resume",
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
        older format, a recipe that changed what cannot change (model, data, batch), or weights
        that hold NaN or infinite values."""
        if not is_training_checkpoint(checkpoint):
            raise UserError(
                f"{path}: not a training checkpoint of this tool (use it with eval, or as model "
                "weights)",
                about="resume",
            )
        if checkpoint["format"] != FORMAT:
            raise UserError(
                f"{path}: made by an older version ({checkpoint['format']}); evaluate it with "
                f"`debiformer eval`, or start over with {mention('fresh')}",
                about="resume",
            )
        before = fixed_on_resume(checkpoint["recipe"])
        now = fixed_on_resume(recipe_to_dict(self.recipe))
        changed = [key for key in now if before.get(key) != now[key]]
        if changed:
            key = changed[0]
            raise UserError(
                f"{path}: {key} was {before.get(key)!r}, the recipe now says {now[key]!r}; the "
                f"model, data and batch cannot change on resume (use {mention('fresh')} or "
                f"another {mention('run_dir')})",
                about="resume",
            )
        if checkpoint["steps_per_epoch"] != self.schedule.steps_per_epoch:
            raise UserError(
                f"{path}: it was made with {checkpoint['steps_per_epoch']} steps per epoch, this "
                f"run has {self.schedule.steps_per_epoch} (the data set changed)",
                about="resume",
            )
        for weights in ("model", "ema"):
            if checkpoint.get(weights) is not None:
                require_finite(checkpoint[weights], path)

    # ------------------------------------------------------------------------- reporting

    def print_start(self) -> None:
        """One console line: the model, processes, batch, schedule and run directory."""
        schedule = self.schedule
        self.console.print(
            f"{self.recipe.model.name}: {self.num_params / 1e6:.2f} M parameters, "
            f"{self.world_size} process(es) on {self.device.type}, precision "
            f"{runtime.precision_text(self.recipe.train.precision, self.device)}, batch "
            f"{self.recipe.train.batch_size} (global), {schedule.steps_per_epoch} steps/epoch, "
            f"{schedule.epochs} epochs ({schedule.total_steps} steps), "
            f"peak lr {schedule.peak_lr:.3g}; run directory {self.run_dir}",
            highlight=False,
        )

    def progress_bar(self) -> ProgressBar:
        """The rank-0 progress bar over the run's steps (`output.progress`)."""
        return ProgressBar(
            self.is_main and self.recipe.output.progress,
            self.console,
            total=self.schedule.total_steps,
            completed=self.state.step,
        )

    def describe_epoch(self, record: dict[str, Any], metrics: dict[str, Any] | None) -> str:
        """One console line for an epoch record."""
        text = f"epoch {record['epoch']}"
        if "train_loss" in record:
            text += f": train loss {record['train_loss']:.4f}"
        if metrics:
            plain = {k: v for k, v in metrics.items() if not k.startswith("ema_")}
            text += f"; val {self.task.describe(plain)}"
            ema = {k[4:]: v for k, v in metrics.items() if k.startswith("ema_")}
            if ema:
                text += f"; EMA {self.task.describe(ema)}"
        return text

    def summary(self, stopped: str | None) -> dict[str, Any]:
        """The run's summary: what ran, the last and best metrics, times and throughput, and the
        machine the throughput was measured on (`runtime.machine`, of the main process)."""
        state, cfg = self.state, self.recipe.train
        return {
            "model": self.recipe.model.name,
            "recipe": self.recipe.name,
            "parameters": self.num_params,
            "device": self.device.type,
            "precision": self.precision,
            "world_size": self.world_size,
            "global_batch": cfg.batch_size,
            "epochs": round(state.step / self.schedule.steps_per_epoch, 4),
            "steps": state.step,
            **(state.last_eval or {}),
            "best_metric": self.task.best_metric,
            f"best_{self.task.best_metric}": state.best_value,
            "best_epoch": state.best_epoch,
            "wall_s": state.wall_s + time.perf_counter() - self.started,
            "train_s": state.train_s,
            "images_per_s": state.train_images / max(state.train_s, 1e-9),
            "machine": runtime.machine(self.device),
            "stopped": stopped,
            "run_dir": str(self.run_dir),
        }

    def report(self, summary: dict[str, Any]) -> None:
        """Writes summary.json (a finished run) or says how to resume (a stopped one)."""
        if summary["stopped"]:
            self.console.print(
                f"stopped by {summary['stopped']} at step {summary['steps']}; checkpoint saved to "
                f"{self.ckpt_dir / 'last.pt'}. Run the same command again to resume.",
                highlight=False,
            )
            return
        if self.is_main:
            runtime.write_json(self.run_dir / "summary.json", summary)
            best = self.task.best()
            self.console.print(
                f"done: {best.show(summary.get(best.key))} after {summary['wall_s'] / 60:.1f} min "
                f"({summary['images_per_s']:.0f} img/s training); {self.run_dir / 'summary.json'}",
                highlight=False,
            )


# ----------------------------------------------------------------------------- small parts


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
