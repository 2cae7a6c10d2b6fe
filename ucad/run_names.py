"""What MLflow runs are called: one experiment per model (add-task) and per benchmark stream,
and run names made of what sets a run apart from the runs beside it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ucad.config import result_fields
from ucad.continual import RunResult
from ucad.manifest import ModelVersion
from ucad.runs import config_label


def experiment_name(kind: str, manifest: ModelVersion) -> str:
    """One experiment per model (add-task) and per benchmark stream (dataset and class order)."""
    # No "/" in names: the UI reads it as a folder path and shows only the last part.
    if kind == "add-task":
        return f"ucad model {manifest.model}"
    names = manifest.task_names
    order = ",".join(names)
    if len(order) > 200:  # MLflow caps names at 500 characters; keep the name readable
        order = f"{len(names)} classes {_short_hash(order)}"
    dataset = Path(manifest.tasks[0].data.root).name or "data"
    return f"ucad benchmark {dataset}: {order}"


def run_name(result: RunResult, manifest: ModelVersion, kind: str) -> str:
    """A parent run's name, from what sets it apart from the runs it is compared with.

    add-task: ``line-3 v3 +bottle · paper · 1a2b3c``; benchmark:
    ``smoke seed=1 · grain,nut,stripes · 1a2b3c`` (long streams: the first two classes, the
    last one and their number). The words are the nearest preset and the config fields that
    differ from it (`ucad.runs.config_label`), and ``oracle`` routing; the short id is a digest
    of everything that decides the figures (config fields, routing, classes in order, data), so
    two runs share a name exactly when they computed the same thing. What tells runs of one
    experiment apart comes first, where the UI's run list and chart legends cut names off: the
    version for a model's runs, the config for a stream's (its experiment names the order).
    """
    label = config_label(result.config)
    if result.routing != "agnostic":
        label += f" {result.routing}"
    if kind == "benchmark":
        return f"{label} · {_order(result.tasks)} · {short_id(result, manifest)}"
    added = f"+{result.tasks[-1]}" if result.new_version else "unchanged"
    return f"{result.model} v{result.version} {added} · {label} · {short_id(result, manifest)}"


def short_id(result: RunResult, manifest: ModelVersion) -> str:
    """Six hex digits naming what decides a run's figures."""
    decided = {
        "config": result_fields(result.config),
        "routing": result.routing,
        "classes": [[t.name, t.data.train, t.data.test] for t in manifest.tasks],
    }
    return _short_hash(json.dumps(decided, sort_keys=True))[:6]


def _order(names: list[str]) -> str:
    if len(names) <= 4:
        return ",".join(names)
    return f"{names[0]},{names[1]},…,{names[-1]} ({len(names)})"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]
