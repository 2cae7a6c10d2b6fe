"""Keeping freed memory in the process, so that large tensors do not cost a page fault per page.

glibc's malloc, by default, serves each allocation above a threshold (128 kB, raised as large
blocks are freed, to at most 32 MB) from its own `mmap` and unmaps it on free, and hands free
memory at the top of its heap back to the kernel once it exceeds twice that threshold. A tensor
that size made and freed again and again then pays a page fault and a kernel-zeroed page for
every 4 kB each time. Measured on a 2-vCPU AMD EPYC: SAM ViT-B's image encoder (bf16, one image,
before `ucad.sam_encoder` chunked its attention) took 6.1-7.0 s with about a million page faults,
4.6-5.5 s with freed memory kept and none; segment-anything's automatic mask generator 145 s per
image (47 million faults; a third of its CPU time in the kernel), 83 s; a 4-class smoke stream on
one Dask worker 24-28 s, 20-21 s.

`keep_freed_memory()` raises both thresholds to `KEEP_BYTES`, so that blocks up to that size come
from the heap and freed ones stay in the process for the next allocation. In threads other than
the main one, glibc still maps blocks above 64 MB on their own (a thread's heap is at most that),
so stages that run in threads keep their temporaries smaller (`ucad.sam_encoder`). The cost is
memory: the process keeps up to `KEEP_BYTES` it has freed (`release_freed_memory()` gives it
back). `Runtime` calls it, so every process that runs stages (the `ucad` command, Prefect flows,
Dask workers) does. Only glibc has these settings: elsewhere, and with `UCAD_KEEP_FREED_MEMORY=0`
in the environment, it changes nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Above the largest temporary of a CPU stage: a global-attention matrix of SAM ViT-H at 1024 px
# in bfloat16 (16 heads x 4096 x 4096 x 2 bytes, 512 MiB).
KEEP_BYTES = 1 << 30
OPT_OUT = "UCAD_KEEP_FREED_MEMORY"


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (which has mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process
    except OSError:
        return None
    names = ("gnu_get_libc_version", "mallopt", "malloc_trim")
    return libc if all(hasattr(libc, name) for name in names) else None


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed blocks up to `KEEP_BYTES` for reuse, once per process.

    Returns whether the settings are in effect (False off glibc, or when the environment opts
    out with `UCAD_KEEP_FREED_MEMORY=0`)."""
    libc = _glibc()
    if libc is None or os.environ.get(OPT_OUT, "1").strip() == "0":
        return False
    # mallopt returns 1 on success; the mmap threshold goes first, since setting either turns
    # off glibc's own adjustment of both.
    mapped = libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) == 1
    return mapped and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES) == 1


def release_freed_memory() -> None:
    """Give the memory the process has freed back to the kernel (glibc's malloc_trim)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
