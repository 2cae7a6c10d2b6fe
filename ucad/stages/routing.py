"""Stage `routing`: which class each test image of a model version's classes chooses.

An image chooses the class whose keys are nearest: the least sum over its patches of the distance
to the nearest key, ties to the earlier class. One artifact holds that choice for the test sets
of classes 1..n among classes 1..n (a version, or the prefix of one), so a new version writes one
routing however many classes came before it. It is built on the routing of a shorter prefix
1..m (m < n): each test set of classes 1..m adds the distances to classes m+1..n to its stored
least total; the test sets of classes m+1..n are routed among all n at once. A new version
therefore reads each earlier test set's features once and compares them with one class's keys.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ucad.data.source import TaskSource
from ucad.pipeline import Runtime, Stage, StageRecord, cached
from ucad.scoring import task_distances
from ucad.stages.features import FEATURES, features_digest, run_features
from ucad.stages.keys import KEYS

ROUTING = Stage("routing", "4", consumes=(FEATURES, KEYS))


def routing_inputs(features: list[str], keys: list[str]) -> dict[str, Any]:
    """What names a routing: each class's test-set features and each class's keys, in order."""
    return {"features": features, "keys": keys}


def rows_of(offsets: np.ndarray, j: int) -> slice:
    """Rows of class j's test set in a routing's `best` and `selected`."""
    return slice(int(offsets[j]), int(offsets[j + 1]))


def run_routing(
    rt: Runtime, sources: list[TaskSource], keys: list[str], previous: str | None
) -> tuple[StageRecord, list[StageRecord]]:
    """The choice of each test image of classes 1..n (`sources`, their test sets) among the
    classes whose key artifacts are `keys`, in the same order.

    `previous` is the routing of the first m < n of these classes, or None (m = 0). Arrays: per
    image, in class order, `best`, the least over the classes of the sum over its patches of the
    distance to the class's nearest key, and `selected`, the class (index into `keys`) that has
    it; `offsets` (n + 1): class j's test set is rows offsets[j]:offsets[j + 1]. They are the
    same whichever m they were built on (the artifact is named without it).

    Returns the routing's record and the records of the test sets' features, which are computed
    here where the store lacks them (a new class's test set).
    """
    if len(sources) != len(keys):
        raise ValueError(f"routing needs one test set per class: {len(sources)} for {len(keys)}")
    inputs = routing_inputs([features_digest(rt, source) for source in sources], keys)
    before, known = None, 0  # the routing built on, read once, and how many classes it has
    if previous is not None:
        before = rt.store.get("routing", previous)
        known = _classes_before(previous, before.attrs["inputs"], inputs)
    features: list[StageRecord] = []

    def compute():
        new_keys = [torch.from_numpy(rt.store.get("keys", k).array("keys")) for k in keys]
        if before is not None:
            stored = {name: before.array(name) for name in ("best", "selected", "offsets")}
        best, selected = [], []
        for j, source in enumerate(sources):
            features.append(run_features(rt, source))
            artifact = rt.store.get("features", features[-1].digest)
            frozen = torch.from_numpy(artifact.array("features"))
            first = known if j < known else 0  # the classes this test set has no totals for
            # one class at a time, as every routing computes a class's distances
            columns = [task_distances(frozen, [k])[:, 0] for k in new_keys[first:]]
            candidates, offset = torch.stack(columns, dim=1).numpy(), 0
            if j < known:  # its stored least total stands in for classes 1..m
                rows = rows_of(stored["offsets"], j)
                candidates = np.concatenate([stored["best"][rows, None], candidates], axis=1)
                offset = known - 1
            # the first least value (a NaN first), as argmin over all the classes' distances
            pick = candidates.argmin(axis=1)
            best.append(np.take_along_axis(candidates, pick[:, None], axis=1)[:, 0])
            chosen = pick + offset
            if j < known:
                chosen = np.where(pick == 0, stored["selected"][rows], chosen)
            selected.append(chosen)
        offsets = np.cumsum([0] + [len(b) for b in best])
        arrays = {
            "best": np.concatenate(best),
            "selected": np.concatenate(selected).astype(np.int64),
            "offsets": offsets.astype(np.int64),
        }
        return arrays, {"built_on": previous}

    record = cached(rt, ROUTING, sources[-1].name, inputs, compute)
    return record, features


def _classes_before(previous: str, inputs: dict[str, Any], wanted: dict[str, Any]) -> int:
    """How many classes the routing `previous` (its `inputs`) routed: fewer than `wanted`, and
    the first of them, with the same test sets (anything else would be another routing)."""
    known = len(inputs["keys"])
    same = all(inputs[name] == wanted[name][:known] for name in ("features", "keys"))
    if not same or known >= len(wanted["keys"]):
        raise ValueError(
            f"routing of {len(wanted['keys'])} classes cannot build on routing {previous}: it "
            f"routed {known} classes, which must be the first of them, with the same test sets"
        )
    return known
