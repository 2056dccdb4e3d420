"""The training loop, top to bottom: setup and DDP, data, model, optimizer and schedule, EMA,
resume, the step loop with logging and checkpoints, evaluation, summary.

One process: `train(recipe)`. Several: start this under `torchrun` (the CLI does it for
`--nproc-per-node N`); each process reads WORLD_SIZE/RANK/LOCAL_RANK from the environment,
uses NCCL on GPUs and gloo on the CPU. `train.batch_size` is the global batch.

Exact resume: every checkpoint holds model, optimizer, schedule, grad scaler, EMA, the position
(epoch, batch within the epoch, global step), and the RNG states of every rank both at the start
of the epoch and at the step. Resuming replays the epoch's data order from its start state,
skips the batches already done, then restores the step state, so on the CPU an interrupted run
continues bit for bit like an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import random
import signal
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
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
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from debiformer.checkpoint import (
    is_training_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from debiformer.data import build_loader, ensure_ffcv_file
from debiformer.errors import UserError
from debiformer.evaluate import (
    autocast,
    build_model,
    build_val_loader,
    evaluate,
    select_device,
    write_json,
)
from debiformer.recipe import Recipe, recipe_to_dict, save_recipe


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the last checkpoint written before it is kept."""


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


# ----------------------------------------------------------------------------- setup helpers


def init_process_group(backend: str) -> None:
    """Joins the torchrun job, keying the rendezvous by restart attempt: torchrun keeps its store
    across `--max-restarts` restarts, and restarted workers must not read the dead ones' addresses."""
    store, rank, world_size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"debiformer/attempt_{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fall_back_without_ffcv(recipe: Recipe, console: Console) -> Recipe:
    """The recipe to run: an FFCV recipe with `*_source`s reads them through torchvision when FFCV
    is not installed (installs without the OpenCV headers it builds against)."""
    data = recipe.data
    if data.backend != "ffcv" or importlib.util.find_spec("ffcv") is not None:
        return recipe
    if data.train_source is None or data.val_source is None:
        return recipe  # the data module's import error says how to install FFCV
    console.print(
        "[yellow]warning:[/] FFCV is not installed: reading data.train_source and "
        "data.val_source with the torchvision backend",
        highlight=False,
    )
    fallback = dataclasses.replace(
        data, backend="torchvision", train_path=data.train_source, val_path=data.val_source
    )
    return dataclasses.replace(recipe, data=fallback)


def prepare_ffcv_files(recipe: Recipe, splits: tuple[str, ...] = ("train", "val")) -> None:
    """Converts `data.<split>_source` to the FFCV file `data.<split>_path` where that is missing."""
    data = recipe.data
    if data.backend != "ffcv":
        return
    for split in splits:
        path, source = getattr(data, f"{split}_path"), getattr(data, f"{split}_source")
        if path is None:
            raise UserError(
                f"data.{split}_path: not set; add --set data.{split}_path=/path/to/{split}.beton"
            )
        if not Path(path).exists() and source is None:
            raise UserError(
                f"data.{split}_path: FFCV file {path} does not exist (set data.{split}_source "
                "to convert one, or make it with `debiformer data convert`)"
            )
        if source is not None:
            options = {"split": "train" if split == "train" else "test", **data.ffcv_writer}
            ensure_ffcv_file(source, path, **options)


def build_train_loader(recipe: Recipe, device: torch.device, batch_size: int, distributed: bool):
    """The training loader described by the recipe's `data` and `augment` sections."""
    data, aug = recipe.data, recipe.augment
    if data.backend != "synthetic" and not data.train_path:
        raise UserError(
            f"data.train_path: not set; add --set data.train_path=... ({data.backend} backend)"
        )
    augment = {
        "hflip": 0.5 if aug.hflip else 0.0,
        "scale": tuple(aug.scale),
        "ratio": tuple(aug.ratio),
        "randaugment": aug.randaugment,
        "random_erasing": aug.random_erasing,
    }
    return build_loader(
        "train",
        backend=data.backend,
        path=data.train_path,
        image_size=data.image_size,
        batch_size=batch_size,
        num_workers=data.num_workers,
        seed=recipe.train.seed,
        device=device,
        distributed=distributed,
        augment=augment,
        crop_ratio=data.crop_ratio,
        num_classes=data.num_classes,
        synthetic_samples=data.synthetic_samples,
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weights; none on norms, biases and position-bias tables."""
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
    step: int, *, warmup_steps: int, total_steps: int, warmup_ratio: float, min_ratio: float
) -> float:
    """Peak-lr multiplier at `step`: linear warm-up from `warmup_ratio`, cosine to `min_ratio`."""
    if step < warmup_steps:
        return warmup_ratio + (1 - warmup_ratio) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_criterion(recipe: Recipe, num_classes: int) -> tuple[nn.Module, Mixup | None]:
    """The loss, and the mixup/cutmix transform when enabled (it then applies label smoothing)."""
    aug = recipe.augment
    if aug.mixup > 0 or aug.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=aug.mixup,
            cutmix_alpha=aug.cutmix,
            prob=aug.mixup_prob,
            switch_prob=aug.mixup_switch_prob,
            label_smoothing=aug.label_smoothing,
            num_classes=num_classes,
        )
        return SoftTargetCrossEntropy(), mixup
    if aug.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(aug.label_smoothing), None
    return nn.CrossEntropyLoss(), None


def gather(value: Any, distributed: bool) -> list[Any]:
    """`value` from every rank, in rank order."""
    if not distributed:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def mean_over_ranks(value: torch.Tensor, distributed: bool) -> float:
    """The mean of a scalar tensor over ranks, as a Python float (a host sync)."""
    if distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def any_rank(flag: bool, device: torch.device, distributed: bool) -> bool:
    """True if `flag` is set on any rank (every rank gets the same answer)."""
    if not distributed:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class MetricsLog:
    """Appends JSON lines to metrics.jsonl; on resume, drops lines written after the checkpoint."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if json.loads(line)["step"] <= resume_step
            ]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def write(self, record: dict[str, Any]) -> None:
        """Appends one record."""
        if self.enabled:
            with open(self.path, "a") as file:
                file.write(json.dumps(record) + "\n")


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    accum_steps: int,
    amp: str,
    clip_grad: float | None,
    channels_last: bool,
    distributed: bool,
) -> torch.Tensor:
    """One optimizer step over a batch split into `accum_steps` micro-batches; returns its loss.

    Micro-batch k takes every accum_steps-th sample from k, the same way the data loader shards
    a global batch over ranks, so one process with accumulation computes what several would.
    """
    device = images.device
    total = torch.zeros((), device=device)
    for k in range(accum_steps):
        x, y = images[k::accum_steps], targets[k::accum_steps]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        last = k == accum_steps - 1
        with nullcontext() if last or not distributed else model.no_sync():
            with autocast(device, amp):
                loss = criterion(model(x), y) / accum_steps
            scaler.scale(loss).backward()
        total += loss.detach()
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return total


def evaluate_model_and_ema(
    model: nn.Module, ema: ModelEmaV3 | None, loader, recipe: Recipe, distributed: bool
) -> dict[str, float]:
    """Validation metrics of the model, plus those of its EMA prefixed `ema_` when there is one."""
    options = {"amp": recipe.train.amp, "channels_last": recipe.train.channels_last}
    metrics = evaluate(model, loader, distributed=distributed, **options)
    if ema is not None:
        ema_metrics = evaluate(ema.module, loader, distributed=distributed, **options)
        metrics.update({f"ema_{key}": value for key, value in ema_metrics.items()})
    return metrics


def describe_epoch(record: dict[str, Any]) -> str:
    """One console line for an epoch record."""
    text = f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}"
    if "top1" in record:
        text += f", val top-1 {record['top1']:.2f}%, top-5 {record['top5']:.2f}%"
        text += f", loss {record['loss']:.4f}"
    if "ema_top1" in record:
        text += f", EMA top-1 {record['ema_top1']:.2f}%"
    return text


def _progress(enabled: bool, console: Console) -> Progress:
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


# ----------------------------------------------------------------------------- training


def train(
    recipe: Recipe,
    *,
    out_dir: str | Path | None = None,
    resume: str | Path | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Trains as the recipe says and returns the summary (also written to <run dir>/summary.json).

    Resumes from `resume`, or else from <run dir>/checkpoints/last.pt when it exists (unless
    `fresh`). SIGINT/SIGTERM save a checkpoint after the current step and return early.
    """
    # --- processes and devices
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = select_device(recipe.train.device)
    own_group = distributed and not dist.is_initialized()
    if own_group:
        init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(recipe, device, distributed, out_dir=out_dir, resume=resume, fresh=fresh)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(
    recipe: Recipe,
    device: torch.device,
    distributed: bool,
    *,
    out_dir: str | Path | None,
    resume: str | Path | None,
    fresh: bool,
) -> dict[str, Any]:
    """`train` once processes and devices are set up."""
    started = time.perf_counter()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    is_main = rank == 0
    console = Console(stderr=True, quiet=not is_main, soft_wrap=True)
    recipe = fall_back_without_ffcv(recipe, console)
    cfg, out = recipe.train, recipe.output
    if cfg.batch_size % (world_size * cfg.accum_steps):
        raise UserError(
            f"train.batch_size: {cfg.batch_size} does not divide into {world_size} processes "
            f"x {cfg.accum_steps} accumulation steps"
        )
    local_batch = cfg.batch_size // world_size
    if (recipe.augment.mixup > 0 or recipe.augment.cutmix > 0) and local_batch % 2:
        raise UserError(
            f"train.batch_size: mixup/cutmix need an even batch per process, got {local_batch}"
        )
    run_dir = Path(out_dir or out.dir or Path("runs") / recipe.name)
    ckpt_dir = run_dir / "checkpoints"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")

    # --- data (rank 0 converts missing FFCV files first)
    if is_main:
        prepare_ffcv_files(recipe)
    if distributed:
        dist.barrier()
    train_loader = build_train_loader(recipe, device, local_batch, distributed)
    eval_batch = cfg.eval_batch_size or local_batch // cfg.accum_steps
    val_loader = build_val_loader(recipe, device, eval_batch, distributed)
    num_classes = recipe.data.num_classes or train_loader.num_classes
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise UserError(
            f"train.batch_size: {cfg.batch_size} is larger than the training set "
            f"({train_loader.num_samples} images)"
        )
    total_steps = recipe.schedule.epochs * steps_per_epoch

    # --- model (same initial weights on every rank), EMA
    seed_everything(cfg.seed)
    model = build_model(recipe, num_classes).to(device)
    model.set_grad_checkpointing(bool(cfg.grad_checkpointing), stages=cfg.grad_checkpointing)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    num_params = sum(p.numel() for p in model.parameters())
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema else None
    seed_everything(cfg.seed + rank)

    # --- optimizer, per-step schedule, grad scaler, loss
    peak_lr = recipe.optim.lr * (
        cfg.batch_size / recipe.optim.lr_base_batch if recipe.optim.lr_base_batch else 1
    )
    optimizer = torch.optim.AdamW(
        param_groups(model, recipe.optim.weight_decay),
        lr=peak_lr,
        betas=tuple(recipe.optim.betas),
        eps=recipe.optim.eps,
    )
    warmup_steps = round(recipe.schedule.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            warmup_ratio=min(1.0, recipe.schedule.warmup_lr / peak_lr),
            min_ratio=min(1.0, recipe.schedule.min_lr / peak_lr),
        ),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    criterion, mixup = build_criterion(recipe, num_classes)

    # --- resume
    # a torchrun restart continues from this run's last checkpoint, whatever --resume/--fresh said
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    resume_path = Path(resume) if resume else None
    if (restarted or (resume_path is None and not fresh)) and (ckpt_dir / "last.pt").exists():
        resume_path = ckpt_dir / "last.pt"
    start_epoch, start_batch, step = 0, 0, 0
    best = {"top1": -1.0, "epoch": None}
    history = {"wall_s": 0.0, "train_s": 0.0, "train_images": 0}
    epoch_rngs: list[Any] | None = None
    epoch_losses: list[tuple[float, int]] | None = None
    last_eval: dict[str, Any] | None = None
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        if not is_training_checkpoint(state):
            raise UserError(
                f"--resume {resume_path}: not a training checkpoint of this tool (use it with eval)"
            )
        if state["steps_per_epoch"] != steps_per_epoch:
            raise UserError(
                f"--resume {resume_path}: it was made with {state['steps_per_epoch']} steps per "
                f"epoch, this run has {steps_per_epoch} (the batch size or data set changed)"
            )
        model.load_state_dict(state["model"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        best, history, last_eval = state["best"], state["history"], state["eval"]
        if len(state["rng"]) == world_size:
            set_rng_state(state["rng"][rank])
            epoch_rngs, epoch_losses = state["epoch_rng"], state["epoch_loss"]
        else:
            console.print(
                f"[yellow]warning:[/] checkpoint made with {len(state['rng'])} processes: "
                "RNG streams restart"
            )
        console.print(
            f"resuming from {resume_path} at epoch {start_epoch + 1}, step {step}", highlight=False
        )
    metrics = MetricsLog(run_dir / "metrics.jsonl", step if resume_path else None, enabled=is_main)

    # --- wrap for DDP and compile
    train_model: nn.Module = model
    if distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        # Depthwise-conv weight gradients come back from oneDNN with other strides on their
        # size-1 dimension; DDP copies them into its buckets and warns once per process.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        train_model = torch.compile(train_model)

    recipe_dict = recipe_to_dict(recipe)

    def checkpoint_state(
        epoch: int, batch: int, epoch_rng: Any, epoch_loss: tuple[float, int]
    ) -> dict[str, Any]:
        """Everything needed to continue exactly from here (collective: every rank must call it)."""
        rngs, epoch_rngs_all = gather(rng_state(), distributed), gather(epoch_rng, distributed)
        return {
            "model": model.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "batch": batch,
            "step": step,
            "steps_per_epoch": steps_per_epoch,
            "rng": rngs,
            "epoch_rng": epoch_rngs_all,
            "epoch_loss": gather(epoch_loss, distributed),
            "best": dict(best),
            "history": {**history, "wall_s": history["wall_s"] + time.perf_counter() - started},
            "eval": last_eval,
            "recipe": recipe_dict,
            "world_size": world_size,
        }

    def save(name: str, state: dict[str, Any]) -> None:
        """Writes checkpoints/<name> from rank 0."""
        if is_main:
            save_checkpoint(state, ckpt_dir / name)

    def check_finite(loss_value: float, where: str) -> None:
        """Stops the run on a NaN/infinite loss, before any checkpoint could hold its weights."""
        if not math.isfinite(loss_value):
            last = ckpt_dir / "last.pt"
            kept = (
                f"the last good checkpoint is {last}"
                if last.exists()
                else "no checkpoint was written yet"
            )
            raise NonFiniteLossError(
                f"training loss is {loss_value} {where}: stopping; {kept}. Try a lower optim.lr, "
                f"optim.clip_grad, or train.amp: bf16 instead of fp16"
            )

    stopped: str | None = None
    console.print(
        f"{recipe.model.name}: {num_params / 1e6:.2f} M parameters, {world_size} process(es) "
        f"on {device.type}, batch {cfg.batch_size} (global), {steps_per_epoch} steps/epoch, "
        f"{recipe.schedule.epochs} epochs, peak lr {peak_lr:.3g}; run directory {run_dir}",
        highlight=False,
    )

    # --- the loop
    window_loss = torch.zeros((), device=device)  # summed since the last metrics line
    window_steps, window_time, window_images = 0, 0.0, 0
    with StopRequest() as stop, _progress(is_main and out.progress, console) as progress:
        task = progress.add_task(
            "train", total=total_steps, completed=step, loss="-", lr="-", ips="-"
        )
        for epoch in range(start_epoch, recipe.schedule.epochs):
            train_loader.set_epoch(epoch)
            if mixup is not None and recipe.augment.mixup_off_epoch is not None:
                mixup.mixup_enabled = epoch < recipe.augment.mixup_off_epoch
            skip = start_batch if epoch == start_epoch else 0
            if skip and epoch_rngs is not None:
                step_rng = rng_state()
                set_rng_state(epoch_rngs[rank])
            epoch_rng = rng_state()
            batches = iter(train_loader)
            for _ in range(skip):
                next(batches)
            if skip and epoch_rngs is not None:
                set_rng_state(step_rng)
            progress.update(task, description=f"epoch {epoch + 1}/{recipe.schedule.epochs}")
            epoch_loss, epoch_steps = torch.zeros((), device=device), 0
            if skip and epoch_losses is not None:
                epoch_loss += epoch_losses[rank][0]
                epoch_steps = epoch_losses[rank][1]
            epoch_start = tick = time.perf_counter()
            train_model.train()
            for batch, (images, labels) in enumerate(batches, start=skip + 1):
                if mixup is not None:
                    images, labels = mixup(images, labels)
                loss = train_step(
                    train_model,
                    images,
                    labels,
                    criterion=criterion,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    accum_steps=cfg.accum_steps,
                    amp=cfg.amp,
                    clip_grad=recipe.optim.clip_grad,
                    channels_last=cfg.channels_last,
                    distributed=distributed,
                )
                step += 1
                if ema is not None:
                    ema.update(model, step=step)
                if device.type == "cuda" and step % out.log_every == 0:
                    torch.cuda.synchronize(device)
                elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                window_loss += loss
                epoch_loss += loss
                window_steps, epoch_steps = window_steps + 1, epoch_steps + 1
                window_time += elapsed
                window_images += cfg.batch_size
                history["train_s"] += elapsed
                history["train_images"] += cfg.batch_size
                progress.advance(task)

                if step % out.log_every == 0:
                    mean_loss = mean_over_ranks(window_loss / window_steps, distributed)
                    check_finite(mean_loss, f"between steps {step - window_steps + 1} and {step}")
                    lr = optimizer.param_groups[0]["lr"]
                    ips = window_images / max(window_time, 1e-9)
                    metrics.write(
                        {
                            "kind": "train",
                            "epoch": epoch + batch / steps_per_epoch,
                            "step": step,
                            "loss": mean_loss,
                            "lr": lr,
                            "images_per_s": ips,
                        }
                    )
                    progress.update(task, loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", ips=f"{ips:.0f}")
                    window_loss.zero_()
                    window_steps, window_time, window_images = 0, 0.0, 0

                stop_now = any_rank(stop.signal_name is not None, device, distributed)
                periodic = (
                    out.checkpoint_every
                    and step % out.checkpoint_every == 0
                    and batch < steps_per_epoch
                )
                if periodic or stop_now:
                    check_finite(
                        mean_over_ranks(epoch_loss, distributed),
                        f"in epoch {epoch + 1} (by step {step})",
                    )
                    save(
                        "last.pt",
                        checkpoint_state(epoch, batch, epoch_rng, (float(epoch_loss), epoch_steps)),
                    )
                    tick = time.perf_counter()
                if stop_now:
                    stopped = stop.signal_name or "signal on another rank"
                    break
            if stopped:
                break

            # --- end of epoch: evaluate, log, checkpoint
            epoch_mean = mean_over_ranks(epoch_loss / max(epoch_steps, 1), distributed)
            check_finite(epoch_mean, f"in epoch {epoch + 1}")
            record = {
                "kind": "epoch",
                "epoch": epoch + 1,
                "step": step,
                "train_loss": epoch_mean,
                "lr": optimizer.param_groups[0]["lr"],
                "epoch_s": time.perf_counter() - epoch_start,
            }
            improved = False
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == recipe.schedule.epochs:
                last_eval = evaluate_model_and_ema(model, ema, val_loader, recipe, distributed)
                record.update(last_eval)
                top1 = max(last_eval["top1"], last_eval.get("ema_top1", -1.0))
                if top1 > best["top1"]:
                    best, improved = {"top1": top1, "epoch": epoch + 1}, True
            console.print(describe_epoch(record), highlight=False)
            metrics.write(record)
            state = checkpoint_state(epoch + 1, 0, rng_state(), (0.0, 0))
            save("last.pt", state)
            if improved:
                save("best.pt", state)

    # --- summary
    evaluation = last_eval or {}
    summary = {
        "model": recipe.model.name,
        "recipe": recipe.name,
        "parameters": num_params,
        "device": device.type,
        "world_size": world_size,
        "global_batch": cfg.batch_size,
        "epochs": round(step / steps_per_epoch, 4),
        "steps": step,
        "top1": evaluation.get("top1"),
        "top5": evaluation.get("top5"),
        "loss": evaluation.get("loss"),
        **(
            {"ema_top1": evaluation.get("ema_top1"), "ema_top5": evaluation.get("ema_top5")}
            if ema
            else {}
        ),
        "best_top1": best["top1"] if best["epoch"] is not None else None,
        "best_epoch": best["epoch"],
        "wall_s": history["wall_s"] + time.perf_counter() - started,
        "train_s": history["train_s"],
        "images_per_s": history["train_images"] / max(history["train_s"], 1e-9),
        "eval_images_per_s": evaluation.get("images_per_s"),
        "stopped": stopped,
        "run_dir": str(run_dir),
    }
    if stopped:
        console.print(
            f"stopped by {stopped} at step {step}; checkpoint saved to {ckpt_dir / 'last.pt'}. "
            f"Run the same command again to resume.",
            highlight=False,
        )
    elif is_main:
        write_json(summary, run_dir / "summary.json")
        top1 = "n/a" if summary["top1"] is None else f"{summary['top1']:.2f}%"
        console.print(
            f"done: top-1 {top1} after {summary['wall_s'] / 60:.1f} min "
            f"({summary['images_per_s']:.0f} img/s training); {run_dir / 'summary.json'}",
            highlight=False,
        )
    return summary
