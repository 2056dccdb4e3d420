"""DeBiFormer vision transformers (Deformable Bi-level Routing Attention) on plain PyTorch."""

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
