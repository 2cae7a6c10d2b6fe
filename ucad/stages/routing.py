"""Stage `routing`: which of a model version's classes each test image of one class chooses.

An image chooses the class whose keys are nearest: the least sum over its patches of the distance
to the nearest key, ties to the earlier class. The choice among classes 1..v is the choice among
1..v-1 set against class v's distances, so routing is stored per prefix of the class order and
built from the prefix before it: a new model version adds one class's distances per test set and
reads one earlier artifact, however many classes came before.
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

    `previous` is the routing of the same features among every class of `keys` but the last
    (None for one class). Arrays: `distances` to the last class (per image, the sum over its
    patches of the distance to the nearest key), `best` the least such sum over all the classes,
    and `selected` the class (index into `keys`) that has it.
    """
    if len(keys) == 1 and previous is not None:
        raise ValueError("routing among one class is built on no previous routing")
    if len(keys) > 1 and previous is None:
        raise ValueError(
            f"routing among {len(keys)} classes is built on the routing among the first "
            f"{len(keys) - 1} (previous)"
        )

    def compute():
        frozen = torch.from_numpy(rt.store.get("features", features).array("features"))
        last = torch.from_numpy(rt.store.get("keys", keys[-1]).array("keys"))
        distances = task_distances(frozen, [last])[:, 0].numpy()
        if previous is None:
            best, selected = distances, np.zeros(len(distances), dtype=np.int64)
        else:
            before = rt.store.get("routing", previous)
            pair = np.stack([before.array("best"), distances], axis=1)
            # argmin of the pair is argmin over all classes: the first least value (a NaN first)
            later = pair.argmin(axis=1) == 1
            best = np.where(later, distances, before.array("best"))
            selected = np.where(later, len(keys) - 1, before.array("selected"))
        return {"distances": distances, "best": best, "selected": selected.astype(np.int64)}, {}

    return cached(rt, ROUTING, test_task, routing_inputs(features, keys), compute)
