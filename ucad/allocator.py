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

`keep_freed_memory()` raises both thresholds to `KEEP_BYTES` (or to 32 MiB, the highest mmap
threshold some glibc releases accept), so that blocks up to that size come from the heap and freed
ones stay in the process for the next allocation. In threads other than the main one, glibc
still maps blocks above 64 MB on their own (a thread's heap is at most that), so stages that run
in threads keep their temporaries smaller (`ucad.sam_encoder`). The cost is memory: freed blocks
stay with the process, in the heap and in each thread's arena, until `release_freed_memory()`
gives them back; the pipeline calls it after each artifact it computes (`ucad.pipeline`), so
what a stage kept does not outlive it. `Runtime` calls `keep_freed_memory()`, so every process
that runs stages (the `ucad` command, Prefect flows, Dask workers, and library code that makes a
`Runtime`) does. Only glibc has these settings: elsewhere, and with `UCAD_KEEP_FREED_MEMORY` set
to 0, false, no or off, it changes nothing. Under a preloaded allocator (jemalloc, tcmalloc)
glibc's settings do not apply to the memory in use.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Above the largest temporary of a CPU stage: a global-attention matrix of SAM ViT-H at 1024 px
# in bfloat16 (16 heads x 4096 x 4096 x 2 bytes, 512 MiB), were it formed at once.
KEEP_BYTES = 1 << 30
# Some glibc releases refuse an mmap threshold above half their 64 MiB thread heaps.
OLD_GLIBC_MMAP_LIMIT = 32 << 20
OPT_OUT = "UCAD_KEEP_FREED_MEMORY"
_OFF = {"0", "false", "no", "off"}


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
    if not all(hasattr(libc, name) for name in names):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


@functools.cache
def keep_freed_memory() -> int:
    """Set glibc's malloc to keep freed blocks for reuse, once per process.

    Returns the size up to which blocks now come from the heap and are kept (`KEEP_BYTES`, or
    32 MiB where glibc refuses more); 0 when nothing changed (not glibc, or opted out)."""
    libc = _glibc()
    if libc is None or _opted_out():
        return 0
    # mallopt returns 1 on success. Setting either threshold turns off glibc's own adjustment
    # of both, so both are set.
    for kept in (KEEP_BYTES, OLD_GLIBC_MMAP_LIMIT):
        if libc.mallopt(_M_MMAP_THRESHOLD, kept) == 1:
            libc.mallopt(_M_TRIM_THRESHOLD, kept)
            log.debug("malloc keeps freed blocks up to %d bytes", kept)
            return kept
    return 0


def release_freed_memory() -> None:
    """Give the memory the process has freed back to the kernel (glibc's malloc_trim); opted
    out, nothing (glibc's defaults trim by themselves)."""
    libc = _glibc()
    if libc is not None and not _opted_out():
        libc.malloc_trim(0)


def _opted_out() -> bool:
    return os.environ.get(OPT_OUT, "").strip().lower() in _OFF
