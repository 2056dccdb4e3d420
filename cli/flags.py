"""The command line's names for the library's parameters.

A `UserError` names the parameters it is about by the library's own names (`json_path`,
`num_workers`, `on_bad_image=skip`); on the command line each reads as the flag that sets it in
the command that ran (`--json`, `--workers`, `--skip-bad`). Recipe keys (`train.device`) are
not flags and keep their names, as does any parameter a command does not list here.
"""

from debiformer.errors import UserError

MEASURE = {
    "device": "--device",
    "precision": "--precision",
    "batch_size": "--batch-size",
    "resolution": "--resolution",
    "warmup": "--warmup",
    "iterations": "--iterations",
    "json_path": "--json",
}
MODEL = {
    "recipe": "--recipe",
    "checkpoint": "--checkpoint",
    "pretrained": "--pretrained",
    "out": "--out",
}

# command ("train", or "data convert" in a group) -> parameter (or "parameter=value") -> flag
FLAGS: dict[str, dict[str, str]] = {
    "train": {"overrides": "--set", "run_dir": "--out", "resume": "--resume", "fresh": "--fresh"},
    "eval": {
        "overrides": "--set",
        "checkpoint": "--checkpoint",
        "json_path": "--json",
        "ema": "--ema",
        "out": "--confusion",
        "tta": "--tta",
    },
    "recipes show": {"overrides": "--set"},
    "bench": {
        **MEASURE,
        "models": "--models",
        "compare": "--compare",
        "impls": "--impl",
        "modes": "--mode",
        "runtimes": "--runtime",
        "grad_checkpointing": "--grad-checkpointing",
        "channels_last": "--channels-last",
        "rounds": "--rounds",
    },
    "profile": {
        **MEASURE,
        "op": "--op",
        "stage": "--stage",
        "variant": "--variant",
        "impl": "--impl",
        "trace": "--trace",
    },
    "export": {
        **MODEL,
        "model": "--model",
        "format": "--format",
        "ema": "--ema",
        "resolution": "--resolution",
        "dynamic_batch": "--dynamic-batch",
        "quantize": "--quantize",
    },
    "show": {
        **MODEL,
        "model_name": "--model",
        "query": "--query",
        "blocks": "--blocks",
        "size": "--size",
        "json_path": "--json",
        "max_pixels": "--max-pixels",
        "stage": "--stage",
    },
    "predict": {
        **MODEL,
        "model_name": "--model",
        "inputs": "INPUTS",
        "top_k": "--top-k",
        "batch_size": "--batch-size",
        "device": "--device",
        "precision": "--precision",
        "max_pixels": "--max-pixels",
        "overlay": "--overlay",
        "runtime_name": "--runtime",
    },
    "plot": {"out": "--out"},
    "data convert": {
        "out_path": "OUT",
        "max_resolution": "--max-resolution",
        "write_mode": "--write-mode",
        "jpeg_quality": "--jpeg-quality",
        "compress_probability": "--compress-probability",
        "subset": "--subset",
        "num_workers": "--workers",
        "chunk_size": "--chunk-size",
        "split": "--split",
        "on_bad_image=skip": "--skip-bad",
    },
    "data bench": {
        "device": "--device",
        "batch_size": "--batch-size",
        "image_size": "--image-size",
        "num_workers": "--workers",
        "repeats": "--repeats",
        "json_path": "--json",
    },
    "data mosaics": {
        "train_images": "--train",
        "val_images": "--val",
        "canvas_size": "--size",
        "items": "--items",
        "scale": "--scale",
        "seed": "--seed",
        "source": "--source",
    },
}


def message(error: UserError, command: str) -> str:
    """`error`'s message with each parameter named by its flag in `command`."""
    return error.render(FLAGS.get(command, {}))
