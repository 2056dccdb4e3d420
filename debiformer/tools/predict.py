"""`debiformer predict`: a trained classifier or segmenter applied to image files, its answers as
data.

    predict_classes    the top-k classes of every readable image, in batches
    write_predictions  one row per image, to CSV or JSON
    predict            the command: all of it, with a notice for each file that cannot be read;
                       a segmentation checkpoint's label PNGs come from `predict_segmentation`,
                       a detector's COCO results from `predict_detection`

Each image goes through the classifier's own evaluation transform (`classifier.Preprocessing`:
the recipe's for this tool's checkpoints, the release's for released weights), so a prediction
equals what `debiformer eval` computes for the same image.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from debiformer import runtime
from debiformer.data.images import MAX_IMAGE_PIXELS, image_files, readable_images, unique_stems
from debiformer.errors import UserError, mention
from debiformer.recipe import load_recipe
from debiformer.tools.classifier import Classifier, load_classifier, load_onnx_classifier
from debiformer.tools.common import check_at_least
from debiformer.tools.export import require_onnx_packages
from debiformer.tools.predict_detection import Detector, load_detector, predict_coco_results
from debiformer.tools.predict_segmentation import (
    Segmenter,
    load_segmenter,
    predict_label_maps,
    write_label_png,
)
from debiformer.weights import WeightsFile, open_weights, recorded_spec

OUT_FORMATS = (".csv", ".json")


@dataclass(frozen=True)
class Prediction:
    """One image's `top_k` classes, most probable first: indices, names, probabilities."""

    image: str
    classes: list[int]
    names: list[str]
    probabilities: list[float]


@dataclass(frozen=True)
class Failure:
    """A file that could not be predicted, and why (one line)."""

    image: str
    reason: str


def check_out_path(out: str | Path) -> Path:
    """`out` as a writable .csv or .json file, checked before any work."""
    out = Path(out)
    if out.suffix.lower() not in OUT_FORMATS:
        raise UserError(f"{out}: expected a .csv or .json file name", about="out")
    return runtime.check_writable(out, "out")


def _batches(
    classifier: Classifier,
    paths: Sequence[Path],
    batch_size: int,
    max_pixels: int,
    failures: list[Failure],
    advance: Callable[[int], None],
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """Batches of (paths, uint8 crops) of the readable images; each unreadable one is added to
    `failures` and left out. `advance(1)` is called as each file is read."""
    names, crops = [], []
    images = readable_images(
        paths, max_pixels=max_pixels, advance=advance,
        on_failure=lambda path, reason: failures.append(Failure(str(path), reason)),
    )  # fmt: skip
    for path, image in images:
        names.append(path)
        crops.append(classifier.preprocessing.crop(image))
        if len(crops) == batch_size:
            yield names, torch.stack(crops)
            names, crops = [], []
    if crops:
        yield names, torch.stack(crops)


@torch.no_grad()
def predict_classes(
    classifier: Classifier,
    paths: Sequence[Path],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    max_pixels: int = MAX_IMAGE_PIXELS,
    advance: Callable[[int], None] = lambda count: None,
) -> tuple[list[Prediction], list[Failure]]:
    """The `top_k` classes of each image of `paths` (at most the class count) by `classifier`
    on `device` (moved there), `batch_size` images at a time, in `precision` (as
    `runtime.resolve_precision` gives it); the files that cannot be read as `Failure`s.
    `advance(1)` is called as each file is read."""
    device = torch.device(device)
    model = classifier.model.to(device).eval()
    k = min(top_k, len(classifier.class_names))
    predictions: list[Prediction] = []
    failures: list[Failure] = []
    for names, crops in _batches(classifier, paths, batch_size, max_pixels, failures, advance):
        with runtime.autocast(device, precision):
            logits = model(classifier.preprocessing.normalise(crops, device))
        top = logits.float().softmax(dim=-1).topk(k, dim=-1)
        for path, values, indices in zip(names, top.values, top.indices, strict=True):
            classes = indices.tolist()
            predictions.append(
                Prediction(
                    str(path),
                    classes,
                    [classifier.class_names[c] for c in classes],
                    values.tolist(),
                )
            )
    return predictions, failures


def write_predictions(
    out: str | Path,
    predictions: Sequence[Prediction],
    failures: Sequence[Failure],
    about: dict[str, Any],
) -> None:
    """`predictions` to `out`: CSV (a header, then per image `image`, and per rank r `class_r`,
    `name_r`, `probability_r`), or JSON (`about` the model, then `predictions` and `failed`)."""
    out = Path(out)
    if out.suffix.lower() == ".json":
        rows = [
            {
                "image": p.image,
                "top": [
                    {"class": c, "name": n, "probability": q}
                    for c, n, q in zip(p.classes, p.names, p.probabilities, strict=True)
                ],
            }
            for p in predictions
        ]
        failed = [{"image": f.image, "reason": f.reason} for f in failures]
        runtime.write_json(out, {**about, "predictions": rows, "failed": failed})
        return
    k = max((len(p.classes) for p in predictions), default=0)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    ranks = range(1, k + 1)
    writer.writerow(
        ["image", *(f"{key}_{r}" for r in ranks for key in ("class", "name", "probability"))]
    )
    for p in predictions:
        cells = (
            value
            for c, n, q in zip(p.classes, p.names, p.probabilities, strict=True)
            for value in (c, n, f"{q:.6f}")
        )
        writer.writerow([p.image, *cells])
    runtime.write_text(out, text.getvalue())


def task_of(file: WeightsFile | None, recipe: str | None) -> str:
    """The task of the model to apply: the recipe's, else the one the checkpoint records."""
    if recipe is not None:
        return load_recipe(recipe).task
    if file is not None and file.recipe is not None:
        return str(file.recipe.get("task", "classification"))
    spec = recorded_spec(file) if file is not None else None
    return spec.task if spec is not None else "classification"


def predict(
    inputs: Sequence[str | Path],
    *,
    out: str | Path | None = None,
    model_name: str | None = None,
    recipe: str | None = None,
    checkpoint: str | Path | None = None,
    pretrained: str | None = None,
    top_k: int = 5,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "fp32",
    max_pixels: int = MAX_IMAGE_PIXELS,
    overlay: bool = False,
    runtime_name: str = "eager",
    console: Console | None = None,
) -> tuple[list[Prediction] | list[Path], list[Failure]]:
    """`debiformer predict`: the inputs' files found, the settings and `out` checked and the
    model loaded before any image is read; then every image predicted with a progress bar, a
    one-line notice for each that cannot be read. A classifier's rows are written to `out`
    (.csv or .json) when given; a segmentation checkpoint writes one label PNG per image into
    the folder `out` (`predict_segmentation`; with `overlay`, the colours over the image too); a
    detection checkpoint writes COCO results to the .json file `out` (`predict_detection`).
    With `runtime_name="onnxruntime"` the classifier is the ONNX file `checkpoint` that
    `debiformer export` wrote, run by onnxruntime on the CPU in fp32.
    Returns the predictions (the PNGs written; the COCO entries) and the failures."""
    console = console or Console(stderr=True, soft_wrap=True)
    check_at_least("top_k", top_k, 1)
    check_at_least("batch_size", batch_size, 1)
    check_at_least("max_pixels", max_pixels, 1)
    onnx = check_runtime(runtime_name, checkpoint, device, precision)
    file = open_weights(checkpoint) if checkpoint is not None and not onnx else None
    task = task_of(file, recipe)
    if task == "segmentation":
        check_label_folder(out)
    elif task == "detection":
        check_results_path(out)
    elif out is not None:
        check_out_path(out)
    paths = image_files(inputs)
    torch_device = runtime.select_device(device)
    resolved = runtime.resolve_precision(precision, torch_device)
    progress = Progress(
        TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    )  # fmt: skip
    with progress:
        bar = progress.add_task("predict", total=len(paths))

        def advance(count: int) -> None:
            progress.advance(bar, count)

        if task == "segmentation":
            segmenter = load_segmenter(file, recipe)
            rows, failures = _write_label_maps(
                segmenter, paths, Path(out), torch_device, resolved, max_pixels, overlay, advance
            )
        elif task == "detection":
            detector = load_detector(file, recipe)
            rows, failures = _detections(
                detector, paths, torch_device, resolved, max_pixels, advance
            )
        else:
            if onnx:
                classifier = load_onnx_classifier(checkpoint)
            else:
                classifier = load_classifier(model_name, recipe, file, pretrained, work="predict")
            rows, failures = predict_classes(
                classifier, paths, top_k=top_k, batch_size=batch_size, device=torch_device,
                precision=resolved, max_pixels=max_pixels, advance=advance,
            )  # fmt: skip
    _say_failures(console, failures)
    if task == "detection":
        runtime.write_json(out, rows)
    elif out is not None and task == "classification":
        about = {
            "model": classifier.name,
            "weights": classifier.weights,
            "preprocessing": vars(classifier.preprocessing),
            "precision": resolved,
        }
        write_predictions(out, rows, failures, about)
    return rows, failures


def _detections(
    detector: Detector,
    paths: Sequence[Path],
    device: torch.device,
    precision: str,
    max_pixels: int,
    advance: Callable[[int], None],
) -> tuple[list[dict], list[Failure]]:
    """The COCO result entries of every readable image, and the files that could not be read."""
    failures: list[Failure] = []
    results = predict_coco_results(
        detector, paths, device=device, precision=precision, max_pixels=max_pixels,
        on_failure=lambda path, reason: failures.append(Failure(str(path), reason)),
        advance=advance,
    )  # fmt: skip
    return results, failures


def _say_failures(console: Console, failures: Sequence[Failure]) -> None:
    for failure in failures:
        console.print(f"[yellow]skipped:[/] {failure.reason}", highlight=False)


RUNTIMES = ("eager", "onnxruntime")


def check_runtime(
    runtime_name: str, checkpoint: str | Path | None, device: str, precision: str
) -> bool:
    """Whether to run an ONNX file: `runtime_name` "onnxruntime" takes an .onnx `checkpoint`,
    on the CPU in fp32, with the export extra installed; "eager" runs PyTorch."""
    if runtime_name not in RUNTIMES:
        raise UserError(f": unknown runtime {runtime_name!r}; choose eager or onnxruntime",
                        about="runtime_name")  # fmt: skip
    if runtime_name == "eager":
        return False
    require_onnx_packages("runtime_name", "onnxruntime")
    if checkpoint is None or Path(checkpoint).suffix != ".onnx":
        raise UserError(
            f"{mention('runtime_name', 'onnxruntime')} runs an ONNX file: give "
            f"{mention('checkpoint', 'FILE.onnx')} (from debiformer export)"
        )
    if device == "cuda" or precision not in ("fp32", "auto"):
        raise UserError(f"{mention('runtime_name', 'onnxruntime')} runs on the CPU in fp32")
    return True


def check_results_path(out: str | Path | None) -> Path:
    """`out` as the .json file of a detector's COCO results."""
    if out is None or Path(out).suffix.lower() != ".json":
        raise UserError(
            f"{out or 'not given'}: a detector writes COCO results; give a .json file", about="out"
        )
    return runtime.check_writable(out, "out")


def check_label_folder(out: str | Path | None) -> Path:
    """`out` as the folder of a segmentation model's label PNGs (made if missing)."""
    if out is None or Path(out).suffix or Path(out).is_file():
        raise UserError(
            f"{out or 'not given'}: a segmentation model writes one label PNG per image; give a "
            "folder",
            about="out",
        )
    Path(out).mkdir(parents=True, exist_ok=True)
    return runtime.check_writable(Path(out) / "label.png", "out").parent


def _write_label_maps(
    segmenter: Segmenter,
    paths: Sequence[Path],
    out: Path,
    device: torch.device,
    precision: str,
    max_pixels: int,
    overlay: bool,
    advance: Callable[[int], None],
) -> tuple[list[Path], list[Failure]]:
    """Each image's label PNG (and overlay) in `out`, named by the image's stem (a number added
    where stems repeat)."""
    failures: list[Failure] = []
    written = []
    names = dict(zip(paths, unique_stems(paths), strict=True))
    maps = predict_label_maps(
        segmenter, paths, device=device, precision=precision, max_pixels=max_pixels,
        on_failure=lambda path, reason: failures.append(Failure(str(path), reason)),
        advance=advance,
    )  # fmt: skip
    for path, image, labels in maps:
        target = out / f"{names[path]}.png"
        write_label_png(labels, segmenter.num_classes, target, image if overlay else None)
        written.append(target)
    return written, failures
