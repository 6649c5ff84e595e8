"""glibc's allocator set for tensor work on the CPU (the stages' command lines call `tune_malloc`).

glibc serves a large allocation (above its mmap threshold: 128 KiB at start, raised as such blocks
are freed, at most 32 MiB) with fresh pages from the kernel and returns them when it is freed, and it
gives the top of its heap back whenever more than its trim threshold is free there. A forward pass on
the CPU allocates and frees activations of 1-30 MiB per layer and batch, so every batch pays the
kernel's page faults and zeroing again (PyTorch's CPU tuning guide swaps in jemalloc or tcmalloc
for this). `tune_malloc` keeps such blocks in the heap instead: mmap threshold 32 MiB (glibc's
largest), trim threshold 1 GiB. Measured on 2 cores: encoding trenta 1.10x (bench/run_cpu.sh's
row with glibc's default beside; 3-7% in interleaved repeats). Where another allocator is preloaded
(jemalloc, tcmalloc) glibc's `mallopt` still answers, though it then governs nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
OFF_SWITCH = "STARBUCKS_MALLOC_TUNE"  # =0: leave the allocator as it is

_tuned: bool | None = None


def glibc():
    """The C library when it is glibc (Linux), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_malloc(env=os.environ) -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); False where it is not glibc or
    `STARBUCKS_MALLOC_TUNE=0`."""
    global _tuned
    if _tuned is None:
        libc = None if env.get(OFF_SWITCH, "1").strip() == "0" else glibc()
        _tuned = bool(
            libc is not None
            and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
    return _tuned
