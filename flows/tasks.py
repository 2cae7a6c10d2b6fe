"""Prefect tasks: one per unit of pipeline work that a run needs, each a thin wrapper around its
`ucad` stage function.

Before a stage becomes a task run, the runner looks its artifacts up in the store, in the flow's
process: a stage whose artifacts all exist is not run as a task. What a flow run found in the
store shows once, as one task run `found-in-store-<n>` in a Completed state named "Cached" (n
stages: a class's stages, the rows of results of earlier model versions, the evaluation of an
earlier class whose figures a new version leaves as they were), however long the model's
history. A task run beside it computed something, unless a concurrent one computed what it needed
meanwhile (then it is Cached too). The store is the cache: Prefect's own
cache and result persistence are off. Tasks take small references (the config, the store root, a
TaskSource, digests, manifest entries) and return StageRecords; arrays stay in the store.

Where the work runs is the library's choice, as for the `ucad` command (`ucad.runners.runner_for`):
in the flow's process, or on a Dask cluster (`task_runner: dask`), where each task run waits for
its stage on a worker and up to `max_workers` of them run at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np
from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from ucad.config import Config
from ucad.data.source import TaskSource
from ucad.manifest import ModelVersion
from ucad.pipeline import Evaluation, Runtime, StageRecord, process_runtime
from ucad.runners import LocalRunner, StageRunner, runner_for, stage_name
from ucad.stages.row import find_row
from ucad.stages.structure import run_structure, structure_maps
from ucad.store import ArtifactStore

TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}
P = ParamSpec("P")
R = TypeVar("R", StageRecord, Evaluation)


def finish(result: R) -> R | Completed:
    """Report a stage whose artifacts all existed as Cached; its result is the same either way."""
    if all(record.cached for record in result.records):
        return Completed(name="Cached", data=result)
    return result


def task_run_name(stage: str, args: tuple[Any, ...]) -> str:
    """`keys-grain`; an evaluation: `evaluate-grain-v3` (class grain, model version 3); a row of
    results: `row-v3`."""
    subject = args[0]
    if isinstance(subject, ModelVersion):
        if isinstance(args[1], int):
            return f"{stage}-{subject.tasks[args[1]].name}-v{subject.version}"
        return f"{stage}-v{subject.version}"
    if isinstance(subject, TaskSource):
        return f"{stage}-{subject.label}"
    return stage


class Held:
    """A task argument that Prefect passes on as it is.

    Prefect walks a task's arguments for upstream futures, a pydantic model field by field
    through `dict(model)`, which a manifest's class entry breaks: its field `keys` (a digest)
    shadows the mapping method `dict()` calls. Models go to tasks held, and come out as they went.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Held({type(self.value).__name__})"


def hold(value: Any) -> Any:
    return Held(value) if isinstance(value, BaseModel) else value


def unhold(value: Any) -> Any:
    return value.value if isinstance(value, Held) else value


@cache
def stage_task(stage: Callable[..., Any]) -> Task:
    """The Prefect task of one stage function: passes the stage to the runner that does the work
    (this process's, or a Dask cluster's)."""

    def run_stage(backend: Held, *args: Any, **kwargs: Any) -> Any:
        args = tuple(unhold(arg) for arg in args)
        return finish(unhold(backend)(stage, *args, **kwargs))

    run_stage.__qualname__ = stage.__name__  # Prefect keys a task by its function's name
    return task(run_stage, name=stage_name(stage), **TASK_OPTIONS)


@task(name="structure-maps", task_run_name="structure-maps-{source.name}-{start}", **TASK_OPTIONS)
def structure_chunk(
    config: Config, store_root: str, source: TaskSource, start: int, stop: int
) -> np.ndarray:
    """Structure maps of training images start..stop-1 of a class, wherever the runner puts it."""
    return structure_maps(process_runtime(config, store_root), source, start, stop)


class Missing(Exception):
    """A stage's artifact is not in the store: the stage has work to do."""


class LookupStore:
    """The store for a lookup: an artifact that is not there raises Missing, nothing is written."""

    def __init__(self, store: ArtifactStore) -> None:
        self._store = store

    def has(self, stage: str, digest: str) -> bool:
        if not self._store.has(stage, digest):
            raise Missing(f"{stage}/{digest[:12]}")
        return True

    def put(self, stage: str, digest: str, *args: Any, **kwargs: Any) -> None:
        raise Missing(f"{stage}/{digest[:12]}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class LookupRuntime:
    """A Runtime that only looks up: a stage function run with it returns its records when every
    artifact it needs is in the store, and raises Missing at the first one that is not.

    Everything but the store is the process's Runtime, so what a lookup loads (weights' hashes,
    rarely a test set) is loaded once for the task runs too.
    """

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self.store = LookupStore(rt.store)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rt, name)


def look_up(
    stage: Callable[Concatenate[Runtime, P], R], rt: Runtime, *args: P.args, **kwargs: P.kwargs
) -> R | None:
    """The stage's result when all its artifacts are in the store, else None.

    Any other error is left to the task run, which raises it again where the UI shows it.
    """
    try:
        return stage(LookupRuntime(rt), *args, **kwargs)  # type: ignore[arg-type]
    except Exception:
        return None


@task(name="found-in-store", **TASK_OPTIONS)
def found_in_store(units: list[str], records: list[StageRecord]) -> Completed:
    """What a flow run found in the store, as one Cached task run: nothing was computed."""
    get_run_logger().info(
        "found in the store, nothing computed (%d): %s", len(units), ", ".join(units)
    )
    return Completed(name="Cached", data=records)


class PrefectRunner:
    """A `StageRunner` that runs each stage that has work to do as its Prefect task, on the
    `backend` runner; a stage whose artifacts are all in the store is only looked up, in the
    flow's process, and `report_found` shows those as one Cached task run.

    With the in-process backend, the structure stage hands its per-image chunks to `threads`
    (a thread pool of the flow's process), each chunk a task run of its own.
    """

    def __init__(
        self,
        config: Config,
        store_root: str,
        backend: StageRunner,
        threads: ThreadPoolTaskRunner | None = None,
    ) -> None:
        self.config = config
        self.store_root = store_root
        self.backend = backend
        self.threads = threads
        self.workers = backend.workers
        self.found: list[str] = []  # task run names of the stages found in the store
        self.found_records: list[StageRecord] = []

    def __call__(
        self, stage: Callable[Concatenate[Runtime, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        rt = process_runtime(self.config, self.store_root)
        if stage is find_row:  # a lookup only, never a task run: None when the row is not stored
            row = find_row(rt, *args, **kwargs)
            if row is not None:
                self.found.append(task_run_name("row", args))
                self.found_records += row.records
            return row
        name = task_run_name(stage_name(stage), args)
        found = look_up(stage, rt, *args, **kwargs)
        if found is not None:
            self.found.append(name)
            self.found_records += found.records
            return found
        if stage is run_structure and self.threads is not None:
            kwargs = {**kwargs, "map_chunks": self.map_chunks}
        named = stage_task(stage).with_options(task_run_name=name)
        held = tuple(hold(arg) for arg in args)
        return named(Held(self.backend), *held, **kwargs, return_state=True).result()

    def report_found(self) -> None:
        """One Cached task run for everything this run found in the store (none if nothing)."""
        if self.found:
            found_in_store.with_options(task_run_name=f"found-in-store-{len(self.found)}")(
                self.found, self.found_records, return_state=True
            )

    def map_chunks(
        self, rt: Runtime, source: TaskSource, chunks: list[tuple[int, int]]
    ) -> list[np.ndarray]:
        assert self.threads is not None
        _ = rt.structure_source  # threads share this process's model: load it before they start
        futures = [
            self.threads.submit(
                structure_chunk,
                {
                    "config": self.config,
                    "store_root": self.store_root,
                    "source": source,
                    "start": start,
                    "stop": stop,
                },
            )
            for start, stop in chunks
        ]
        return [future.result() for future in futures]


@contextmanager
def stage_runner(config: Config, store: ArtifactStore) -> Iterator[PrefectRunner]:
    """A PrefectRunner on the runner the config asks for, open for the block (a Dask cluster, or
    this process with a thread pool for structure-map chunks); at its end, what the run found in
    the store shows as one Cached task run."""
    with (
        runner_for(config, store) as backend,
        ThreadPoolTaskRunner(max_workers=config.max_workers) as threads,
    ):
        in_process = isinstance(backend, LocalRunner)
        runner = PrefectRunner(config, store.root, backend, threads if in_process else None)
        yield runner
        runner.report_found()
