"""MLflow tracking: every `ucad` run as one parent run with one nested run per class learned.

MLflow lives only here: the pipeline, the stages and the flows' tasks never import it. A run is
logged after it finished, from its `RunResult`, so tracking can never change or break a result:
when the tracking server is down the run still completes and its artifacts stay in the store,
and the failure to log is a warning (an error with ``strict=True``).

What a run looks like in MLflow (experiment ``ucad model <model>`` for add-task runs,
``ucad benchmark <dataset>: <class order>`` for benchmarks, so comparable runs sit together):

- parent run, named by what sets it apart from the runs beside it (``run_name``): params = the
  resolved config and the routing; tags = model, version, class order, artifact digests,
  package versions, git commit, Prefect flow run id; metrics with step = number of classes
  learned: ``<metric>/<class>``, ``mean/<metric>``, ``forgetting/<metric>``; without step,
  what the run cost: ``usage/seconds|computed|cached/<stage>`` and ``usage/memory/peak_*_mb``;
  artifacts: ``results/<metric>.csv|.png`` (the results matrix), ``results/curves.png``,
  ``gallery/<class>.png``, ``config.yaml``, ``result.json``.
- nested run per class learned by this run: that step's metrics, the class's learning-stage
  times and digests.

The UI's chart view groups charts into sections by key prefix, sorted by name: the cost prefix
``usage/`` sorts after every figure's (``aupro/`` ... ``routing_accuracy/``), so a run's figures
come first.

Where the runs go is `ucad.tracking_target`'s to say, what experiments and runs are called
`ucad.run_names`'; this module decides what is logged and logs it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence

import torch
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from ucad.continual import RunResult
from ucad.figures import curves_figure, matrix_figure
from ucad.manifest import CLASS_STAGES, ModelVersion, load_version
from ucad.metrics import final, forgetting
from ucad.provenance import PACKAGES, git_state, library_versions, peak_rss_bytes
from ucad.run_names import experiment_name, run_name, short_id
from ucad.store import ArtifactStore
from ucad.tracking_target import ENV_VAR, HTTP_LIMITS, Target, http_limits, resolve_target

# Where runs go (`ucad.tracking_target`) and what they are called (`ucad.run_names`) are named
# here too: this is the module the rest of ucad asks about tracking.
__all__ = [
    "COST",
    "ENV_VAR",
    "HTTP_LIMITS",
    "KINDS",
    "Target",
    "TrackingError",
    "experiment_name",
    "history_metrics",
    "log_result",
    "matrix_csv",
    "metric_key",
    "resolve_target",
    "run_name",
    "short_id",
    "stage_metrics",
]

log = logging.getLogger(__name__)

KINDS = ("add-task", "benchmark")
# What a run cost (stage seconds and counts, memory): after the figures in the chart view, whose
# sections sort by name (the last figure prefix is routing_accuracy/).
COST = "usage"


class TrackingError(RuntimeError):
    """Logging to MLflow failed and the caller asked for that to be an error."""


def log_result(
    result: RunResult,
    store: ArtifactStore,
    kind: str,
    tracking_uri: str | None = None,
    strict: bool = False,
    flow_run_id: str | None = None,
    started: float | None = None,
    gallery: Mapping[str, Figure] | None = None,
) -> str | None:
    """Log a finished run to MLflow; return the parent run's id, or None if it was not logged.

    ``kind`` is ``add-task`` or ``benchmark``; ``started`` (Unix time) makes the run's duration
    in the UI the real one; ``gallery`` holds figures of example verdicts per class
    (`ucad.gallery`). Failures to log are warnings unless ``strict``, then TrackingError.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    target = resolve_target(store, result.config, tracking_uri)
    if target is None:
        return _not_logged(
            f"MLflow tracking skipped: the store {store.root!r} is remote and no tracking URI is "
            f"set (set ${ENV_VAR} or the config field tracking_uri)",
            strict,
        )
    memory = _peak_memory()
    try:
        with http_limits():
            run_id = _log_run(
                MlflowClient(target.uri),
                target,
                result,
                store,
                kind,
                flow_run_id,
                started,
                memory,
                gallery or {},
            )
    except Exception as err:  # tracking is best effort: whatever fails, the run's results stand
        return _not_logged(
            f"could not log the run to MLflow at {target.uri}: {err}; the run itself completed "
            f"and its results are in the store {store.root!r}",
            strict,
        )
    return run_id


def _not_logged(message: str, strict: bool) -> None:
    if strict:
        raise TrackingError(message)
    log.warning("%s", message)
    return None


# The runs ----------------------------------------------------------------------------------------


def _log_run(
    client: MlflowClient,
    target: Target,
    result: RunResult,
    store: ArtifactStore,
    kind: str,
    flow_run_id: str | None,
    started: float | None,
    memory: dict[str, float],
    gallery: Mapping[str, Figure],
) -> str:
    manifest = load_version(store, result.model, result.version)
    name = experiment_name(kind, manifest)
    experiment = _experiment_id(client, name, target.artifact_location)
    history = history_metrics(result)
    parent = client.create_run(
        experiment,
        start_time=None if started is None else int(started * 1000),
        tags=_parent_tags(result, manifest, store, kind, flow_run_id),
        run_name=run_name(result, manifest, kind),
    ).info.run_id
    try:
        totals = {**stage_metrics(result), **memory}
        client.log_batch(
            parent,
            metrics=_metrics(history + [(k, v, 0) for k, v in totals.items()]),
            params=[Param(k, v) for k, v in _params(result).items()],
        )
        _log_artifacts(client, parent, result, gallery)
        for step in _learned_steps(result, kind):
            _log_class_run(client, experiment, parent, result, manifest, step, history)
    except BaseException:
        _terminate_quietly(client, parent, "FAILED")
        raise
    client.set_terminated(parent)
    log.info("logged to MLflow at %s: experiment %r, run %s", target.uri, name, parent)
    return parent


def _log_class_run(
    client: MlflowClient,
    experiment: str,
    parent: str,
    result: RunResult,
    manifest: ModelVersion,
    step: int,
    history: list[tuple[str, float, int]],
) -> None:
    """The nested run of the class learned at `step`: its row of figures and its learning cost."""
    entry = manifest.tasks[step - 1]
    tags = {
        MLFLOW_PARENT_RUN_ID: parent,
        "ucad.model": result.model,
        "ucad.model_version": str(step),  # every version adds exactly one class
        "ucad.class": entry.name,
        **{f"ucad.digest.{stage}": digest for stage, digest in entry.digests().items()},
    }
    run = client.create_run(experiment, tags=tags, run_name=f"{step:02d} {entry.name}")
    own = [r for r in result.stages if r.task == entry.name and r.stage in CLASS_STAGES]
    own_values = {f"{COST}/seconds/{r.stage}": r.seconds for r in own}
    own_values |= {f"{COST}/cached/{r.stage}": float(r.cached) for r in own}
    own_values["threshold"] = entry.threshold  # the class's decision threshold (a score)
    client.log_batch(
        run.info.run_id,
        metrics=_metrics(
            [m for m in history if m[2] == step] + [(k, v, step) for k, v in own_values.items()]
        ),
        params=[Param("class", entry.name), Param("step", str(step))],
    )
    client.set_terminated(run.info.run_id)


def _learned_steps(result: RunResult, kind: str) -> list[int]:
    """Steps (= model versions) this run learned: all of a benchmark, the new one of add-task."""
    if kind == "benchmark":
        return list(range(1, result.version + 1))
    return [result.version] if result.new_version else []


def _terminate_quietly(client: MlflowClient, run_id: str, status: str) -> None:
    try:
        client.set_terminated(run_id, status)
    except Exception:  # the server that just failed us may be gone; the warning says enough
        log.debug("could not mark MLflow run %s %s", run_id, status, exc_info=True)


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = client.get_experiment_by_name(name)  # another run created it meanwhile
    if experiment.lifecycle_stage == "deleted":
        raise MlflowException(
            f"experiment {name!r} is deleted; restore it in the MLflow UI, or remove it for good "
            "with `mlflow gc`, to log this run"
        )
    return experiment.experiment_id


# Params, tags, metrics -----------------------------------------------------------------------


def _params(result: RunResult) -> dict[str, str]:
    """The resolved config, one param per field, and the routing (it changes the figures)."""
    fields = result.config.model_dump(mode="json")
    params = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
    return {**params, "routing": result.routing}


def _parent_tags(
    result: RunResult,
    manifest: ModelVersion,
    store: ArtifactStore,
    kind: str,
    flow_run_id: str | None,
) -> dict[str, str]:
    tasks = manifest.tasks
    tags = {
        "ucad.kind": kind,
        "ucad.model": result.model,
        "ucad.model_version": str(result.version),
        "ucad.new_version": str(result.new_version).lower(),
        "ucad.classes": ", ".join(result.tasks),
        "ucad.store": store.root,
        "ucad.data": ", ".join(sorted({t.data.root for t in tasks})),
        "ucad.digests": json.dumps({t.name: t.digests() for t in tasks}),
        MLFLOW_RUN_NOTE: (
            f"ucad {kind}: {' → '.join(result.tasks)} into model {result.model} "
            f"v{result.version}; routing {result.routing}, seed {result.config.seed}"
        ),
        **{f"versions.{name}": version for name, version in library_versions(PACKAGES).items()},
    }
    commit, dirty = git_state()
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
        tags["ucad.git_dirty"] = str(dirty).lower()
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    return tags


def history_metrics(result: RunResult) -> list[tuple[str, float, int]]:
    """(key, value, step) of every figure of the model's history; step = classes learned.

    Row t of the results matrix is the model after learning t + 1 classes, so a class's chart in
    the UI shows how its figure evolves as classes are added. Undefined values are left out.
    """
    out: list[tuple[str, float, int]] = []
    for metric in result.results.metrics:
        rows = result.results.matrix(metric)
        for t, row in enumerate(rows):
            step = t + 1
            out += [
                (f"{metric}/{metric_key(result.tasks[j])}", value, step)
                for j, value in enumerate(row[:step])
                if value is not None
            ]
            out.append((f"mean/{metric}", final(rows[:step]), step))
            if step > 1:
                out.append((f"forgetting/{metric}", forgetting(rows[:step]), step))
    return [(k, v, s) for k, v, s in out if not math.isnan(v)]


def stage_metrics(result: RunResult) -> dict[str, float]:
    """Seconds spent and stages computed/cached, per stage and in total, in this run
    (``usage/seconds/<stage>``, ``usage/computed/<stage>``, ``usage/cached/<stage>``)."""
    out: dict[str, float] = {}
    for record in result.stages:
        for stage in (record.stage, "total"):
            for kind in ("seconds", "computed", "cached"):
                out.setdefault(f"{COST}/{kind}/{stage}", 0.0)
            out[f"{COST}/seconds/{stage}"] += record.seconds
            out[f"{COST}/{'cached' if record.cached else 'computed'}/{stage}"] += 1
    return out


def metric_key(name: str) -> str:
    """A class name as an MLflow metric key part (letters, digits, _ - . and space only)."""
    return re.sub(r"[^\w.\- ]", "_", name)


def _metrics(values: Sequence[tuple[str, float, int]]) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step) for key, value, step in values]


def _peak_memory() -> dict[str, float]:
    """Peak memory of this process so far (the whole process lifetime, not only this run)."""
    out = {f"{COST}/memory/peak_rss_mb": peak_rss_bytes() / 2**20}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out[f"{COST}/memory/peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# Artifacts ---------------------------------------------------------------------------------------


def _log_artifacts(
    client: MlflowClient, run_id: str, result: RunResult, gallery: Mapping[str, Figure]
) -> None:
    client.log_dict(run_id, result.config.model_dump(mode="json"), "config.yaml")
    client.log_dict(run_id, result.as_json(), "result.json")
    for metric in result.results.metrics:
        rows = result.results.matrix(metric)
        client.log_text(run_id, matrix_csv(result.tasks, rows), f"results/{metric}.csv")
        client.log_figure(
            run_id, matrix_figure(result.tasks, rows, metric), f"results/{metric}.png"
        )
    client.log_figure(run_id, curves_figure(result.results), "results/curves.png")
    for name, figure in gallery.items():
        client.log_figure(run_id, figure, f"gallery/{metric_key(name)}.png")


def matrix_csv(tasks: list[str], rows: list[list[float | None]]) -> str:
    """Row = after learning that class, column = class evaluated; empty where undefined."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["after learning", *tasks])
    for name, row in zip(tasks, rows, strict=False):
        writer.writerow([name, *("" if v is None else f"{v:.6f}" for v in row)])
    return text.getvalue()
