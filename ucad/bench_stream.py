"""`ucad bench`'s stream figures: how learning and evaluation cost grow along a stream, and one
stream on a local Dask cluster of 1 and of 2 workers.

The scale-out runs the same classes, in fresh stores, through the same code path as
`task_runner: dask` from the command line. A worker count changes only how long the stream
takes: the stages computed (and so the digests) must be the same; the report says whether they
are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ucad.bench_meter import EVALUATION_CALLS, Meter, MeteredRunner
from ucad.bench_passes import warm_up
from ucad.cluster import dask_runner
from ucad.config import Config
from ucad.continual import AddTask, Replay
from ucad.data.datasets import read_task
from ucad.data.synth import LAYOUT
from ucad.pipeline import Runtime, StageRecord
from ucad.runners import LocalRunner
from ucad.store import ArtifactStore

WORKER_COUNTS = (1, 2)


def scale_out(
    config: Config, data: Path, names: list[str], root: Path, log: Callable[[str], None]
) -> dict[str, Any] | None:
    """Wall time of the stream `names` with 1 and 2 local Dask workers (cluster start apart);
    None where Dask is not installed."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        log('scale-out not measured: it needs distributed (pip install "ucad[dask]")')
        return None
    rows = []
    for workers in WORKER_COUNTS:
        settings = config.model_copy(update={"task_runner": "dask", "max_workers": workers})
        store = ArtifactStore(root / f"scale-out-{workers}")
        started = time.perf_counter()
        with dask_runner(settings, store) as runner:
            ready = time.perf_counter()
            result = Replay(data, settings, store, tasks=tuple(names), model="scale-out").run(
                runner
            )
            seconds = time.perf_counter() - ready
        # What the run wrote to its fresh store: each artifact once, however the records of a
        # stage that two workers raced for, or that Dask retried, describe it.
        written = sorted(store.artifacts())
        if {(r.stage, r.digest) for r in result.stages} != set(written):
            raise RuntimeError(f"the scale-out store {store.root} does not hold what the run names")
        rows.append(
            {
                "workers": workers,
                "seconds": seconds,
                "cluster_start_s": ready - started,
                "computed": len(written),
                "digests": written,
            }
        )
    first, last = rows[0], rows[-1]
    return {
        "classes": names,
        "backbone": config.backbone,
        "rows": [{k: v for k, v in row.items() if k != "digests"} for row in rows],
        "speedup": first["seconds"] / last["seconds"],
        "same_stages": all(row["digests"] == first["digests"] for row in rows),
    }


def format_scale_out(scale: dict[str, Any] | None) -> str:
    if not scale:
        return "scale-out: not measured (--scale-out 0, or ucad[dask] not installed)"
    lines = [
        f"a stream of {len(scale['classes'])} classes on a local Dask cluster, backbone "
        f"{scale['backbone']} (cluster start not included)",
        f"{'workers':<10}{'seconds':>10}{'start s':>10}{'computed':>10}",
        *(
            f"{row['workers']:<10}{row['seconds']:>10.1f}{row['cluster_start_s']:>10.1f}"
            f"{row['computed']:>10}"
            for row in scale["rows"]
        ),
        f"speedup {scale['speedup']:.2f}x; the same stages computed: "
        + ("yes" if scale["same_stages"] else "NO"),
    ]
    return "\n".join(lines)


# Times of the stream taken as each step's least over this many runs, each in a fresh store.
# One run's step-10 / step-1 evaluation ratio moved between 1.43 and 2.04 over runs on one day
# of the 2-vCPU machine: a step whose machine slowed for a minute looked like cost that grows.
STREAM_RUNS = 2


def measure_stream(
    config: Config, meter: Meter, data: Path, names: list[str], root: Path
) -> dict[str, Any]:
    """Learn the classes one by one; per step, time and the forward passes evaluation needed.

    The stream runs `STREAM_RUNS` times, each in a fresh store; a step's times are its least
    over the runs (what the step costs, not how busy the machine was). Every run computes the
    same stages, so the pass counts are those of any run.

    A re-extract-everything evaluation would run a frozen and a prompted pass over every test
    image of every class learned so far, at every step.
    """
    runs = [
        _stream_run(config, meter, data, names, root / f"stream-store-{run}")
        for run in range(STREAM_RUNS)
    ]
    passes = ("frozen_passes", "prompted_passes", "reextract_passes")
    counts = [[{key: step[key] for key in passes} for step in run] for run in runs]
    if any(run != counts[0] for run in counts):
        raise RuntimeError("the stream's runs computed different stages")
    steps = []
    for same_step in zip(*runs, strict=True):
        step = dict(same_step[0])
        for key in ("seconds", "learn_seconds", "evaluate_seconds"):
            step[f"{key}_runs"] = [run_step[key] for run_step in same_step]
            step[key] = min(step[f"{key}_runs"])
        steps.append(step)
    return {"backbone": config.backbone, "runs": STREAM_RUNS, "steps": steps}


def _stream_run(
    config: Config, meter: Meter, data: Path, names: list[str], store_root: Path
) -> list[dict[str, Any]]:
    """One run of the stream in a fresh store: per step, its times and forward passes."""
    store = ArtifactStore(store_root)
    rt = Runtime(config, store)
    warm_up(rt.backbone, config)
    runner = MeteredRunner(LocalRunner(rt), meter)
    steps, test_images = [], 0
    for step, name in enumerate(names, start=1):
        runner.calls.clear()
        with meter.measure() as wall:
            result = AddTask("stream", name, data, config, store, LAYOUT).run(runner)
        test_images += len(read_task(data, name, LAYOUT).test)
        computed = [r for r in result.stages if not r.cached]
        steps.append(
            {
                "step": step,
                "task": name,
                "seconds": wall.seconds,
                "learn_seconds": sum(
                    r.seconds for s, r in runner.calls if s not in EVALUATION_CALLS
                ),
                "evaluate_seconds": sum(
                    r.seconds for s, r in runner.calls if s in EVALUATION_CALLS
                ),
                "frozen_passes": stage_rows(store, computed, "features", "features"),
                "prompted_passes": stage_rows(store, computed, "scores", "index"),
                "reextract_passes": 2 * test_images,
            }
        )
    return steps


def stage_rows(store: ArtifactStore, records: list[StageRecord], stage: str, array: str) -> int:
    """Images covered by the computed artifacts of one stage (array shapes; no data is read)."""
    return sum(store.get(stage, r.digest).shape(array)[0] for r in records if r.stage == stage)
