"""Prefect flows: `ucad` adds a class to a model, `ucad-benchmark` replays a whole stream.

Both run the library's requests (`ucad.continual.AddTask` / `Replay`, what the `ucad` command
runs) with a PrefectRunner: each stage that has work to do becomes a Prefect task run, what is
in the store already shows as one Cached task run, and the per-image work goes to the task
runner the config chooses. A flow run is named from its request (`line-3 +bottle`,
`benchmark mvtec 15 classes`) and carries its results as artifacts: the results matrices as a
table, the final means and forgetting as markdown. A finished run is logged to MLflow as the
command line logs it, tagged with the flow run's id. Deployments are in prefect.yaml.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.tasks import stage_runner
from ucad.config import Config, Routing, load_config
from ucad.continual import AddTask, Replay, RunResult
from ucad.data.datasets import DatasetFormat, list_tasks
from ucad.report import format_run
from ucad.runs import config_label, is_noop, track
from ucad.store import ArtifactStore

SYNTH_CLASSES = 3  # the stream `synth=True` writes (ucad synth's default)


def add_task_run_name() -> str:
    """`line-3 +bottle`: the model and the class the flow run adds."""
    parameters = flow_run.parameters
    return f"{parameters['model']} +{parameters['task']}"


def benchmark_run_name() -> str:
    """`benchmark mvtec 15 classes`: the dataset folder and the stream's length (and the preset
    when it is not the paper's)."""
    parameters = flow_run.parameters
    data = str(parameters["data"])
    name = f"benchmark {_dataset(data)}"
    count = _stream_length(data, parameters)
    if count:
        name += f" {count} {'class' if count == 1 else 'classes'}"
    preset = parameters.get("preset", "paper")
    return name if preset == "paper" else f"{name} ({preset})"


def _stream_length(data: str, parameters: dict[str, Any]) -> int | None:
    if parameters.get("tasks"):
        return len(parameters["tasks"])
    try:
        return len(list_tasks(data, parameters.get("format", "mvtec")))
    except (OSError, ValueError):  # not there yet (synth), or not a dataset: the run says why
        return SYNTH_CLASSES if parameters.get("synth") else None


@flow(name="ucad", flow_run_name=add_task_run_name, persist_result=False)
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
    return _report(result, request.store, "add-task", started, tracking, data)


@flow(name="ucad-benchmark", flow_run_name=benchmark_run_name, persist_result=False)
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
    synth: bool = False,
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
        synth: `data` is a synthetic stream: write it there first (ucad synth, 3 classes) when
            the folder is missing or empty. The nightly deployment's health check.
    """
    started = time.time()
    if synth:
        synthesize(data)
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
    return _report(result, request.store, "benchmark", started, tracking, data)


def _settings(preset: str, file: str | None, overrides: dict[str, Any] | None) -> Config:
    # The stages log what they compute or find cached at INFO; prefect.yaml's
    # PREFECT_LOGGING_EXTRA_LOGGERS=ucad sends those lines to the flow run's logs.
    logging.getLogger("ucad").setLevel(logging.INFO)
    settings = load_config(preset, file, overrides)
    get_run_logger().info("config: %s", settings.model_dump_json())
    return settings


def synthesize(data: str) -> None:
    """Write a synthetic stream at `data` unless a dataset is there (atomically: a run that
    starts meanwhile sees the whole stream or none)."""
    root = Path(data)
    if root.is_dir() and any(root.iterdir()):
        return
    from ucad.data.synth import generate

    partial = root.with_name(f".{root.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    names = generate(partial, classes=SYNTH_CLASSES, seed=0)
    try:
        os.replace(partial, root)  # onto a missing or empty folder
    except OSError:  # another run wrote it meanwhile
        shutil.rmtree(partial, ignore_errors=True)
        if not (root.is_dir() and any(root.iterdir())):
            raise
    get_run_logger().info("wrote a synthetic stream to %s: %s", root, ", ".join(names))


def _report(
    result: RunResult, store: ArtifactStore, kind: str, started: float, tracking: bool, root: str
) -> dict[str, Any]:
    """Log the results tables and what the run computed, record the run in MLflow, and attach
    the results to the flow run as artifacts; return the JSON."""
    data = result.as_json()
    logger = get_run_logger()
    logger.info("%s", format_run(data))
    run_id = None
    if tracking:  # a failure to log is a warning: the results are in the store either way
        run_id = track(result, store, kind, flow_run_id=flow_run.id, started=started)
    key = artifact_key(kind, result, root)
    create_table_artifact(
        results_table(data),
        key=f"{key}-results",
        description=f"{_title(result, kind)}: results matrices. Row: after learning that class "
        "(1 = the first); column: class evaluated; empty: not learned yet or not evaluated.",
    )
    create_markdown_artifact(
        summary_markdown(result, data, kind, mlflow_note(result, store, run_id, tracking)),
        key=f"{key}-summary",
        description=f"{_title(result, kind)}: final means and forgetting",
    )
    return data


def artifact_key(kind: str, result: RunResult, data: str) -> str:
    """Artifact keys (lowercase letters, digits, dashes): one per model for add-task runs, so
    its artifacts' versions are the model's history; one per dataset folder for benchmarks (the
    nightly's history)."""
    subject = f"model-{result.model}" if kind == "add-task" else f"benchmark-{_dataset(data)}"
    return re.sub(r"[^a-z0-9]+", "-", subject.lower()).strip("-")


def _dataset(data: str) -> str:
    return Path(data).name or data


def _title(result: RunResult, kind: str) -> str:
    if kind == "add-task":
        change = f"+{result.tasks[-1]}" if result.new_version else "unchanged"
        return f"{result.model} v{result.version} {change}"
    count = len(result.tasks)
    return f"{result.model}: a stream of {count} {'class' if count == 1 else 'classes'}"


def results_table(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric and step: the metric, the class learned at that step, then each
    class's figure (4 decimals; empty where undefined)."""
    tasks = data["tasks"]
    rows = []
    for metric, matrix in data["matrix"].items():
        for t, row in enumerate(matrix):
            cells = zip(tasks, ("" if v is None else round(v, 4) for v in row), strict=True)
            rows.append({"metric": metric, "after learning": f"{t + 1} {tasks[t]}", **dict(cells)})
    return rows


def summary_markdown(result: RunResult, data: dict[str, Any], kind: str, mlflow: str) -> str:
    """The final mean and forgetting of each metric, what the run is and what it computed."""

    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.4f}"

    computed = result.computed
    lines = [
        f"## {_title(result, kind)}",
        "",
        f"Model **{result.model}** version {result.version}; classes in order: "
        f"{' → '.join(result.tasks)}.  ",
        f"Config {config_label(result.config)}, seed {result.config.seed}, "
        f"routing {result.routing}.",
        "",
        "| metric | final mean | forgetting |",
        "| --- | ---: | ---: |",
        *(
            f"| {metric} | {cell(data['final'][metric])} | {cell(data['forgetting'][metric])} |"
            for metric in data["final"]
        ),
        "",
        "Final mean: the last row's mean over the classes learned; forgetting: the mean drop "
        "from each earlier class's best figure (Chaudhry et al. 2018; – with one class).",
        "",
        f"This run computed {computed} stage(s) and found {len(result.stages) - computed} in the "
        "store" + (" (nothing changed)." if is_noop(result) else "."),
    ]
    if mlflow:
        lines += ["", mlflow]
    return "\n".join(lines)


def mlflow_note(result: RunResult, store: ArtifactStore, run_id: str | None, tracking: bool) -> str:
    """Where the run is in MLflow, for the summary."""
    if not tracking:
        return "Not logged to MLflow (tracking: false)."
    if run_id is None:
        if is_noop(result) and store.is_tracked(result.model, result.version):
            return (
                "MLflow: nothing changed, so no new run; this version's run is there already "
                f"(`ucad ui --model {result.model}`)."
            )
        return "Not logged to MLflow: see the flow run's logs."
    from ucad.ui import run_link

    link = run_link(store, result.config, run_id)
    if link:
        return f"MLflow: [run {run_id[:8]}]({link})."
    return f"MLflow: run `{run_id}`; open it with `ucad ui --model {result.model}`."
