"""What detection and segmentation share: a DeBiFormer backbone under a dense head, trained on
folders of images with target files (COCO annotations, label masks), evaluated on every rank's
shard, and a figure of a few validation images with their predictions (predictions.png).

`DenseTask` owns the shared steps: rank 0 writes the recipe's mosaics before anyone reads, the
loaders of both splits, writing predictions.png after each evaluation, and `evaluate_checkpoint`
for `debiformer eval`; its network is the one `weights.build_model` makes of the recipe's spec.
A dense task says only what differs: how a split is read (`read_data`), the evaluation
(`run_evaluation`), the picture of its predictions (`draw_predictions`) and the settings an
evaluation result records (`evaluation_settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.io import encode_png
from torchvision.utils import make_grid

from debiformer import runtime
from debiformer.data.checks import CheckSettings, default_cache_dir
from debiformer.data.images import PixelLimit
from debiformer.data.mosaics import prepare_mosaics
from debiformer.engine import Task
from debiformer.recipe import Recipe
from debiformer.tasks import Evaluation, eval_batch_size, open_checkpoint, start_model
from debiformer.weights import ModelSpec, build_model

# one bright colour per class (matplotlib's tab10, cycled), readable on dark and light images
CLASS_COLOURS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def grid(panels: list[Tensor], columns: int) -> Tensor:
    """uint8 (3, H, W) `panels` padded to the largest one's size, in rows of `columns`."""
    height = max(panel.shape[1] for panel in panels)
    width = max(panel.shape[2] for panel in panels)
    panels = [F.pad(p, (0, width - p.shape[2], 0, height - p.shape[1])) for p in panels]
    return make_grid(panels, nrow=columns, padding=4)


class DenseTask(Task):
    """A task on images with target files; subclasses implement the methods that raise.

    `loader_class` reads one split: `loader_class(data, train=..., batch_size=..., device=...,
    num_workers=..., seed=..., rank=..., world_size=...)` for what `read_data` returns.
    """

    loader_class: ClassVar[type]

    def __init__(self, recipe: Recipe, run_dir: str | Path | None = None) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.class_names: list[str] = []
        self.device = torch.device("cpu")
        self.prepared: dict[str, Any] = {}

    # ------------------------------------------------------------------------- what differs

    def read_data(self, split: str) -> Any:
        """The recipe's "train" or "val" split: its samples and `class_names`, every sample
        checked (`debiformer.data.checks`) under `check_settings`."""
        raise NotImplementedError

    def run_evaluation(self, model: nn.Module, loader: Any) -> Evaluation:
        """The metrics of `model` over every rank's shard of `loader`, and this rank's first
        previews (as many as the recipe's `preview_images`)."""
        raise NotImplementedError

    def draw_predictions(self, previews: list[Any], class_names: list[str]) -> Tensor:
        """One uint8 (3, H, W) image of `previews`."""
        raise NotImplementedError

    def evaluation_settings(self) -> dict[str, Any]:
        """How the recipe evaluates (e.g. the head, the inference mode), for `evaluate_checkpoint`
        results."""
        raise NotImplementedError

    def check_splits(self, train_data: Any, val_data: Any) -> None:
        """A one-line error where the splits cannot train together; nothing by default."""

    # ------------------------------------------------------------------------- shared

    def check_settings(self) -> CheckSettings:
        """How `read_data` checks a split: the recipe's pixel limit (`data.max_image_pixels`), a
        progress bar on rank 0 (`output.progress`), `data.num_workers` threads, the user's cache."""
        data = self.recipe.data
        return CheckSettings(
            limit=PixelLimit(data.max_image_pixels, "data.max_image_pixels"),
            progress=self.recipe.output.progress and runtime.rank_and_world()[0] == 0,
            workers=max(1, data.num_workers),
            cache=default_cache_dir(),
        )

    def prepare_data(self) -> None:
        """Writes the recipe's mosaics (`data.mosaics`) when it asks for them and they are
        missing, then reads and checks both splits, kept for `build_loaders`: bad data stops the
        run here, on rank 0 while the other ranks wait, and their own checks find it cached."""
        prepare_mosaics(self.recipe.data.mosaics)
        self.prepared = {split: self.read_data(split) for split in ("train", "val")}
        self.check_splits(self.prepared["train"], self.prepared["val"])

    def build_loaders(self, device: torch.device, batch_size: int, eval_batch_size: int):
        train_data, val_data = (
            self.prepared.pop(split) if split in self.prepared else self.read_data(split)
            for split in ("train", "val")
        )
        self.check_splits(train_data, val_data)
        self.class_names, self.device = train_data.class_names, device
        return (
            self.build_split_loader(train_data, device, batch_size, train=True),
            self.build_split_loader(val_data, device, eval_batch_size, train=False),
        )

    def build_split_loader(self, data: Any, device: torch.device, batch_size: int, train: bool):
        """This process's loader of one split: its shard under torchrun, batches on `device`."""
        rank, world_size = runtime.rank_and_world()
        return self.loader_class(
            data,
            batch_size=batch_size,
            train=train,
            device=device,
            num_workers=self.recipe.data.num_workers,
            seed=self.recipe.train.seed,
            rank=rank,
            world_size=world_size,
        )

    def model_spec(self) -> ModelSpec:
        return ModelSpec.from_recipe(self.recipe, len(self.class_names))

    def build_model(self) -> nn.Module:
        return start_model(self.recipe, self.model_spec())

    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, Any]:
        """The metrics of `model`; rank 0 draws <run_dir>/predictions.png on the way."""
        evaluation = self.run_evaluation(model, loader)
        if self.run_dir is not None and runtime.rank_and_world()[0] == 0:
            self.write_predictions(self.run_dir / "predictions.png", evaluation.previews)
        return evaluation.metrics

    def write_predictions(self, path: Path, previews: list[Any]) -> None:
        """`draw_predictions` of `previews` as a PNG file, written atomically (none without
        previews)."""
        if previews:
            image = self.draw_predictions(previews, self.class_names)
            with runtime.atomic_writer(path, "wb") as file:
                file.write(encode_png(image).numpy().tobytes())

    def evaluate_checkpoint(
        self, checkpoint: str | Path, *, use_ema: bool = False, json_path: str | Path | None = None
    ) -> dict[str, Any]:
        """The metrics of a checkpoint of this tool on the recipe's validation set; writes the
        result as JSON to `json_path` when given, and predictions.png beside it."""
        recipe = self.recipe
        file, device, precision = open_checkpoint(recipe, checkpoint, json_path)
        val_data = self.read_data("val")
        self.class_names = val_data.class_names
        loader = self.build_split_loader(val_data, device, eval_batch_size(recipe), train=False)
        # every weight comes from the checkpoint: nothing is read from `model.pretrained`
        model, provenance = build_model(
            self.model_spec(), checkpoint=file, ema=use_ema, official=False
        )
        with runtime.autocast(device, precision):
            evaluation = self.run_evaluation(model.to(device), loader)
        result = {
            "checkpoint": str(checkpoint),
            "weights": provenance.weights,
            "model": recipe.model.name,
            **self.evaluation_settings(),
            "images": len(val_data.samples),
            "device": str(device),
            **evaluation.metrics,
        }
        if json_path is not None:
            runtime.write_json(json_path, result)
            self.write_predictions(
                Path(json_path).with_name("predictions.png"), evaluation.previews
            )
        return result
