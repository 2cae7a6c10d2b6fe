"""Prefect flows: `ucad` adds a class to a model, `ucad-benchmark` replays a whole stream.

Both run the library's requests (`ucad.continual.AddTask` / `Replay`, what the `ucad` command
runs) with a PrefectRunner: each stage becomes a Prefect task run, and the
per-image work goes to the task runner the config chooses. A finished run is logged to MLflow
as the command line logs it, tagged with the flow run's id. Deployments are in prefect.yaml.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.tasks import stage_runner
from ucad.config import Config, load_config
from ucad.continual import AddTask, Replay, RunResult
from ucad.data.datasets import DatasetFormat
from ucad.report import format_run
from ucad.runs import track
from ucad.stages.evaluate import Routing
from ucad.store import ArtifactStore


@flow(name="ucad", flow_run_name="{model}-{task}", persist_result=False)
def add_task_flow(
    task: str,
    data: str,
    model: str,
    format: DatasetFormat = "mvtec",
    preset: str = "paper",
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    store: str | None = None,
    routing: Routing = "agnostic",
    tracking: bool = True,
) -> dict[str, Any]:
    """Learn one class into a model (created if new), then evaluate every class it knows.

    Args:
        task: the class to learn.
        data: dataset root (relative paths are from the repository root).
        model: model name.
        format: dataset layout: mvtec, visa or folder.
        preset: paper, or smoke (mechanics only).
        config: YAML/JSON file of config fields over the preset.
        overrides: config fields over the preset and the file.
        store: artifact store root or fsspec URL (default: $UCAD_STORE, else ./artifacts).
        routing: agnostic (each image selects its class), or oracle (the true class).
        tracking: log the run to MLflow (tracking_uri, else $MLFLOW_TRACKING_URI, else the store).
    """
    started = time.time()
    request = AddTask(
        model=model,
        task=task,
        data=data,
        config=_settings(preset, config, overrides),
        store=ArtifactStore(store),
        format=format,
        routing=routing,
    )
    with stage_runner(request.config, request.store) as runner:
        result = request.run(runner)
    return _report(result, request.store, "add-task", started, tracking)


@flow(name="ucad-benchmark", persist_result=False)
def benchmark_flow(
    data: str,
    format: DatasetFormat = "mvtec",
    tasks: list[str] | None = None,
    model: str | None = None,
    preset: str = "paper",
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    store: str | None = None,
    routing: Routing = "agnostic",
    tracking: bool = True,
) -> dict[str, Any]:
    """Replay a stream of classes into a fresh model, evaluating every class after each one.

    Args:
        data: dataset root (relative paths are from the repository root).
        format: dataset layout: mvtec, visa or folder.
        tasks: class order (default: all classes, alphabetically).
        model: name of the fresh model (default: benchmark-<UTC time>).
        preset: paper, or smoke (mechanics only).
        config: YAML/JSON file of config fields over the preset.
        overrides: config fields over the preset and the file.
        store: artifact store root or fsspec URL (default: $UCAD_STORE, else ./artifacts).
        routing: agnostic (each image selects its class), or oracle (the true class).
        tracking: log the run to MLflow (tracking_uri, else $MLFLOW_TRACKING_URI, else the store).
    """
    started = time.time()
    request = Replay(
        data=data,
        config=_settings(preset, config, overrides),
        store=ArtifactStore(store),
        format=format,
        tasks=tuple(tasks) if tasks else None,
        model=model,
        routing=routing,
    )
    with stage_runner(request.config, request.store) as runner:
        result = request.run(runner)
    return _report(result, request.store, "benchmark", started, tracking)


def _settings(preset: str, file: str | None, overrides: dict[str, Any] | None) -> Config:
    # The stages log what they compute or find cached at INFO; prefect.yaml's
    # PREFECT_LOGGING_EXTRA_LOGGERS=ucad sends those lines to the flow run's logs.
    logging.getLogger("ucad").setLevel(logging.INFO)
    settings = load_config(preset, file, overrides)
    get_run_logger().info("config: %s", settings.model_dump_json())
    return settings


def _report(
    result: RunResult, store: ArtifactStore, kind: str, started: float, tracking: bool
) -> dict[str, Any]:
    """Log the results tables and what the run computed, then to MLflow; return the JSON."""
    data = result.as_json()
    get_run_logger().info("%s", format_run(data))
    if tracking:  # a failure to log is a warning: the results are in the store either way
        track(result, store, kind, flow_run_id=flow_run.id, started=started)
    return data
