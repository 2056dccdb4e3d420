"""A trained classifier ready to apply to image files (`show`, `predict`): the network, built by
`weights.build_model` from a variant name, a recipe and/or weights; its class names; and the
evaluation preprocessing its weights were trained with.

    load_classifier   the classifier, from what the user gives (model, recipe, checkpoint, start)
    load_onnx_classifier  an exported ONNX file, run by onnxruntime, with its recorded config
    Preprocessing     resize, centre crop, normalise: the loaders' evaluation transform, so that
                      a prediction on a file equals `eval` on the same image
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from debiformer.data.class_names import (
    IMAGENET_CLASSES,
    class_names,
    exported_class_names,
    recipe_class_names,
)
from debiformer.data.loaders import CentreCrop, DeviceBatchTransform
from debiformer.errors import UserError
from debiformer.recipe import Recipe, load_recipe, recipe_from_stored
from debiformer.weights import (
    EXPORT_CONFIG_KEY,
    ModelSpec,
    WeightsFile,
    build_model,
    open_weights,
    spec_of_checkpoint,
)


@dataclass(frozen=True)
class Preprocessing:
    """How a classifier's evaluation images are made: the shorter side resized to
    `size / crop_pct` (`interpolation`), the centre `size` x `size` cropped, ImageNet's mean and
    std applied, as the torchvision loader's validation split does (`data.loaders.CentreCrop`,
    `DeviceBatchTransform`)."""

    size: int
    crop_pct: float
    interpolation: str

    @classmethod
    def of(cls, spec: ModelSpec, model: nn.Module) -> Preprocessing:
        """The preprocessing recorded in `spec` (a recipe's or a checkpoint's), else the model's
        timm config (the release's: 224, crop 0.875, bicubic)."""
        config = {**model.pretrained_cfg, **spec.preprocessing}
        return cls(config["input_size"][-1], config["crop_pct"], config["interpolation"])

    def crop(self, image: Image.Image) -> torch.Tensor:
        """The RGB `image` resized and centre-cropped: (3, size, size) uint8."""
        return CentreCrop(self.size, self.crop_pct, self.interpolation)(image)

    def normalise(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A uint8 batch of crops as the model's float input on `device`."""
        return DeviceBatchTransform(device, None, seed=0, rank=0)(images, epoch=0, batch=0)


@dataclass
class Classifier:
    """A classifier in eval mode, its variant `name`, a name per class, its preprocessing, and
    where its weights came from (a file, a URL or "random")."""

    model: nn.Module
    name: str
    class_names: list[str]
    preprocessing: Preprocessing
    weights: str


def load_classifier(
    model_name: str | None = None,
    recipe: str | None = None,
    checkpoint: str | Path | None = None,
    pretrained: str | None = None,
    *,
    work: str = "this command",
) -> Classifier:
    """The variant `model_name`, else the recipe's, else the one a `checkpoint` (or `pretrained`
    file) of this tool records, built by `weights.build_model` with the exact weights of
    `checkpoint`, started from `pretrained` (a file or URL), or random. Class names and
    preprocessing come from `recipe`, else the recipe a training checkpoint stores: its data's
    class names or, for 1000 classes, ImageNet's. `work` names the command in errors."""
    if checkpoint is not None and pretrained is not None:
        raise UserError("give checkpoint or pretrained weights, not both")
    source = checkpoint if checkpoint is not None else pretrained
    file = open_weights(source) if source is not None else None
    given = load_recipe(recipe) if recipe is not None else None
    the_recipe = given or (recipe_from_stored(file.recipe) if file and file.recipe else None)
    spec = _classifier_spec(model_name, given, file)
    recipe_spec = ModelSpec.from_recipe(the_recipe, 0) if the_recipe else spec
    recipe_spec.require_classifier(work)
    spec.require_classifier(work)
    names = recipe_class_names(the_recipe) if the_recipe else exported_class_names(file)
    if file is None:
        declared = the_recipe.data.num_classes if the_recipe else None
        spec = replace(spec, num_classes=len(names or []) or declared or IMAGENET_CLASSES)
    exact = file if checkpoint is not None else None
    start = file if pretrained is not None else None
    model, provenance = build_model(spec, checkpoint=exact, pretrained=start)
    return Classifier(
        model.eval(),
        spec.name,
        class_names(names, spec.num_classes),
        Preprocessing.of(recipe_spec, model),
        provenance.source or "random",
    )


def _classifier_spec(
    model_name: str | None, recipe: Recipe | None, file: WeightsFile | None
) -> ModelSpec:
    """The network to build: the variant `model_name`, else the recipe's, else what `file`
    records; with a file, its weights' class count."""
    if file is not None:
        return spec_of_checkpoint(file, recipe=recipe, model=model_name)
    if model_name is not None:
        return ModelSpec(model_name)
    if recipe is not None:
        return ModelSpec.from_recipe(recipe, IMAGENET_CLASSES)
    raise UserError(
        "give a model name, a recipe or a checkpoint of this tool (it records its model)"
    )


class OnnxClassifier(nn.Module):
    """An exported ONNX classifier run by onnxruntime on the CPU, as a module that maps a
    normalised image batch to logits: a file exported with batch 1 is run image by image."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        from debiformer.tools.export import INPUT_NAME, OUTPUT_NAME, onnx_session

        self.session = onnx_session(path)
        self.names = (INPUT_NAME, OUTPUT_NAME)
        self.fixed_batch = self.session.get_inputs()[0].shape[0] == 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        input_name, output_name = self.names
        batches = images.split(1) if self.fixed_batch else [images]
        logits = [
            self.session.run([output_name], {input_name: batch.float().cpu().numpy()})[0]
            for batch in batches
        ]
        return torch.from_numpy(np.concatenate(logits))


def load_onnx_classifier(path: str | Path) -> Classifier:
    """The ONNX file `debiformer export` wrote, with the preprocessing and class names its
    recorded config holds; a one-line `UserError` for a file without that config or for an
    input that is not square."""
    path = Path(path)
    if path.suffix != ".onnx" or not path.is_file():
        raise UserError(
            f"{path}: give an .onnx file that debiformer export wrote", about="checkpoint"
        )
    model = OnnxClassifier(path)
    metadata = model.session.get_modelmeta().custom_metadata_map
    if EXPORT_CONFIG_KEY not in metadata:
        raise UserError(
            f"{path}: records no {EXPORT_CONFIG_KEY!r} config (debiformer export writes one); "
            "export the model again",
            about="checkpoint",
        )
    config = json.loads(metadata[EXPORT_CONFIG_KEY])
    height, width = config["input_size"][1:]
    if height != width:
        raise UserError(f"{path}: its input is {height}x{width}; predict takes square inputs")
    preprocessing = Preprocessing(width, config["crop_pct"], config["interpolation"])
    names = class_names(config.get("label_names"), config["num_classes"])
    return Classifier(model, config["model"], names, preprocessing, str(path))
