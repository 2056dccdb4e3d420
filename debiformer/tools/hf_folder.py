"""A classifier as a timm / Hugging Face folder (`debiformer export --format hf`):

    config.json        timm's (`save_config_for_hf`): architecture, num_classes, label_names,
                       model_args (the architecture overrides) and pretrained_cfg (preprocessing)
    model.safetensors  the weights, with the export config in the header's metadata (as every
                       export records it), so this tool rebuilds the model from the file alone
    README.md          a model card: the model, its classes, the recipe, the data, the evaluation
                       figures of the run, the preprocessing, how to load it, citation, licence

`timm.create_model("local-dir:DIR", pretrained=True)` (after `import debiformer.model`) and
`debiformer.create_model(NAME, pretrained=DIR)` load it; `weights.open_weights(DIR)` reads its
model.safetensors, so `eval`, `predict` and `show` take `--checkpoint DIR`. The folder is written
beside `out` under a temporary name, checked (timm loads it and gives the model's logits exactly),
and only then put in place of `out`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml
from torch import nn

import debiformer
from debiformer.errors import UserError
from debiformer.weights import EXPORT_CONFIG_KEY, HF_WEIGHTS, WeightsFile

CONFIG = "config.json"
WEIGHTS = HF_WEIGHTS
CARD = "README.md"
FOLDER_FILES = (CONFIG, WEIGHTS, CARD)
LICENSE = "mit"  # the release's licence, and this tool's
CITATION = """@Article{baolong2024debiformer,
  author  = {NguyenHuu BaoLong and Chenyu Zhang and Yuzhi Shi and Takayoshi Yamashita and Tsubasa Hirakawa and Hironobu Fujiyoshi and Tohgoroh Matsui},
  title   = {DeBiFormer: Vision Transformer with Deformable Agent Bi-level Routing Attention},
  journal = {Proceedings of the IEEE/CVF Asian Conference on Computer Vision (ACCV)},
  year    = {2024},
}"""


def check_folder(out: Path) -> None:
    """`out` can take an export folder: it is new, empty, or holds an earlier export's files
    only (which it replaces); anything else is a one-line `UserError` about `out`."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; an hf export is a folder, give a new name", about="out")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in FOLDER_FILES)
        if others:
            raise UserError(
                f"{out}: holds other files than an export's ({others[0]}, ...); give a new or "
                "empty folder",
                about="out",
            )
    parent = out.absolute().parent
    if not parent.is_dir():
        raise UserError(f"{out}: its folder {parent} does not exist", about="out")


def model_card(model: nn.Module, config: dict, file: WeightsFile | None) -> str:
    """The README.md of the folder: what the model is, what it was trained on and how, how well
    it did (the training checkpoint's last evaluation), how to prepare images and load it."""
    spec = config["model_spec"]
    recipe = file.recipe if file is not None else None
    names = config.get("label_names") or []
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    size = config["input_size"][-1]
    lines = [
        "---",
        f"license: {LICENSE}",
        "library_name: timm",
        "tags: [image-classification, timm, debiformer]",
        "---",
        f"# {spec['name']}" + (f" on {_data_name(recipe)}" if recipe else ""),
        "",
        f"A DeBiFormer classifier (Deformable Bi-level Routing Attention, ACCV 2024): variant "
        f"`{spec['name']}`"
        + (f" with `{json.dumps(spec['arch'])}`" if spec["arch"] else "")
        + f", {parameters:.2f} M parameters, {config['num_classes']} classes. Weights: "
        f"{config['weights']}. Written by debiformer {debiformer.__version__}.",
        "",
        "## Classes",
        "",
        ", ".join(f"{k}: {name}" for k, name in enumerate(names)) or "(not recorded)",
        "",
        *_training_section(recipe),
        *_evaluation_section(file),
        "## Preprocessing",
        "",
        f"Resize the shorter side to {size} / {config['crop_pct']:g} pixels "
        f"({config['interpolation']}), crop the centre {size} x {size}, scale to [0, 1] and "
        f"normalise with mean {config['mean']} and std {config['std']} (RGB). timm's "
        "`resolve_data_config({}, model=model)` reads the same from config.json.",
        "",
        "## Use",
        "",
        "```python",
        "import timm",
        "import debiformer.model  # registers the DeBiFormer variants with timm",
        "",
        'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()',
        '# after pushing it to the Hub: timm.create_model("hf-hub:USER/REPO", pretrained=True)',
        "```",
        "",
        "or `debiformer predict IMAGES --checkpoint PATH/TO/THIS/FOLDER --out predictions.csv`.",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
        f"## Licence\n\n{LICENSE.upper()}, as the authors' release.",
    ]
    return "\n".join(lines) + "\n"


def _data_name(recipe: dict) -> str:
    """The data a recipe trains on, in a few words."""
    data = recipe.get("data", {})
    source = str(data.get("train_source") or data.get("train_path") or "its data")
    return source.split(":")[0] if ":" in source else Path(source).name


def _training_section(recipe: dict | None) -> list[str]:
    """The recipe the checkpoint stores, whole, as YAML."""
    if recipe is None:
        return []
    text = yaml.safe_dump(recipe, sort_keys=False).strip()
    description = recipe.get("description") or ""
    return [
        "## Training",
        "",
        f"Recipe `{recipe.get('name')}`" + (f": {description}" if description else "") + ".",
        "",
        "```yaml",
        text,
        "```",
        "",
    ]


def _evaluation_section(file: WeightsFile | None) -> list[str]:
    """The training run's last evaluation, as a table, where the checkpoint records it."""
    states = file.contents.get("train_state") if file is not None else None
    state = states[0] if isinstance(states, list) and states else None
    if not isinstance(state, dict) or not isinstance(state.get("last_eval"), dict):
        return []
    rows = [
        f"| {key} | {value:.4g} |"
        for key, value in state["last_eval"].items()
        if isinstance(value, (int, float)) and key != "images_per_s"
    ]
    where = f"after {state.get('step')} steps (epoch {state.get('epoch')}) of training"
    return ["## Evaluation", "", f"On the validation set, {where}:", "", "| metric | value |",
            "|---|---|", *rows, ""]  # fmt: skip


def _timm_config(model: nn.Module, config: dict, folder: Path) -> None:
    """config.json through timm's own writer, with the class names and preprocessing."""
    try:  # timm's writer of config.json (`save_for_hf` without the weights)
        from timm.models._hub import save_config_for_hf
    except ImportError:
        raise UserError(
            "format hf needs a newer timm (its save_config_for_hf): pip install -U timm"
        ) from None

    model_args = {**config["arch"], "num_classes": config["num_classes"]}
    if config["in_chans"] != 3:
        model_args["in_chans"] = config["in_chans"]
    data_config = {
        "input_size": tuple(config["input_size"]),
        "crop_pct": config["crop_pct"],
        "interpolation": config["interpolation"],
        "mean": tuple(config["mean"]),
        "std": tuple(config["std"]),
    }
    model_config = {"label_names": config["label_names"]} if config.get("label_names") else {}
    save_config_for_hf(
        model, str(folder / CONFIG), model_config=model_config, model_args=model_args,
        data_config=data_config,
    )  # fmt: skip


def check_folder_loads(folder: Path, model: nn.Module, config: dict) -> dict[str, Any]:
    """timm builds the folder's model (`local-dir:`), which must give `model`'s logits exactly
    on seeded random images, with the class names in its pretrained_cfg."""
    import timm

    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    images = torch.randn(2, *config["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        equal = torch.equal(loaded(images), model(images))
    names = list(loaded.pretrained_cfg.get("label_names") or [])
    if not equal or names != config["label_names"]:
        raise UserError(
            "timm's model from the written folder does not give the exported model's logits and "
            "class names; nothing written"
        )
    return {"timm_logits_equal": True, "batch": 2}


def write_hf_folder(
    out: Path, model: nn.Module, config: dict, file: WeightsFile | None
) -> dict[str, Any]:
    """The folder written under a temporary name beside `out`, checked, then put at `out` (an
    earlier export there is replaced; a failure leaves `out` as it was). Returns the check."""
    out = out.absolute()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        state = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
        metadata = {"format": "pt", EXPORT_CONFIG_KEY: json.dumps(config)}
        safetensors.torch.save_file(state, staging / WEIGHTS, metadata=metadata)
        _timm_config(model, config, staging)
        (staging / CARD).write_text(model_card(model, config, file))
        check = check_folder_loads(staging, model, config)
        earlier = out.with_name(f"{staging.name}-earlier")
        if out.exists():
            out.rename(earlier)
        staging.rename(out)
        if earlier.exists():
            shutil.rmtree(earlier)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return check
