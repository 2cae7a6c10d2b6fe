"""The two requests of continual learning: add a class to a model, or replay a whole stream.

`AddTask(...).run()` and `Replay(...).run()` are what the `ucad` command and both Prefect flows
construct and call. Stages run through a `StageRunner` (ucad/runners.py): in this process by
default, on a Dask cluster, or as Prefect tasks from `flows/`. Where the runner has room for
several stages at once, a stream's classes learn concurrently and each version's evaluations
start as soon as the version exists; versions are still written in class order, and what is
computed does not depend on the order. Data flow of one add-task (README, "How the code is laid
out"):

    request -> head version (validated, its artifacts checked) -> TaskSource of the class
    -> structure, keys -> prompts -> knowledge -> calibrate      (ucad/stages/, cached by digest)
    -> the next ModelVersion, in memory
    -> each version's row of results: found in the store (earlier versions), or its
       classes evaluated (features, routing, scores, evaluate) and the row written
    -> the new version written (manifest.append_version): last, so a run that fails or is
       killed before it leaves no version behind
    -> RunResult (results matrix, stage records)
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ucad.config import Config, Routing
from ucad.data.datasets import DatasetFormat, read_task
from ucad.data.source import DataUnavailableError, TaskSource
from ucad.manifest import (
    ModelVersion,
    TaskEntry,
    append_version,
    head_version,
    load_version,
    next_version,
)
from ucad.metrics import METRICS, ResultsMatrix
from ucad.pipeline import Evaluation, Runtime, StageRecord
from ucad.provenance import library_versions
from ucad.request_checks import check_routing, check_same_config, check_task_files, resolve_tasks
from ucad.runners import LocalRunner, StageRunner, stage_pool
from ucad.stages.calibrate import run_calibrate
from ucad.stages.evaluate import run_evaluate
from ucad.stages.keys import run_keys
from ucad.stages.knowledge import run_knowledge
from ucad.stages.prompts import run_prompts
from ucad.stages.row import Row, find_row, run_row
from ucad.stages.structure import run_structure
from ucad.store import ArtifactStore, validate_name
from ucad.verify import check_version

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """A model's whole history after a run, and what this run computed."""

    model: str
    version: int
    tasks: list[str]
    routing: Routing
    config: Config
    results: ResultsMatrix
    stages: list[StageRecord] = field(default_factory=list)
    new_version: bool = True

    @property
    def computed(self) -> int:
        return sum(not record.cached for record in self.stages)

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
            "versions": library_versions(),
        }


@dataclass(frozen=True)
class AddTask:
    """Learn class `task` of the dataset at `data` into `model` (created if new), then evaluate
    every class of every version. An identical request computes nothing and writes nothing."""

    model: str
    task: str
    data: str | Path
    config: Config
    store: ArtifactStore
    format: DatasetFormat = "mvtec"
    routing: Routing = "agnostic"

    def run(self, runner: StageRunner | None = None) -> RunResult:
        runner = runner or LocalRunner(Runtime(self.config, self.store))
        with stage_pool(runner) as pool:
            version, records, new = learn(self, runner, pool, check_files=True)
            rows, evaluations = evaluate_history(self.store, version, self.routing, runner, pool)
            if new:
                written = publish(self.store, version)
                if written.version != version.version:  # another run added a class meanwhile
                    rows, more = evaluate_history(self.store, written, self.routing, runner, pool)
                    evaluations += more
                version = written
        return _result(self, version, rows, records + evaluations, new)


@dataclass(frozen=True)
class Replay:
    """Learn a stream of classes in order into a fresh model, evaluating after each one."""

    data: str | Path
    config: Config
    store: ArtifactStore
    format: DatasetFormat = "mvtec"
    tasks: tuple[str, ...] | None = None  # None: every class of the dataset, alphabetically
    model: str | None = None  # None: benchmark-<UTC time>
    routing: Routing = "agnostic"

    def run(self, runner: StageRunner | None = None) -> RunResult:
        order = resolve_tasks(self.data, self.format, self.tasks)
        # to the microsecond: two benchmarks into one store may start within the same second
        model = self.model or f"benchmark-{datetime.now(timezone.utc):%Y%m%d-%H%M%S-%f}"
        if self.store.model_versions(validate_name(model, "model name")):
            raise ValueError(
                f"model {model!r} exists already in {self.store.root!r}; a benchmark starts fresh"
            )
        classes = [read_task(self.data, name, self.format) for name in order]
        for data in classes:  # a broken file in a late class must stop the stream before it starts
            check_task_files(data, self.config)
        sources = [TaskSource.from_data(self.data, self.format, data) for data in classes]
        check_routing(self.routing)
        runner = runner or LocalRunner(Runtime(self.config, self.store))
        log.info("stream of %d classes into model %s: %s", len(order), model, ", ".join(order))
        with stage_pool(runner) as pool:
            return self._stream(model, sources, runner, pool)

    def _stream(
        self, model: str, sources: list[TaskSource], runner: StageRunner, pool: Executor
    ) -> RunResult:
        """Learn `runner.workers` classes at a time; evaluate each version once it exists, ahead
        of the next class; write versions in class order once evaluated."""
        learning: dict[int, Future[list[StageRecord]]] = {}

        def start(t: int) -> None:
            if t < len(sources):
                learning[t] = pool.submit(learn_class, sources[t], runner)

        for t in range(runner.workers):
            start(t)
        results = ResultsMatrix(len(sources), METRICS)
        records: list[StageRecord] = []
        version: ModelVersion | None = None
        unwritten: list[PendingRow] = []
        for t, source in enumerate(sources):
            learned = learning.pop(t).result()
            records += learned
            entry = task_entry(self.store, source, learned)
            version = next_version(model, version, entry, self.config)
            unwritten.append(start_row(pool, runner, version, self.routing))
            while unwritten and (t == len(sources) - 1 or unwritten[0].done()):
                pending = unwritten.pop(0)
                row = finish_row(runner, pending)
                publish(self.store, pending.version)  # a fresh model: no other run writes to it
                results.set_row(pending.version.version - 1, row.metrics)
                records += row.records
            start(t + runner.workers)
        assert version is not None  # resolve_tasks never returns an empty order
        return _result(self, version, results, records, True)


def learn(
    request: AddTask, runner: StageRunner, pool: Executor, check_files: bool
) -> tuple[ModelVersion, list[StageRecord], bool]:
    """Run the class's learning stages and make the version that adds it; a class the head
    version holds already is not learned again (a runtime field such as `inference_batch_size`
    could otherwise compute stages the version never uses).

    Returns the version that holds the class (a new one is not written yet: `publish`), the
    stage records, and whether it is new.
    `check_files=False` skips `check_task_files` for a caller that has just run it.
    """
    store, model, task = request.store, request.model, request.task
    validate_name(model, "model name")
    check_routing(request.routing)
    head = head_version(store, model)
    restored: list[StageRecord] = []
    if head is not None:
        check_same_config(head, request.config)
        check_version(store, head)  # never build a version on a damaged one
        restored = restore(head, runner, pool, store)
    task_data = read_task(request.data, task, request.format)
    source = TaskSource.from_data(request.data, request.format, task_data)
    known = head.find(task) if head else None
    if known is not None and not known.data.same_content(source):
        raise ValueError(
            f"class {task!r} is already in model {model!r} (version {head.version}) with "
            f"other data: it was learned from {known.data.root} (train {known.data.train[:12]}), "
            f"this request has {source.root} (train {source.train[:12]}); use another model "
            "name for a different data set"
        )
    if known is None and check_files:
        check_task_files(task_data, request.config)

    if known is not None:  # its entry in the head stands: nothing to learn
        log.info("class %s is already in model %s version %d", task, model, head.version)
        return head, restored, False
    own = learn_class(source, runner)
    entry = task_entry(store, source, own)
    return next_version(model, head, entry, request.config), restored + own, True


def task_entry(store: ArtifactStore, source: TaskSource, learned: list[StageRecord]) -> TaskEntry:
    """A class's manifest entry from its learning stages' records (`learn_class`)."""
    digests = {record.stage: record.digest for record in learned}
    return TaskEntry(
        name=source.name,
        data=source,
        **digests,
        threshold=store.get("calibrate", digests["calibrate"]).attrs["threshold"],
    )


def publish(store: ArtifactStore, version: ModelVersion) -> ModelVersion:
    """Write the new version's last class onto the model's head of the moment (another run may
    have added a class since `version` was built)."""
    written = append_version(store, version.model, version.tasks[-1], version.config)
    log.info(
        "model %s version %d: %s", written.model, written.version, ", ".join(written.task_names)
    )
    return written


def learn_class(source: TaskSource, runner: StageRunner) -> list[StageRecord]:
    """The stages of one class, in order: structure, keys, prompts, knowledge, calibrate."""
    structure = runner(run_structure, source)
    keys = runner(run_keys, source)
    prompts = runner(run_prompts, source, structure.digest)
    knowledge = runner(run_knowledge, source, prompts.digest)
    calibrate = runner(run_calibrate, source, prompts.digest, knowledge.digest)
    return [structure, keys, prompts, knowledge, calibrate]


def restore(
    version: ModelVersion, runner: StageRunner, pool: Executor, store: ArtifactStore
) -> list[StageRecord]:
    """Compute again the class artifacts of `version` that are missing (moved aside by
    `ucad store verify --repair`, or deleted), from the classes' recorded data."""
    missing = [
        task
        for task in version.tasks
        if not all(store.has(stage, digest) for stage, digest in task.digests().items())
    ]
    for task in missing:
        log.info("model %s: restoring the missing artifacts of class %s", version.ref, task.name)
    learning = [pool.submit(learn_class, task.data, runner) for task in missing]
    records: list[StageRecord] = []
    for task, future in zip(missing, learning, strict=True):
        learned = future.result()
        records += learned
        for record in learned:
            expected = getattr(task, record.stage)
            if record.digest != expected:
                raise ValueError(
                    f"{store.model_location(version.model, version.version)}: class "
                    f"{task.name!r}: its {record.stage} artifact {expected} is missing, and "
                    f"computing it again here gives {record.digest} (another ucad version, "
                    "precision or backbone weights?): it cannot be restored here"
                )
    return records


@dataclass(frozen=True)
class PendingRow:
    """A version's row of the results matrix: found in the store, or its classes' evaluations
    under way."""

    version: ModelVersion
    routing: Routing
    found: Row | None
    evaluations: list[Future[Evaluation]]

    def done(self) -> bool:
        return all(future.done() for future in self.evaluations)


def start_row(
    pool: Executor, runner: StageRunner, version: ModelVersion, routing: Routing
) -> PendingRow:
    """Look the version's row up; where the store lacks it, start evaluating each class."""
    found = runner(find_row, version, routing)
    if found is not None:
        return PendingRow(version, routing, found, [])
    classes = range(len(version.tasks))
    evaluations = [pool.submit(runner, run_evaluate, version, j, routing) for j in classes]
    return PendingRow(version, routing, None, evaluations)


def finish_row(runner: StageRunner, pending: PendingRow) -> Row:
    """The row as found, or gathered from its evaluations and written once complete; a class
    whose test images are gone stays empty (and the row unwritten)."""
    if pending.found is not None:
        return pending.found
    version = pending.version
    metrics: dict[int, dict[str, float]] = {}
    records: list[StageRecord] = []
    evaluated: list[str] = []
    for j, future in enumerate(pending.evaluations):
        try:
            evaluation = future.result()
        except DataUnavailableError as err:
            # earlier classes' images may be gone: their entries stay empty (null)
            name = version.tasks[j].name
            log.warning("version %d, class %s not evaluated: %s", version.version, name, err)
            continue
        metrics[j] = evaluation.metrics
        records += evaluation.records
        evaluated.append(evaluation.digest)
    if len(evaluated) == len(version.tasks):
        records.append(runner(run_row, version, pending.routing, evaluated))
    return Row(metrics, records)


def evaluate_history(
    store: ArtifactStore, head: ModelVersion, routing: Routing, runner: StageRunner, pool: Executor
) -> tuple[ResultsMatrix, list[StageRecord]]:
    """Results matrix of versions 1..head: row v-1 has every class of version v. Rows of earlier
    versions are found in the store (one lookup each), so only new versions evaluate."""
    versions = [
        head if v == head.version else load_version(store, head.model, v)
        for v in range(1, head.version + 1)
    ]
    started = [start_row(pool, runner, version, routing) for version in versions]
    results = ResultsMatrix(head.version, METRICS)
    records: list[StageRecord] = []
    for pending in started:
        row = finish_row(runner, pending)
        results.set_row(pending.version.version - 1, row.metrics)
        records += row.records
    return results, records


def _result(
    request: AddTask | Replay,
    version: ModelVersion,
    results: ResultsMatrix,
    records: list[StageRecord],
    new_version: bool,
) -> RunResult:
    return RunResult(
        version.model,
        version.version,
        version.task_names,
        request.routing,
        request.config,
        results,
        unique_records(records),
        new_version,
    )


def unique_records(records: list[StageRecord]) -> list[StageRecord]:
    """Each artifact once (evaluations share features, routing and scores), in first-seen order,
    as computed where any record of it says so: two workers that raced for one artifact leave
    one computed record and one cached (raced) one, in either order."""
    unique: dict[tuple[str, str], StageRecord] = {}
    for record in records:
        key = (record.stage, record.digest)
        if key not in unique or (unique[key].cached and not record.cached):
            unique[key] = record
    return list(unique.values())
