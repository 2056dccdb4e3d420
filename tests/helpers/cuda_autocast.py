"""CUDA's autocast policy on the CPU, for code paths that differ between the two.

Under CUDA's autocast a set of ops (softmax, norms, sums, exponentials, losses, ...) computes in
fp32 whatever its inputs, where the CPU's autocast leaves them in bf16; and CUDA runs the backward
pass on a thread of its own, outside autocast. Code that is fine on the CPU can then meet an fp32
tensor beside a bf16 one in a backward pass it writes itself. `CudaAutocastPolicy` makes those
ops compute in fp32 under the CPU's autocast, so that the CPU tests meet the same dtypes.
"""

import torch
from torch.overrides import TorchFunctionMode

# the ops of CUDA's "autocast to float32" list (torch.amp docs) that models and losses call
CUDA_FP32_OPS = frozenset(
    {
        "softmax",
        "log_softmax",
        "softmin",
        "sum",
        "prod",
        "cumsum",
        "layer_norm",
        "group_norm",
        "norm",
        "normalize",
        "exp",
        "expm1",
        "log",
        "log1p",
        "pow",
        "__pow__",
        "__rpow__",
        "rsqrt",
        "reciprocal",
        "__rtruediv__",
        "softplus",
        "cross_entropy",
        "nll_loss",
        "mse_loss",
        "l1_loss",
        "smooth_l1_loss",
        "binary_cross_entropy_with_logits",
    }
)


def _in_fp32(value):
    is_float_tensor = isinstance(value, torch.Tensor) and value.is_floating_point()
    return value.float() if is_float_tensor else value


class CudaAutocastPolicy(TorchFunctionMode):
    """Within the mode, while the CPU's autocast is on, the ops of `CUDA_FP32_OPS` compute in fp32
    (their floating-point tensor arguments cast to fp32, autocast off for the op)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in CUDA_FP32_OPS and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return func(
                    *map(_in_fp32, args), **{name: _in_fp32(v) for name, v in kwargs.items()}
                )
        return func(*args, **kwargs)
