"""Where MLflow runs are: the tracking URI a store's runs are logged to, and the HTTP limits
every request to a tracking server runs under.

`ucad.tracking` logs runs there and `ucad ui` looks them up there; neither this module nor its
callers import MLflow to find the place.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    from ucad.config import Config
    from ucad.store import ArtifactStore

ENV_VAR = "MLFLOW_TRACKING_URI"
# MLflow retries a failed request for minutes by default; a tracking server that is down should
# cost a run seconds. Values the user set in the environment win.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


@dataclass(frozen=True)
class Target:
    """Where runs are logged; ``artifact_location`` only for the default local database."""

    uri: str
    artifact_location: str | None = None


def resolve_target(
    store: ArtifactStore, config: Config, tracking_uri: str | None = None
) -> Target | None:
    """The argument, else ``config.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite
    database in a local store root (``<root>/mlflow.db``, artifacts in ``<root>/mlflow-artifacts``).

    None for a remote store root with nothing set: a database on whichever machine ran the job
    would scatter a shared store's runs, so such setups name their tracking server.
    """
    uri = tracking_uri or config.tracking_uri or os.environ.get(ENV_VAR)
    if uri:
        return Target(uri)
    filesystem, path = fsspec.core.url_to_fs(store.root)
    if not isinstance(filesystem, LocalFileSystem):
        return None
    root = Path(path).resolve()
    return Target(f"sqlite:///{root / 'mlflow.db'}", (root / "mlflow-artifacts").as_uri())


@contextmanager
def http_limits() -> Iterator[None]:
    """`HTTP_LIMITS` in the environment meanwhile, where the user set none of them."""
    added = [name for name in HTTP_LIMITS if name not in os.environ]
    os.environ.update({name: HTTP_LIMITS[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
