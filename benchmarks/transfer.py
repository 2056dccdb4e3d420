"""Transfer on Fashion-MNIST: does a pretrained DeBiFormer fine-tune better than one from scratch?

Pretrains debiformer_nano on classes 0-4 (T-shirt, trouser, pullover, dress, coat), then trains
a 5-way classifier of classes 5-9 (sandal, shirt, sneaker, bag, ankle boot) twice with the same
recipe and budget: once started from the pretrained weights (`model.pretrained`, a new head),
once from scratch. Prints the three test accuracies as JSON.

    python benchmarks/transfer.py --out runs/transfer --pretrain-per-class 6000 \
        --pretrain-epochs 2 --per-class 100 --epochs 3 --lr 1e-3
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from debiformer.data import FASHION_MNIST_DIR, read_fashion_mnist
from debiformer.recipe import Recipe, load_recipe
from debiformer.tasks.classification import train

FIRST_HALF, SECOND_HALF = range(0, 5), range(5, 10)


@dataclass(frozen=True)
class Budget:
    """Images per class and epochs of one training run, at a peak learning rate."""

    per_class: int
    epochs: int
    lr: float = 4e-3
    batch_size: int = 128


def write_class_subset(
    folder: Path, classes: range, per_class: int, split: str, source: str = FASHION_MNIST_DIR
) -> Path:
    """The first `per_class` images of each of `classes` in Fashion-MNIST's `split` as an
    ImageFolder of PNGs (one folder per class, in class order)."""
    images, labels = read_fashion_mnist(source, split)
    for rank, label in enumerate(classes):
        class_dir = folder / f"{rank}_{label}"
        class_dir.mkdir(parents=True, exist_ok=True)
        for index, position in enumerate((labels == label).nonzero()[0][:per_class]):
            Image.fromarray(images[position]).save(class_dir / f"{index:05d}.png")
    return folder


def recipe_for(data: Path, budget: Budget, pretrained: Path | None) -> Recipe:
    """The quick start's recipe on the ImageFolders under `data` through torchvision."""
    overrides = [
        "data.backend=torchvision",
        f"data.train_path={data / 'train'}",
        f"data.val_path={data / 'test'}",
        "data.train_source=null",
        "data.val_source=null",
        "data.num_workers=1",
        f"schedule.epochs={budget.epochs}",
        "schedule.warmup_epochs=0.2",
        f"optim.lr={budget.lr}",
        f"train.batch_size={budget.batch_size}",
        f"train.eval_every={budget.epochs}",
        "output.progress=false",
        f"output.log_every={10**6}",
        f"model.pretrained={pretrained if pretrained else 'null'}",
        "model.new_head=true",
    ]
    return load_recipe("quickstart", overrides)


def run_transfer(
    out: Path, *, pretrain: Budget, finetune: Budget, test_per_class: int
) -> dict[str, float]:
    """Test top-1 (%) of the pretraining on classes 0-4 (`pretrain`), and of the fine-tuned and
    the scratch 5-way models of classes 5-9, both trained with the `finetune` budget."""
    write_class_subset(out / "first" / "train", FIRST_HALF, pretrain.per_class, "train")
    write_class_subset(out / "second" / "train", SECOND_HALF, finetune.per_class, "train")
    for name, classes in (("first", FIRST_HALF), ("second", SECOND_HALF)):
        write_class_subset(out / name / "test", classes, test_per_class, "test")
    pretrained = out / "runs" / "pretrain" / "checkpoints" / "last.pt"
    runs = {
        "pretrain": (out / "first", pretrain, None),
        "finetune": (out / "second", finetune, pretrained),
        "scratch": (out / "second", finetune, None),
    }
    top1 = {}
    for name, (data, budget, weights) in runs.items():
        recipe = recipe_for(data, budget, weights)
        top1[name] = train(recipe, run_dir=out / "runs" / name, fresh=True)["top1"]
    return top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/transfer"))
    parser.add_argument("--pretrain-per-class", type=int, default=6000)
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=100, help="fine-tuning images per class")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning peak learning rate")
    parser.add_argument("--test-per-class", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    top1 = run_transfer(
        args.out,
        pretrain=Budget(args.pretrain_per_class, args.pretrain_epochs, batch_size=args.batch_size),
        finetune=Budget(args.per_class, args.epochs, args.lr, args.batch_size),
        test_per_class=args.test_per_class,
    )
    print(json.dumps(top1, indent=2))


if __name__ == "__main__":
    main()
