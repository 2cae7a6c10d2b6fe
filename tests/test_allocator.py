"""`ucad.allocator`: large freed blocks stay in the process and are reused without page faults."""

from __future__ import annotations

import resource
import sys

import pytest

from ucad import allocator

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="glibc's malloc settings only")


def _page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _faults_to_fill(size: int) -> int:
    """Page faults to allocate `size` bytes and write a byte to each of their pages."""
    start = _page_faults()
    block = bytearray(size)
    block[::4096] = b"\x01" * len(range(0, size, 4096))
    return _page_faults() - start


@glibc
def test_a_freed_block_is_reused_without_page_faults() -> None:
    assert allocator.keep_freed_memory()
    size = 64 << 20  # above glibc's default ceiling for keeping freed blocks (32 MB)
    pages = size // 4096
    assert _faults_to_fill(size) > 0  # freed when it returns
    # The same memory again: no page comes fresh from the kernel (a few may, for bookkeeping).
    assert _faults_to_fill(size) < pages // 100
    allocator.release_freed_memory()


@glibc
def test_the_environment_can_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[tuple[int, int]] = []

    class Recorder:
        def mallopt(self, param: int, value: int) -> int:
            called.append((param, value))
            return 1

    monkeypatch.setattr(allocator, "_glibc", lambda: Recorder())
    allocator.keep_freed_memory.cache_clear()
    try:
        monkeypatch.setenv(allocator.OPT_OUT, "0")
        assert not allocator.keep_freed_memory()
        assert called == []
        allocator.keep_freed_memory.cache_clear()
        monkeypatch.delenv(allocator.OPT_OUT)
        assert allocator.keep_freed_memory()
        assert called == [(-3, allocator.KEEP_BYTES), (-1, allocator.KEEP_BYTES)]
    finally:
        allocator.keep_freed_memory.cache_clear()


def test_without_glibc_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    allocator._glibc.cache_clear()
    allocator.keep_freed_memory.cache_clear()
    try:
        assert allocator._glibc() is None
        assert not allocator.keep_freed_memory()
        allocator.release_freed_memory()  # a no-op, not an error
    finally:
        allocator._glibc.cache_clear()
        allocator.keep_freed_memory.cache_clear()
