"""Add a class to a model, or replay a whole stream, through the cached pipeline.

This is the body of the Prefect flow `ucad` and of the `ucad add-task` / `ucad benchmark`
commands. Stages run through a `StageRunner`: directly here, as Prefect tasks in `flows/`.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch

from ucad import __version__
from ucad.config import Config
from ucad.data.datasets import TaskData, list_tasks, read_task
from ucad.data.images import MIN_SIZE, Geometry, load_images, load_test_set
from ucad.metrics import METRICS, ResultsMatrix
from ucad.pipeline import (
    DataUnavailableError,
    Runtime,
    StageRecord,
    TaskSource,
    calibration_split,
    run_calibrate,
    run_evaluate,
    run_keys,
    run_knowledge,
    run_prompts,
    run_structure,
)
from ucad.store import ArtifactStore, validate_name

log = logging.getLogger(__name__)

ROUTINGS = ("agnostic", "oracle")
# Fields that change how fast a run is, not what it computes: a model may be extended with others.
RUNTIME_FIELDS = (
    "device",
    "inference_batch_size",
    "workers",
    "task_runner",
    "dask_address",
    "max_workers",
    "tracking_uri",
)


class StageRunner(Protocol):
    """Runs one named stage: `structure`, `keys`, `prompts`, `knowledge`, `calibrate` or
    `evaluation`."""

    def __call__(self, stage: str, *args: Any) -> Any: ...


STAGES: dict[str, Callable[..., Any]] = {
    "structure": run_structure,
    "keys": run_keys,
    "prompts": run_prompts,
    "knowledge": run_knowledge,
    "calibrate": run_calibrate,
    "evaluation": run_evaluate,
}


class LocalRunner:
    """Calls the stage functions in this process, in order."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def __call__(self, stage: str, *args: Any) -> Any:
        return STAGES[stage](self.rt, *args)


@dataclass
class RunResult:
    """A model's whole history after a run, and what this run computed."""

    model: str
    version: int
    tasks: list[str]
    routing: str
    config: Config
    results: ResultsMatrix
    stages: list[StageRecord] = field(default_factory=list)
    new_version: bool = True

    def as_json(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            **self.results.as_json(),
            "model": self.model,
            "version": self.version,
            "new_version": self.new_version,
            "routing": self.routing,
            "seed": self.config.seed,
            "config": self.config.model_dump(mode="json"),
            "stages": [record.as_json() for record in self.stages],
            "versions": {
                "ucad": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }


def add_task(
    model: str,
    task: str,
    data: str | Path,
    data_format: str,
    config: Config,
    store: ArtifactStore,
    routing: str = "agnostic",
    runner: StageRunner | None = None,
    check_files: bool = True,
) -> RunResult:
    """Learn one class into `model` (created if new), then evaluate every class it knows.

    An identical request is a no-op: every stage is found cached and no version is written.
    `check_files=False` skips `check_task_files` for a caller that has just run it.
    """
    validate_name(model, "model name")
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    runner = runner or LocalRunner(Runtime(config, store))
    head = _head(store, model)
    if head is not None:
        _check_same_config(model, head, config)
    task_data = read_task(data, task, data_format)
    source = TaskSource.from_data(str(data), data_format, task_data)
    known = {t["name"]: t for t in head["tasks"]} if head else {}
    if task in known and not _same_data(known[task]["data"], source):
        raise ValueError(
            f"class {task!r} is already in model {model!r} (version {head['version']}) with "
            f"other data: it was learned from {known[task]['data']['root']} "
            f"(train {known[task]['data']['train'][:12]}), this request has {source.root} "
            f"(train {source.train[:12]}); use another model name for a different data set"
        )
    if task not in known and check_files:
        check_task_files(task_data, config)

    records = [runner("structure", source), runner("keys", source)]
    records.append(runner("prompts", source, records[0].digest))
    records.append(runner("knowledge", source, records[2].digest))
    memory = {"name": task, **{record.stage: record.digest for record in records}}
    records.append(runner("calibrate", source, memory))
    entry = {
        "name": task,
        "data": asdict(source),
        **{record.stage: record.digest for record in records},
        "threshold": store.get("calibrate", records[-1].digest).attrs["threshold"],
    }
    if task in known:
        version, new_version = head["version"], False
        log.info("class %s is already in model %s version %d: nothing to add", task, model, version)
    else:
        version = store.append_model(
            model, lambda previous: _next_manifest(model, previous, entry, config)
        )
        new_version = True
        log.info(
            "model %s version %d: %s", model, version, ", ".join(_task_names(store, model, version))
        )
    results, evaluations = evaluate_history(store, model, version, routing, runner)
    return RunResult(
        model,
        version,
        _task_names(store, model, version),
        routing,
        config,
        results,
        records + evaluations,
        new_version,
    )


def check_task_files(data: TaskData, config: Config) -> None:
    """Decode every image and mask of a class before its first stage runs.

    A broken file then stops the request with the store unchanged, instead of after the class's
    stages and a new model version were written (test images are otherwise first read by the
    evaluation, after the version).
    """
    try:
        calibration_split(len(data.train), config.calibration_fraction, config.seed)
    except ValueError as err:
        raise ValueError(f"class {data.name!r} ({data.train[0].parent}): {err}") from None
    probe = Geometry(MIN_SIZE, MIN_SIZE)  # only decoding and the checks matter, not the pixels
    load_images(data.train, probe, config.workers)
    load_test_set(data.test, probe, config.workers)


def evaluate_history(
    store: ArtifactStore, model: str, version: int, routing: str, runner: StageRunner
) -> tuple[ResultsMatrix, list[StageRecord]]:
    """Results matrix of versions 1..`version`: row v-1 evaluates every class of version v."""
    results = ResultsMatrix(version, METRICS)
    records: list[StageRecord] = []
    for v in range(1, version + 1):
        tasks = store.read_model(model, v)["tasks"]
        for j in range(len(tasks)):
            try:
                stage_records, metrics = runner("evaluation", tasks, j, routing)
            except DataUnavailableError as err:
                # earlier classes' images may be gone: their entries stay empty (null)
                log.warning("version %d, class %s not evaluated: %s", v, tasks[j]["name"], err)
                continue
            records.extend(stage_records)
            results.set(len(tasks) - 1, j, metrics)
    return results, records


def benchmark(
    data: str | Path,
    data_format: str,
    config: Config,
    store: ArtifactStore,
    tasks: list[str] | None = None,
    routing: str = "agnostic",
    model: str | None = None,
    runner: StageRunner | None = None,
) -> RunResult:
    """Replay a whole stream into a fresh model: learn classes in order, evaluating after each."""
    order = resolve_tasks(data, data_format, tasks)
    model = model or f"benchmark-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    if store.model_versions(validate_name(model, "model name")):
        raise ValueError(
            f"model {model!r} exists already in {store.root!r}; a benchmark starts fresh"
        )
    for name in order:  # a broken file in a late class must stop the stream before it starts
        check_task_files(read_task(data, name, data_format), config)
    runner = runner or LocalRunner(Runtime(config, store))
    log.info(
        "stream of %d classes into model %s, order: %s; seed %d",
        len(order),
        model,
        ", ".join(order),
        config.seed,
    )
    stages: list[StageRecord] = []
    seen: set[tuple[str, str]] = set()
    for name in order:
        result = add_task(
            model, name, data, data_format, config, store, routing, runner, check_files=False
        )
        # later steps look earlier versions' evaluations up again: list each artifact once
        stages += [r for r in result.stages if (r.stage, r.digest) not in seen]
        seen.update((r.stage, r.digest) for r in result.stages)
    result.stages = stages
    return result


def resolve_tasks(root: str | Path, data_format: str, tasks: list[str] | None) -> list[str]:
    """The explicit class order, or all classes of the dataset in alphabetical order."""
    if tasks:
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"a class appears twice in the task order: {', '.join(tasks)}")
        return list(tasks)
    return list_tasks(root, data_format)


def _same_data(recorded: dict[str, Any], source: TaskSource) -> bool:
    """Same files by content; where the dataset lives may have changed."""
    return all(recorded[k] == getattr(source, k) for k in ("format", "train", "test"))


def _head(store: ArtifactStore, model: str) -> dict[str, Any] | None:
    return store.read_model(model) if store.model_versions(model) else None


def _task_names(store: ArtifactStore, model: str, version: int) -> list[str]:
    return [t["name"] for t in store.read_model(model, version)["tasks"]]


def _result_fields(config: Config | dict[str, Any]) -> dict[str, Any]:
    data = config if isinstance(config, dict) else config.model_dump(mode="json")
    return {k: v for k, v in data.items() if k not in RUNTIME_FIELDS}


def _check_same_config(model: str, head: dict[str, Any], config: Config) -> None:
    theirs, ours = _result_fields(head["config"]), _result_fields(config)
    differing = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
    if differing:
        details = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in differing)
        raise ValueError(
            f"model {model!r} was built with another config ({details}); "
            "a model keeps one config: use a new model name for these settings"
        )


def _next_manifest(
    model: str, previous: dict[str, Any] | None, entry: dict[str, Any], config: Config
) -> dict[str, Any]:
    tasks = list(previous["tasks"]) if previous else []
    if any(t["name"] == entry["name"] for t in tasks):
        # Another run added this class between our read and our write.
        raise ValueError(
            f"class {entry['name']!r} was added to model {model!r} by another run meanwhile; "
            "run the request again to see that version"
        )
    version = (previous["version"] if previous else 0) + 1
    return {
        "model": model,
        "version": version,
        "tasks": tasks + [entry],
        "config": config.model_dump(mode="json"),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ucad_version": __version__,
    }
