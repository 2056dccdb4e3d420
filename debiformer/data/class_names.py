"""A classifier's class names, found once for every command that names classes (`eval`,
`predict`, `show`, `export`): the recipe's data, a training checkpoint's recipe, an export's
recorded names, ImageNet's, or "class k"."""

from __future__ import annotations

import json
from pathlib import Path

from debiformer.recipe import Recipe, recipe_from_stored
from debiformer.weights import WeightsFile, exported_config

IMAGENET_CLASSES = 1000


def recipe_class_names(recipe: Recipe) -> list[str] | None:
    """The class names of a classification recipe's data: the class file beside an FFCV file,
    Fashion-MNIST's, or the class folders of an image folder; None when none is found."""
    from debiformer.data.ffcv_files import classes_path
    from debiformer.data.sources import FASHION_MNIST_PREFIX, FashionMNIST, fashion_mnist_root

    data = recipe.data
    paths = [data.val_path, data.train_path]
    if data.backend == "ffcv":
        for path in paths:
            if path and classes_path(path).is_file():
                return json.loads(classes_path(path).read_text()).get("classes")
        paths = [data.val_source, data.train_source]
    for path in filter(None, paths):
        if str(path).startswith(FASHION_MNIST_PREFIX) or fashion_mnist_root(path):
            return list(FashionMNIST.classes)
        if Path(path).is_dir():
            return sorted(entry.name for entry in Path(path).iterdir() if entry.is_dir())
    return None


def exported_class_names(file: WeightsFile | None) -> list[str] | None:
    """The class names an export recorded in its config ("label_names"), if any."""
    config = exported_config(file) if file is not None else None
    names = (config or {}).get("label_names")
    return [str(name) for name in names] if isinstance(names, list) else None


def known_class_names(
    recipe: Recipe | None, file: WeightsFile | None, num_classes: int
) -> list[str]:
    """A name per class: the recipe's data's, else the recipe a training checkpoint `file`
    stores, else an export's recorded names, else ImageNet's or "class k" (`class_names`)."""
    if recipe is None and file is not None and file.recipe is not None:
        recipe = recipe_from_stored(file.recipe)
    names = recipe_class_names(recipe) if recipe is not None else exported_class_names(file)
    return class_names(names, num_classes)


def class_names(names: list[str] | None, num_classes: int) -> list[str]:
    """`names` when there is one per class; else ImageNet's for 1000 classes; else "class k"."""
    if names is not None and len(names) == num_classes:
        return list(names)
    if num_classes == IMAGENET_CLASSES:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(k).split(",")[0] for k in range(num_classes)]
    return [f"class {k}" for k in range(num_classes)]
