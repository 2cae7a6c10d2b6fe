"""Stages on a Dask cluster (`task_runner: dask`): a local cluster of worker processes, or the
running cluster at `dask_address`. The `ucad` command and the Prefect flows both come here.

Each stage call becomes one Dask task. A worker builds its Runtime once (`process_runtime`), so
the backbone and SAM load once per worker process; tasks carry small references (config, store
root, a class's data fingerprints, manifest entries) and return stage records, while arrays go
through the artifact store, which every worker must reach (a shared folder or an fsspec URL).
While a worker computes an artifact it holds a cluster-wide lock on its digest: a second worker
asked for the same digest waits, then reports it cached (`StageRecord.raced`). A worker that dies
mid-stage loses only its temporary files; Dask runs the stage again on another worker.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from ucad.config import Config
from ucad.pipeline import Runtime, process_runtime
from ucad.runners import stage_name
from ucad.store import ArtifactStore

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


class DaskRunner:
    """A `StageRunner` whose stage calls run as tasks on the workers of a Dask client."""

    def __init__(self, client: Client, config: Config, store_root: str, workers: int) -> None:
        self.client = client
        self.config = config
        self.store_root = store_root
        self.workers = workers

    def __call__(
        self, stage: Callable[Concatenate[Runtime, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        future = self.client.submit(
            run_on_worker,
            stage,
            self.config,
            self.store_root,
            args,
            kwargs,
            key=f"{stage_name(stage)}-{uuid.uuid4().hex[:12]}",  # the dashboard's task name
            pure=False,
        )
        return future.result()


def run_on_worker(
    stage: Callable[..., R],
    config: Config,
    store_root: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> R:
    """One stage on a worker, with the worker's Runtime and a cluster-wide claim on digests."""
    rt = process_runtime(config, store_root)
    rt.claim = cluster_lock
    return stage(rt, *args, **kwargs)


def cluster_lock(name: str) -> AbstractContextManager[object]:
    from distributed import Lock

    return Lock(name)


@contextmanager
def dask_runner(config: Config, store: ArtifactStore) -> Iterator[DaskRunner]:
    """A DaskRunner for the block: on the cluster at `dask_address`, else on a local cluster of
    `max_workers` single-threaded worker processes that share this machine's cores (closed at
    the end). At most `max_workers` stages run at once either way."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ImportError(
            'task_runner "dask" needs distributed: pip install "ucad[dask]"'
        ) from None
    if config.dask_address:
        with Client(config.dask_address) as client:
            threads = sum(client.nthreads().values())
            log.info("Dask cluster %s: %d worker threads", config.dask_address, threads)
            client.forward_logging("ucad", level=logging.INFO)
            yield DaskRunner(client, config, store.root, max(1, min(config.max_workers, threads)))
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_worker = max(1, (cores or 1) // config.max_workers)
    with (
        LocalCluster(
            n_workers=config.max_workers,
            threads_per_worker=1,  # one stage at a time per process; torch gets the cores below
            processes=True,
            dashboard_address=":0",  # a free port: several runs can share a machine
            env={"OMP_NUM_THREADS": str(per_worker), "MKL_NUM_THREADS": str(per_worker)},
            silence_logs=logging.WARNING,
        ) as cluster,
        Client(cluster) as client,
    ):
        log.info(
            "local Dask cluster: %d worker processes, %d torch thread(s) each; dashboard %s",
            config.max_workers,
            per_worker,
            client.dashboard_link,
        )
        client.forward_logging("ucad", level=logging.INFO)
        yield DaskRunner(client, config, store.root, config.max_workers)
