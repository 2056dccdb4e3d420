"""Comparing named tensors, such as two models' state dicts."""

from collections.abc import Mapping

import torch


def assert_same_tensors(a: Mapping, b: Mapping, atol: float = 0.0) -> None:
    """`a` and `b` hold the same names, and equal tensors under each: bit for bit, or within
    `atol`."""
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)
