"""Named profiler regions inside the model: the steps `debiformer profile` splits an op into.

`step(name)` is a `torch.profiler.record_function` region while a profiler runs and an empty
context otherwise, so the model pays nothing for its names outside profiling.
"""

from contextlib import AbstractContextManager, nullcontext

import torch.autograd.profiler as autograd_profiler
from torch.profiler import record_function


def step(name: str) -> AbstractContextManager:
    """A `record_function` region named `name` while a profiler is active, else a no-op context."""
    if autograd_profiler._is_profiler_enabled:
        return record_function(name)
    return nullcontext()
