"""Options several commands share, each defined once: the recipe and its `--set` overrides
(train, eval, recipes show), and the model and its weights (show, export)."""

import typer

RECIPE_HELP = "Recipe YAML file, or the name of a shipped one (e.g. quickstart, tiny)."

RECIPE = typer.Argument(..., help=RECIPE_HELP)
OVERRIDES = typer.Option(
    [],
    "--set",
    help="Override a recipe value: section.key=value (repeatable), e.g. --set optim.lr=1e-3.",
    metavar="SECTION.KEY=VALUE",
)

MODEL = typer.Option(
    None, "--model", help="DeBiFormer variant, e.g. debiformer_tiny (default: the recipe's)."
)
MODEL_RECIPE = typer.Option(
    None,
    "--recipe",
    help="Recipe naming the model, its image size, preprocessing and class names (default: the "
    "one a training checkpoint stores).",
)
CHECKPOINT = typer.Option(
    None,
    "--checkpoint",
    help="Weights to use exactly, as `eval` loads them: this tool's checkpoint (it records its "
    "model), a released file or a .safetensors file.",
)
PRETRAINED = typer.Option(
    None,
    "--pretrained",
    help="Weights file or URL to start from, as model.pretrained takes (a head for other classes "
    "starts at zero).",
)
