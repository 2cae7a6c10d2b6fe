"""Stage `routing`: how far each test image of a class is from one learned class's keys."""

from __future__ import annotations

import torch

from ucad.pipeline import Runtime, Stage, StageRecord, cached
from ucad.scoring import task_distances
from ucad.stages.features import FEATURES
from ucad.stages.keys import KEYS

ROUTING = Stage("routing", "2", consumes=(FEATURES, KEYS))


def run_routing(rt: Runtime, test_task: str, features: str, keys: str) -> StageRecord:
    """Per image: the sum over its patches of the distance to the nearest key."""

    def compute():
        frozen = torch.from_numpy(rt.store.get("features", features).array("features"))
        key_vectors = torch.from_numpy(rt.store.get("keys", keys).array("keys"))
        return {"distances": task_distances(frozen, [key_vectors])[:, 0].numpy()}, {}

    return cached(rt, ROUTING, test_task, {"features": features, "keys": keys}, compute)
