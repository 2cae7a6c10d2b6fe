"""Prefect flows: `ucad` adds a class to a model, `ucad-benchmark` replays a whole stream.

Both run the library's one orchestration (`ucad.continual.add_task` / `benchmark`, the code the
`ucad` command runs) with a PrefectRunner: each stage becomes a Prefect task run, and the
per-image work goes to the task runner the config chooses. A finished run is logged to MLflow
as the command line logs it, tagged with the flow run's id. Deployments are in prefect.yaml.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.tasks import stage_runner
from ucad import continual
from ucad.config import Config, load_config
from ucad.report import format_run
from ucad.store import ArtifactStore
from ucad.tracking import log_result

Format = Literal["mvtec", "visa", "folder"]
Routing = Literal["agnostic", "oracle"]


@flow(name="ucad", flow_run_name="{model}-{task}", persist_result=False)
def add_task_flow(
    task: str,
    data: str,
    model: str,
    format: Format = "mvtec",
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
    settings = _settings(preset, config, overrides)
    artifacts = ArtifactStore(store)
    with stage_runner(settings, artifacts) as runner:
        result = continual.add_task(
            model, task, data, format, settings, artifacts, routing=routing, runner=runner
        )
    return _report(result, artifacts, "add-task", started, tracking)


@flow(name="ucad-benchmark", persist_result=False)
def benchmark_flow(
    data: str,
    format: Format = "mvtec",
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
    settings = _settings(preset, config, overrides)
    artifacts = ArtifactStore(store)
    with stage_runner(settings, artifacts) as runner:
        result = continual.benchmark(
            data, format, settings, artifacts, tasks, routing=routing, model=model, runner=runner
        )
    return _report(result, artifacts, "benchmark", started, tracking)


def _settings(preset: str, file: str | None, overrides: dict[str, Any] | None) -> Config:
    # The stages log what they compute or find cached at INFO; prefect.yaml's
    # PREFECT_LOGGING_EXTRA_LOGGERS=ucad sends those lines to the flow run's logs.
    logging.getLogger("ucad").setLevel(logging.INFO)
    settings = load_config(preset, file, overrides)
    get_run_logger().info("config: %s", settings.model_dump_json())
    return settings


def _report(
    result: continual.RunResult, store: ArtifactStore, kind: str, started: float, tracking: bool
) -> dict[str, Any]:
    """Log the results tables and what the run computed, then to MLflow; return the JSON."""
    data = result.as_json()
    get_run_logger().info("%s", format_run(data))
    if tracking:  # a failure to log is a warning: the results are in the store either way
        log_result(result, store, kind, flow_run_id=flow_run.id, started=started)
    return data
