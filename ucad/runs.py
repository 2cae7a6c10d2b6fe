"""What every run does once its stages are done, from the command line and the flows alike:
print or log its tables, and record it in MLflow with a gallery of example verdicts.

A request that changed nothing (no stage computed, no version written) and whose version was
already recorded is not logged again: it costs no backbone load, no gallery, no MLflow run.
A re-run that completes a run killed after writing its version, but before recording it, is
logged as the run it completes (the class it learned, its nested run).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from ucad.continual import RunResult
from ucad.manifest import load_version
from ucad.store import ArtifactStore

log = logging.getLogger(__name__)


def is_noop(result: RunResult) -> bool:
    return not result.new_version and result.computed == 0


def track(
    result: RunResult,
    store: ArtifactStore,
    kind: str,
    strict: bool = False,
    flow_run_id: str | None = None,
    started: float | None = None,
) -> str | None:
    """Record a finished run in MLflow (tracking failures are warnings unless `strict`)."""
    recorded = store.is_tracked(result.model, result.version)
    if not result.new_version and recorded and result.computed == 0:
        log.info(
            "nothing changed: model %s version %d; no MLflow run", result.model, result.version
        )
        return None
    if not result.new_version and not recorded:
        # The run that wrote this version stopped before it was recorded: record it now as that
        # run, so the version's class gets its nested run.
        result = dataclasses.replace(result, new_version=True)
    # Imported here: MLflow and matplotlib take seconds to import, which a no-op never pays.
    from ucad.gallery import gallery
    from ucad.tracking import log_result

    figures = gallery(store, load_version(store, result.model, result.version))
    run_id = log_result(
        result,
        store,
        kind,
        strict=strict,
        flow_run_id=flow_run_id,
        started=started or time.time(),
        gallery=figures,
    )
    if run_id is not None:
        store.mark_tracked(result.model, result.version)
    return run_id
