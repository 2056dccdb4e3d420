"""A toy regression task that plugs into the engine through the `Task` interface alone, its
recipe, and a reader of the run's metrics lines: the engine's tests and the curves' tests share
them."""

import json
from pathlib import Path

import torch
from torch import nn

from debiformer.engine import Metric, Task
from debiformer.recipe import Recipe, recipe_from_dict
from tests.helpers.recipes import merge_sections


class LineLoader:
    """Noisy samples of y = x - 0.5 in batches; batch b of epoch e is a function of (e, b)."""

    def __init__(self, batch_size: int, batches: int, seed: int, poison_from: int | None = None):
        self.batch_size, self.num_batches, self.seed = batch_size, batches, seed
        self.poison_from = poison_from
        self.num_samples = batch_size * batches

    def __len__(self) -> int:
        return self.num_batches

    def batches(self, epoch: int, start_batch: int = 0):
        for batch in range(start_batch, self.num_batches):
            generator = torch.Generator().manual_seed(self.seed * 10_000 + epoch * 100 + batch)
            x = torch.rand(self.batch_size, 1, generator=generator)
            y = x - 0.5 + 0.01 * torch.randn(self.batch_size, 1, generator=generator)
            if (
                self.poison_from is not None
                and epoch * self.num_batches + batch >= self.poison_from
            ):
                y = y * float("nan")
            yield x, y

    def __iter__(self):
        return self.batches(0)


class LineTask(Task):
    """Fits a line with a linear layer: what any task must give the engine, and nothing more.
    Its best metric, the negated mean squared error, is higher-is-better."""

    metrics = (Metric("neg_mse", "-MSE", "{:.5f}"),)
    best_metric = "neg_mse"

    def __init__(self, poison_from: int | None = None):
        self.poison_from = poison_from

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(1, 8), nn.Dropout(0.1), nn.Linear(8, 1))

    def build_loaders(self, device, batch_size, eval_batch_size):
        train = LineLoader(batch_size, 6, seed=1, poison_from=self.poison_from)
        return train, LineLoader(eval_batch_size, 2, seed=2)

    def prepare_batch(self, batch, generator):
        x, y = batch
        return x + 0.001 * torch.randn(x.shape, generator=generator), y

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    @torch.no_grad()
    def evaluate(self, model, loader) -> dict[str, float]:
        model.eval()
        errors = [nn.functional.mse_loss(model(x), y).item() for x, y in loader.batches(0)]
        model.train()
        return {"neg_mse": -sum(errors) / len(errors)}


def toy_recipe(**sections: dict) -> Recipe:
    """A 3-epoch recipe for `LineTask` with EMA; `sections` override its keys."""
    recipe = {
        "model": {"name": "debiformer_nano"},
        "optim": {"lr": 0.05, "lr_base_batch": None},
        "schedule": {"epochs": 3, "warmup_epochs": 0.5, "warmup_lr": 1e-4, "min_lr": 1e-4},
        "train": {"batch_size": 8, "device": "cpu", "seed": 7, "ema": True, "ema_decay": 0.5},
        "output": {"log_every": 2, "checkpoint_every": 4, "progress": False},
    }
    return recipe_from_dict({"name": "toy", **merge_sections(recipe, **sections)})


def metrics_lines(run_dir: Path, kind: str) -> list[dict]:
    """The run's metrics.jsonl lines of `kind` ("train" or "epoch")."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if record["kind"] == kind]
