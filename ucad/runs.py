"""What every run does once its stages are done, from the command line and the flows alike:
print or log its tables, and record it in MLflow with a gallery of example verdicts.

A request that changed nothing (no stage computed, no version written) and whose version was
already recorded is not logged again: it costs no backbone load, no gallery, no MLflow run.
A re-run that completes a run killed after writing its version, but before recording it, is
logged as the run it completes (the class it learned, its nested run).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

from ucad.config import PRESETS, Config, load_config, result_fields
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


# Fields that runs compared side by side most often differ in: named first, where a UI that cuts
# long names off still shows them.
FIRST_FIELDS = ("seed", "backbone", "pretrained", "weights_file", "structure", "epochs")


def config_label(config: Config, limit: int = 6) -> str:
    """A config in a few words: the nearest preset, then up to `limit` fields that differ from
    it (`smoke seed=1 epochs=1`), FIRST_FIELDS first. Fields that only change speed (device,
    workers, ...) are left out: they change no figure."""
    ours = result_fields(config)
    order = [*FIRST_FIELDS, *(name for name in ours if name not in FIRST_FIELDS)]

    def differing(preset: str) -> list[str]:
        theirs = result_fields(load_config(preset))
        return [name for name in order if name in ours and ours[name] != theirs.get(name)]

    preset = min(PRESETS, key=lambda name: len(differing(name)))  # a tie: the first, paper
    changed = differing(preset)
    parts = [preset, *(f"{name}={_short(ours[name])}" for name in changed[:limit])]
    if len(changed) > limit:
        parts.append(f"+{len(changed) - limit} more")
    return " ".join(parts)


def _short(value: Any, width: int = 24) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"
