"""DeBiFormer vision transformers (Deformable Bi-level Routing Attention) on plain PyTorch.

The names below are imported from their modules on first use, so that importing a part of the
package (its errors, the command line's `--help`) loads no torch; the variants are registered
with timm once the model module is imported (`debiformer.create_model`, `import debiformer.model`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from debiformer.model import DeBiFormer, create_model, list_models
    from debiformer.weights import (
        ModelSpec,
        Provenance,
        build_model,
        load_official_checkpoint,
        load_official_state_dict,
        load_pretrained,
        spec_of_checkpoint,
    )

__version__ = "0.1.0"

# each public name and the module it comes from
_SOURCES = {
    "DeBiFormer": "debiformer.model",
    "create_model": "debiformer.model",
    "list_models": "debiformer.model",
    "ModelSpec": "debiformer.weights",
    "Provenance": "debiformer.weights",
    "build_model": "debiformer.weights",
    "load_official_checkpoint": "debiformer.weights",
    "load_official_state_dict": "debiformer.weights",
    "load_pretrained": "debiformer.weights",
    "spec_of_checkpoint": "debiformer.weights",
}

__all__ = [
    "DeBiFormer",
    "ModelSpec",
    "Provenance",
    "__version__",
    "build_model",
    "create_model",
    "list_models",
    "load_official_checkpoint",
    "load_official_state_dict",
    "load_pretrained",
    "spec_of_checkpoint",
]


def __getattr__(name: str) -> object:
    """A public name of the package, imported from its module on first use."""
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_SOURCES[name]), name)
