"""`ucad.allocator`: large freed blocks stay in the process and are reused without page faults."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ucad import allocator

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="glibc's malloc settings only")

# In a fresh process, so that neither the test order nor this process's own settings matter:
# page faults of filling a 64 MB block (one byte per 4 kB page), three times in a row.
FILL_THREE_TIMES = textwrap.dedent(
    """
    import resource
    from ucad.allocator import keep_freed_memory

    kept = keep_freed_memory()
    faults = []
    for _ in range(3):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = bytearray(64 << 20)
        block[::4096] = b"\\x01" * len(range(0, len(block), 4096))
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    print(kept, *faults)
    """
)


def _fill_three_times(keep: str) -> tuple[int, list[int]]:
    run = subprocess.run(
        [sys.executable, "-c", FILL_THREE_TIMES],
        env={**os.environ, allocator.OPT_OUT: keep},
        capture_output=True,
        text=True,
        check=True,
    )
    kept, *faults = (int(word) for word in run.stdout.split())
    return kept, faults


@glibc
def test_a_freed_block_is_reused_without_page_faults() -> None:
    kept, faults = _fill_three_times("1")
    if kept < 64 << 20:
        pytest.skip(f"this glibc keeps blocks up to {kept} bytes only")
    assert kept == allocator.KEEP_BYTES
    assert faults[0] > 0  # fresh memory the first time (one fault per page, or per huge page)
    # The same memory again: no page comes fresh from the kernel (a few may, for bookkeeping).
    assert max(faults[1:]) < max(faults[0] // 10, 8)


@glibc
def test_glibcs_defaults_map_a_block_that_size_afresh_each_time() -> None:
    """The control of the test above: without the setting, every fill faults every page in."""
    kept, faults = _fill_three_times("off")
    assert kept == 0
    assert faults[0] > 0
    assert min(faults) > max(faults) // 2  # each fill faults its pages in again


@glibc
def test_the_environment_can_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[tuple[int, int]] = []

    class Recorder:
        def mallopt(self, param: int, value: int) -> int:
            called.append((param, value))
            return 1

        def malloc_trim(self, pad: int) -> int:
            called.append(("trim", pad))
            return 1

    monkeypatch.setattr(allocator, "_glibc", lambda: Recorder())
    allocator.keep_freed_memory.cache_clear()
    try:
        for off in ("0", "false", "OFF", " no "):
            monkeypatch.setenv(allocator.OPT_OUT, off)
            assert allocator.keep_freed_memory() == 0
            allocator.release_freed_memory()
            allocator.keep_freed_memory.cache_clear()
        assert called == []  # opted out, glibc's settings are left alone, trims included
        monkeypatch.delenv(allocator.OPT_OUT)
        assert allocator.keep_freed_memory() == allocator.KEEP_BYTES
        allocator.release_freed_memory()
        assert called == [(-3, allocator.KEEP_BYTES), (-1, allocator.KEEP_BYTES), ("trim", 0)]
    finally:
        allocator.keep_freed_memory.cache_clear()


def test_a_glibc_that_refuses_1_gib_keeps_32_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[tuple[int, int]] = []

    class OlderGlibc:
        def mallopt(self, param: int, value: int) -> int:
            called.append((param, value))
            return 0 if param == -3 and value > 32 << 20 else 1

    monkeypatch.setattr(allocator, "_glibc", lambda: OlderGlibc())
    monkeypatch.delenv(allocator.OPT_OUT, raising=False)
    allocator.keep_freed_memory.cache_clear()
    try:
        assert allocator.keep_freed_memory() == 32 << 20
        assert called == [(-3, allocator.KEEP_BYTES), (-3, 32 << 20), (-1, 32 << 20)]
    finally:
        allocator.keep_freed_memory.cache_clear()


def test_without_glibc_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    allocator._glibc.cache_clear()
    allocator.keep_freed_memory.cache_clear()
    try:
        assert allocator._glibc() is None
        assert allocator.keep_freed_memory() == 0
        allocator.release_freed_memory()  # a no-op, not an error
    finally:
        allocator._glibc.cache_clear()
        allocator.keep_freed_memory.cache_clear()


def test_the_pipeline_gives_freed_memory_back_after_each_artifact_it_computes(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from ucad import pipeline
    from ucad.config import load_config
    from ucad.store import ArtifactStore

    released: list[str] = []
    monkeypatch.setattr(pipeline, "release_freed_memory", lambda: released.append("released"))
    rt = pipeline.Runtime(load_config("smoke", None, {}), ArtifactStore(tmp_path / "store"))
    stage = pipeline.Stage("probe", "1")

    def compute() -> tuple[dict[str, np.ndarray], dict[str, str]]:
        assert released == []  # not while computing
        return {"values": np.arange(4.0)}, {}

    assert not pipeline.cached(rt, stage, "one", {}, compute).cached
    assert released == ["released"]
    assert pipeline.cached(rt, stage, "one", {}, compute).cached  # found: nothing to give back
    assert released == ["released"]
