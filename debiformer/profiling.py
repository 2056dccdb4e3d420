"""Named steps for `debiformer profile`: profiler regions that cost nothing when no profiler runs."""

from contextlib import nullcontext

import torch.autograd.profiler as autograd_profiler
from torch.profiler import record_function


def step(name: str):
    """A `record_function` region named `name` while a profiler is active, else a no-op context."""
    if autograd_profiler._is_profiler_enabled:
        return record_function(name)
    return nullcontext()
