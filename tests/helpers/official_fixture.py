"""Rebuild the state dict and input of `tests/fixtures/official_tiny_224.json` as its README specifies."""

import json
import math
from functools import cache
from pathlib import Path

import numpy as np
import torch

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "official_tiny_224.json"


@cache
def load_fixture() -> dict:
    """The fixture's JSON, parsed once."""
    return json.loads(FIXTURE.read_text())


def hash_uniform(n: int, seed: int) -> np.ndarray:
    """n deterministic values in [0, 1), computed with integer arithmetic only."""
    k = np.arange(n, dtype=np.int64) + seed * 1_000_003
    x = k & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (x >> 16) ^ x
    return x / 2**32


def official_state_dict(fixture: dict) -> dict[str, torch.Tensor]:
    """The released model's state dict filled by the fixture's rule, keyed by released names."""
    state = {}
    for index, (name, shape) in enumerate(fixture["state_dict"]):
        numel = math.prod(shape)
        u = hash_uniform(numel, seed=index)
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros(shape, dtype=torch.int64)
            continue
        if name.endswith("running_var"):
            values = 1 + 0.5 * u
        elif name.endswith("running_mean"):
            values = (u - 0.5) * 0.2
        elif len(shape) >= 2 and not name.endswith("rpe_table"):
            values = (u - 0.5) * math.sqrt(12 / math.prod(shape[1:]))
        elif name.endswith("weight"):
            values = 1 + (u - 0.5) * 0.2
        else:
            values = (u - 0.5) * 0.2
        state[name] = torch.from_numpy(values.reshape(shape)).to(torch.float32)
    return state


def official_input(fixture: dict) -> torch.Tensor:
    """The fixture's input batch."""
    batch, res = fixture["batch"], fixture["resolution"]
    u = hash_uniform(batch * 3 * res * res, fixture["input_seed"])
    return torch.from_numpy((u - 0.5) * 4).reshape(batch, 3, res, res).to(torch.float32)
