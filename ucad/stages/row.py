"""Stage `row`: one model version's row of the results matrix, the figures of every class.

`ucad add-task` reports the whole results matrix, so each step needs the rows of every earlier
version again. A row is named by what its figures are made of, known before any image is routed:
each class's test set, keys, prompts and knowledge in the version's order, the routing mode, and
the config fields and code versions of evaluation and every stage it reads. Step t therefore finds
rows 1..t-1 with one lookup each; only the new version's classes are evaluated (ucad/stages/
evaluate.py), so evaluation costs O(t) per step, not O(t^2).

A row is written only when every class of its version was evaluated: a class whose test images
are gone leaves its entry empty and the row unwritten, so a later run with the images fills it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ucad.config import Routing
from ucad.manifest import ModelVersion
from ucad.metrics import from_json
from ucad.pipeline import Runtime, Stage, StageRecord, cached, lookup
from ucad.stages.evaluate import EVALUATE

ROW = Stage("row", "1", consumes=(EVALUATE,))


@dataclass(frozen=True)
class Row:
    """Row v-1 of the results matrix: class j -> its metrics under version v (a class that could
    not be evaluated is absent), and the stages that made or found them."""

    metrics: dict[int, dict[str, float]]
    records: list[StageRecord] = field(default_factory=list)


def row_inputs(version: ModelVersion, routing: Routing) -> dict[str, Any]:
    """What the row's figures are made of: per class, in order, what evaluation reads of it."""
    tasks = [
        {"test": t.data.test, "keys": t.keys, "prompts": t.prompts, "knowledge": t.knowledge}
        for t in version.tasks
    ]
    return {"tasks": tasks, "routing": routing}


def find_row(rt: Runtime, version: ModelVersion, routing: Routing) -> Row | None:
    """The version's row when the store has it (one lookup), else None. Computes nothing."""
    record = lookup(rt, ROW, version.tasks[-1].name, row_inputs(version, routing))
    if not record.cached:
        return None
    stored = rt.store.get(ROW.name, record.digest).attrs["metrics"]
    return Row({j: from_json(metrics) for j, metrics in enumerate(stored)}, [record])


def run_row(
    rt: Runtime, version: ModelVersion, routing: Routing, evaluations: list[str]
) -> StageRecord:
    """Write the row of `version` from its classes' evaluate artifacts (digests, in class order).

    `evaluations` are what `run_evaluate` returned for each class of this version with this
    routing: the row's digest names their inputs, not them, so the row is found next time
    without routing an image.
    """
    if len(evaluations) != len(version.tasks):
        raise ValueError(
            f"a row of {version.ref} needs an evaluation per class ({len(version.tasks)}), "
            f"got {len(evaluations)}"
        )

    def compute():
        metrics = [rt.store.get(EVALUATE.name, d).attrs["metrics"] for d in evaluations]
        return {}, {"metrics": metrics, "evaluations": evaluations}

    inputs = row_inputs(version, routing)
    return cached(rt, ROW, version.tasks[-1].name, inputs, compute)
