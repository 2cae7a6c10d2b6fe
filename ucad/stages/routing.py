"""Stage `routing`: which of a model version's classes each test image of one class chooses.

An image chooses the class whose keys are nearest: the least sum over its patches of the distance
to the nearest key, ties to the earlier class. The choice among classes 1..n is the choice among
1..m (m < n) set against the distances to classes m+1..n, so routing is stored per prefix of the
class order and built on a shorter one: a new model version adds one class's distances to each
earlier test set, reading one earlier artifact, however many classes came before; a new test set
is routed among all classes at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ucad.pipeline import Runtime, Stage, StageRecord, cached
from ucad.scoring import task_distances
from ucad.stages.features import FEATURES
from ucad.stages.keys import KEYS

ROUTING = Stage("routing", "3", consumes=(FEATURES, KEYS))


def routing_inputs(features: str, keys: list[str]) -> dict[str, Any]:
    """What names a routing: the test set's features and the classes' keys, in order."""
    return {"features": features, "keys": keys}


def run_routing(
    rt: Runtime, test_task: str, features: str, keys: list[str], previous: str | None
) -> StageRecord:
    """The choice of each image among the classes whose key artifacts are `keys`, in order.

    `previous` is the routing of the same features among the first m < len(keys) classes, or
    None (m = 0). Arrays: `best`, per image the least over the classes of the sum over its patches
    of the distance to the class's nearest key, and `selected`, the class (index into `keys`) that
    has it. Both are the same whichever m they were built on (the artifact is named without it).
    """
    before, known = None, 0  # the routing built on, read once, and how many classes it has
    if previous is not None:
        before = rt.store.get("routing", previous)
        known = _classes_before(previous, before.attrs["inputs"], features, keys)

    def compute():
        frozen = torch.from_numpy(rt.store.get("features", features).array("features"))
        # one class at a time, as every routing computes a class's distances
        new = [
            task_distances(frozen, [torch.from_numpy(rt.store.get("keys", k).array("keys"))])[:, 0]
            for k in keys[known:]
        ]
        distances = torch.stack(new, dim=1).numpy()  # classes m+1..
        if before is None:
            candidates, offset = distances, 0
        else:
            candidates = np.concatenate([before.array("best")[:, None], distances], axis=1)
            offset = known - 1
        # the first least value (a NaN first), as argmin over all the classes' distances
        pick = candidates.argmin(axis=1)
        best = np.take_along_axis(candidates, pick[:, None], axis=1)[:, 0]
        selected = pick + offset
        if before is not None:
            selected = np.where(pick == 0, before.array("selected"), selected)
        return {"best": best, "selected": selected.astype(np.int64)}, {"built_on": previous}

    return cached(rt, ROUTING, test_task, routing_inputs(features, keys), compute)


def _classes_before(previous: str, inputs: dict[str, Any], features: str, keys: list[str]) -> int:
    """How many classes the routing `previous` (its `inputs`) chose among: fewer than `keys`, and
    the first of them, for the same features (anything else would be another routing)."""
    known = len(inputs["keys"])
    if inputs["features"] != features or inputs["keys"] != keys[:known] or known >= len(keys):
        raise ValueError(
            f"routing among {len(keys)} classes cannot build on routing {previous}: it chose "
            f"among {known} classes, which must be the first of them, for the same features"
        )
    return known
