"""`runtime.keep_freed_memory`: freed host memory is reused without page faults."""

import platform
import resource
import sys

import pytest
import torch

from debiformer import runtime

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.skipif(not GLIBC, reason="needs Linux with glibc")
def test_a_freed_block_is_reused_without_page_faults():
    assert runtime.keep_freed_memory()
    faults = []
    for _ in range(8):
        torch.ones(2**24)  # 64 MB, above glibc's largest default mmap threshold (32 MB), freed
        before = _minor_faults()
        torch.ones(2**24)
        faults.append(_minor_faults() - before)
    # handed back to the system, the block comes back as 16,384 fresh 4 KiB pages every time;
    # kept, it is reused once the heap has grown to hold it (the kernel may still reclaim
    # idle pages now and then, so not every time)
    assert min(faults) < 1000, faults


@pytest.mark.skipif(GLIBC, reason="glibc applies it")
def test_elsewhere_it_says_it_did_not_apply():
    assert runtime.keep_freed_memory() is False
