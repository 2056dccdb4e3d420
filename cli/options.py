"""Options several commands share, each defined once: the recipe and its `--set` overrides
(train, eval, recipes show), the model and its weights (show, export, predict), the pixel limit
of images read (show, predict), and the device and precision (bench, profile, predict); and how
a user error is printed, with its exit code."""

import typer
from rich.console import Console
from rich.markup import escape

# the exit code of a command stopped by a user error (one `error:` line on stderr)
USER_ERROR_EXIT = 2

# set by `train --nproc-per-node` for its processes: the folder where each writes its `error:`
# message (a file named by its rank) for the launcher to print once, not once per process
PROCESS_ERRORS_ENV = "DEBIFORMER_PROCESS_ERRORS"


def print_error(message: str) -> None:
    """Prints `error: <message>` as one line on stderr."""
    message = " ".join(message.split())
    Console(stderr=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True
    )


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

MAX_PIXELS = typer.Option(
    None,
    "--max-pixels",
    help="Refuse images with more pixels (default: PIL's limit, about 89.5 million).",
)


def pixel_limit(max_pixels: int | None) -> int:
    """--max-pixels as the library takes it: PIL's limit where not given (PIL is imported only
    when a command runs)."""
    from debiformer.data.images import MAX_IMAGE_PIXELS

    return MAX_IMAGE_PIXELS if max_pixels is None else max_pixels


DEVICE = typer.Option("auto", "--device", help="auto (cuda if present, else cpu), cpu or cuda.")
PRECISION = typer.Option(
    "fp32",
    "--precision",
    help="fp32, bf16, fp16 (CUDA only) or auto (bf16 on a CPU with AMX or a GPU with native "
    "bf16, else fp32).",
)


def say_precision(console: Console, precision: str, device: str) -> None:
    """For `--precision auto`, one line saying what it is on `device` and why; for a precision
    that runs slowly there (bf16 on a CPU without bf16 instructions), one line saying so."""
    from debiformer.runtime import precision_text, select_device

    text = precision_text(precision, select_device(device))
    if text != precision:
        console.print(f"precision {text}", highlight=False)
