"""`ucad bench`'s scale-out figures: one stream on a local Dask cluster of 1 and of 2 workers.

The same classes, in fresh stores, through the same code path as `task_runner: dask` from the
command line. A worker count changes only how long the stream takes: the stages computed (and so
the digests) must be the same; the report says whether they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ucad.cluster import dask_runner
from ucad.config import Config
from ucad.continual import Replay
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
        rows.append(
            {
                "workers": workers,
                "seconds": seconds,
                "cluster_start_s": ready - started,
                "computed": result.computed,
                "digests": sorted(f"{r.stage}/{r.digest}" for r in result.stages),
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
