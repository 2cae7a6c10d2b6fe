"""Where stages run: the runner protocol, the in-process runner, and how a request spreads work.

A request (`ucad.continual`) calls stage functions through a `StageRunner`. `LocalRunner` calls
them here, one at a time; `ucad.cluster.DaskRunner` sends each to a Dask worker; the Prefect
flows wrap either in task runs (flows/tasks.py). A runner's `workers` says how many stages it can
run at once, and `stage_pool` gives the request that many threads to wait on them: the stream is
a graph (each class's learning stages depend only on that class; an evaluation only on the
version it evaluates), so with room for several stages, several classes learn at once.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from ucad.config import Config
from ucad.pipeline import Runtime, process_runtime
from ucad.store import ArtifactStore

P = ParamSpec("P")
R = TypeVar("R")


class StageRunner(Protocol):
    """Runs one stage function (`ucad.stages.*.run_*`) with its arguments after the Runtime.

    `workers`: how many stage calls it can serve at once (calls beyond that wait their turn).
    """

    workers: int

    def __call__(
        self, stage: Callable[Concatenate[Runtime, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R: ...


def stage_name(stage: Callable[..., Any]) -> str:
    """`run_keys` -> `keys`: the stage's one name, as in its artifacts, task runs and the README."""
    return stage.__name__.removeprefix("run_")


class LocalRunner:
    """Calls the stage functions in this process, one at a time."""

    workers = 1

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def __call__(
        self, stage: Callable[Concatenate[Runtime, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        return stage(self.rt, *args, **kwargs)


def runner_for(config: Config, store: ArtifactStore) -> AbstractContextManager[StageRunner]:
    """The runner the config asks for: this process (`task_runner: threads`, the default), or a
    Dask cluster (`task_runner: dask`), open for the block."""
    if config.task_runner == "dask":
        from ucad.cluster import dask_runner

        return dask_runner(config, store)
    return nullcontext(LocalRunner(process_runtime(config, store.root)))


class InlineExecutor(Executor):
    """Runs each call as it is submitted: one worker, in submission order, in this thread."""

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        future: Future[R] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 - handed to whoever reads the result
            future.set_exception(err)
        return future


class ContextThreads(ThreadPoolExecutor):
    """Threads that run each call in a copy of the submitter's context (Prefect's flow run)."""

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)


@contextmanager
def stage_pool(runner: StageRunner) -> Iterator[Executor]:
    """Threads that wait on the runner's stages, as many as it runs at once; with one, calls run
    in this thread in order, as a plain loop would."""
    if runner.workers <= 1:
        yield InlineExecutor()
        return
    pool = ContextThreads(max_workers=runner.workers, thread_name_prefix="ucad-stage")
    try:
        yield pool
    except BaseException:
        # an error or Ctrl-C: drop what has not started, and do not wait for stages in flight
        # (closing the runner, e.g. its Dask client, ends those waits)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
