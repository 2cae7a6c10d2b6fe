"""`ucad bench`'s measuring: wall time and peak memory of a block, and of every stage call."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ucad import __version__
from ucad.allocator import release_freed_memory
from ucad.provenance import peak_rss_bytes, reset_peak_rss
from ucad.runners import StageRunner, stage_name


@dataclass
class Reading:
    """Wall time and peak memory of one measured block (filled in when the block ends)."""

    seconds: float = 0.0
    peak_bytes: int | None = None


class Meter:
    """Times blocks of work and records their peak memory.

    On the CPU, peak memory is the process's peak resident set size during the block (Linux resets
    the high-water mark through /proc/self/clear_refs; elsewhere it is the peak since the process
    started). On CUDA it is the peak of memory allocated by PyTorch on the device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.memory_kind = "CUDA allocated" if device.type == "cuda" else "process RSS"
        if device.type != "cuda" and not reset_peak_rss():
            self.memory_kind = "process RSS since start"

    @contextlib.contextmanager
    def measure(self) -> Iterator[Reading]:
        reading = Reading()
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_freed_memory()  # memory kept from earlier blocks is not this block's peak
            reset_peak_rss()
        start = time.perf_counter()
        try:
            yield reading
        finally:
            synchronize(self.device)
            reading.seconds = time.perf_counter() - start
            reading.peak_bytes = self._peak_bytes()

    def _peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_rss_bytes()


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a GPU runs it asynchronously), before a clock read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# A request's stage calls that evaluate: rows looked up, classes evaluated, a new row written.
EVALUATION_CALLS = ("find_row", "evaluate", "row")


class MeteredRunner:
    """A StageRunner that measures every stage call it passes on."""

    def __init__(self, runner: StageRunner, meter: Meter) -> None:
        self.runner = runner
        self.workers = runner.workers
        self.meter = meter
        self.calls: list[tuple[str, Reading]] = []

    def __call__(self, stage: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self.meter.measure() as reading:
            result = self.runner(stage, *args, **kwargs)
        self.calls.append((stage_name(stage), reading))
        return result


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "ucad": __version__,
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
