"""Checkpoint files that would run code when unpickled: what every loader must refuse."""

import os
import pickle
from pathlib import Path

import torch


class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_files(folder: Path) -> list[Path]:
    """The payload as torch.save and plain pickle files, at the top level and inside a dict; the
    payload touches `folder`/PWNED."""
    marker = folder / "PWNED"
    payload = Payload(marker)
    nested = {"model": {"stem.0.weight": torch.zeros(1)}, "extra": payload}
    files = []
    for name, obj in (("top", payload), ("nested", nested)):
        torch.save(obj, folder / f"{name}.pt")
        with open(folder / f"{name}.pkl", "wb") as file:
            pickle.dump(obj, file)
        files += [folder / f"{name}.pt", folder / f"{name}.pkl"]
    return files
