"""Evaluation (top-1, top-5, loss, images/s) and the builders it shares with training:
device, model and validation loader from a recipe, and loading weights from any checkpoint kind."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import debiformer
from debiformer.checkpoint import is_training_checkpoint, load_checkpoint
from debiformer.data import build_loader
from debiformer.errors import UserError
from debiformer.recipe import Recipe

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(choice: str) -> torch.device:
    """This process's device: `cuda:LOCAL_RANK` when CUDA is wanted and present, else the CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: cuda requested but no CUDA device is available")
    if choice in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def autocast(device: torch.device, amp: str) -> torch.autocast:
    """The autocast context for the recipe's `train.amp` setting (disabled for "off")."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def build_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """The recipe's network with `num_classes` outputs, its drop path and architecture overrides."""
    return debiformer.create_model(
        recipe.model.name,
        num_classes=num_classes,
        drop_path_rate=recipe.model.drop_path,
        **recipe.model.arch,
    )


def build_val_loader(recipe: Recipe, device: torch.device, batch_size: int, distributed: bool):
    """The validation loader described by the recipe's `data` section."""
    data = recipe.data
    if data.backend != "synthetic" and not data.val_path:
        raise UserError(
            f"data.val_path: not set; add --set data.val_path=... for the {data.backend} backend"
        )
    return build_loader(
        "val",
        backend=data.backend,
        path=data.val_path,
        image_size=data.val_image_size or data.image_size,
        batch_size=batch_size,
        num_workers=data.num_workers,
        seed=recipe.train.seed,
        device=device,
        distributed=distributed,
        crop_ratio=data.crop_ratio,
        num_classes=data.num_classes,
        synthetic_samples=data.synthetic_samples,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    *,
    amp: str = "off",
    channels_last: bool = False,
    distributed: bool = False,
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%), mean cross-entropy and images/s of `model` over `loader`.

    Under torch.distributed each rank reads its shard and the counts are summed over ranks.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, images
    start = time.perf_counter()
    for images, labels in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        totals += torch.stack(
            [
                F.cross_entropy(logits, labels, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                torch.tensor(float(len(labels)), dtype=torch.float64, device=device),
            ]
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    if distributed:
        dist.all_reduce(totals)
    model.train(was_training)
    loss_sum, top1, top5, count = totals.tolist()
    if count == 0:
        raise UserError("the validation set is empty")
    return {
        "top1": 100.0 * top1 / count,
        "top5": 100.0 * top5 / count,
        "loss": loss_sum / count,
        "images": int(count),
        "images_per_s": count / elapsed,
    }


def is_official_state_dict(state: dict[str, Any]) -> bool:
    """True for the authors' released checkpoints, recognised by their key names."""
    weights = state.get("model", state)
    return isinstance(weights, dict) and "downsample_layers.0.0.weight" in weights


def load_weights(
    model: nn.Module, state: dict[str, Any], path: Path, *, use_ema: bool, official: bool | None
) -> str:
    """Loads a checkpoint's weights into `model`; returns which weights were used."""
    if official if official is not None else is_official_state_dict(state):
        debiformer.load_official_state_dict(model, state.get("model", state))
        return "official"
    if is_training_checkpoint(state):
        if use_ema and state.get("ema") is None:
            raise UserError(
                f"checkpoint {path} holds no EMA weights (it was trained with train.ema: false)"
            )
        weights, kind = (state["ema"], "ema") if use_ema else (state["model"], "model")
    else:
        weights, kind = state.get("model", state), "state_dict"
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise UserError(f"checkpoint {path} does not match the recipe's model: {detail}") from None
    return kind


def evaluate_checkpoint(
    recipe: Recipe,
    checkpoint: str | Path,
    *,
    use_ema: bool = False,
    official: bool | None = None,
    json_path: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluates a checkpoint (this tool's, a bare state dict, or a released one) on the recipe's
    validation set; writes the result as JSON to `json_path` when given."""
    state = load_checkpoint(checkpoint)
    device = select_device(recipe.train.device)
    batch_size = recipe.train.eval_batch_size or recipe.train.batch_size // recipe.train.accum_steps
    loader = build_val_loader(recipe, device, batch_size, distributed=False)
    model = build_model(recipe, loader.num_classes)
    weights = load_weights(model, state, Path(checkpoint), use_ema=use_ema, official=official)
    model.to(device)
    if recipe.train.channels_last:
        model.to(memory_format=torch.channels_last)
    metrics = evaluate(
        model, loader, amp=recipe.train.amp, channels_last=recipe.train.channels_last
    )
    result = {
        "checkpoint": str(checkpoint),
        "weights": weights,
        "model": recipe.model.name,
        "image_size": recipe.data.val_image_size or recipe.data.image_size,
        "device": str(device),
        **metrics,
    }
    if json_path is not None:
        write_json(result, Path(json_path))
    return result


def write_json(data: dict[str, Any], path: Path) -> None:
    """Writes `data` as indented JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
