"""Stage `evaluate`: one class's test set under one model version, with task-agnostic routing.

Each test image chooses the class whose keys are nearest (routing), is scored with that class's
prompts and knowledge (scores), and the class's metrics are computed from those scores, the
anomaly maps and the test labels and masks. The evaluation is named by what its figures are
made of: the test set, the class each image chose and the score artifacts read. An earlier
class none of whose images change their choice under a new version therefore keeps its figures,
so each new version costs routing for the new class's keys (one routing artifact for the version,
one class's distances per earlier test set: ucad/stages/routing.py), not a re-evaluation of
everything. The evaluations of a version's classes share its routing: the first to need it
computes it, the others wait for it (the runtime's claim on its digest).
"""

from __future__ import annotations

import hashlib
from functools import cache

import numpy as np
import torch

from ucad.config import ROUTINGS, Routing
from ucad.data.source import TaskSource
from ucad.manifest import ModelVersion
from ucad.metrics import from_json, json_float, task_metrics
from ucad.pipeline import Evaluation, Runtime, Stage, StageRecord, cached, lookup
from ucad.scoring import anomaly_maps
from ucad.stages.features import FEATURES, features_digest, run_features
from ucad.stages.routing import ROUTING, routing_inputs, rows_of, run_routing
from ucad.stages.scores import SCORES, run_scores

EVALUATE = Stage(
    "evaluate", "2", ("image_size", "blur_sigma"), consumes=(FEATURES, ROUTING, SCORES)
)


def run_evaluate(
    rt: Runtime, version: ModelVersion, j: int, routing: Routing = "agnostic"
) -> Evaluation:
    """Evaluate the test set of class j of `version` with every class of that version."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    source = version.tasks[j].data
    records: list[StageRecord] = []
    if routing == "oracle":
        selected, scored = _oracle(rt, version, j, source, records)
    else:
        selected, scored = _route_and_score(rt, version, j, source, records)
    inputs = {
        "test": source.test,
        "j": j,
        "routing": routing,
        "selected": "sha256:" + hashlib.sha256(selected.astype(np.int64).tobytes()).hexdigest(),
        "scores": [[t, record.digest] for t, record in sorted(scored.items())],
    }

    def compute():
        test = rt.test_set(source)
        patch = np.empty((len(test.labels), rt.backbone.num_patches), dtype=np.float32)
        image = np.empty(len(test.labels), dtype=np.float32)
        for t, record in scored.items():
            artifact = rt.store.get("scores", record.digest)
            rows = np.flatnonzero(selected == t)
            # the artifact's index is sorted and covers every image that now selects t
            take = np.searchsorted(artifact.array("index"), rows)
            patch[rows] = artifact.array("patch")[take]
            image[rows] = artifact.array("image")[take]
        maps = anomaly_maps(
            torch.from_numpy(patch), rt.backbone.grid, rt.config.image_size, rt.config.blur_sigma
        ).numpy()
        metrics = task_metrics(image, test.labels, maps, test.masks, selected, j)
        arrays = {"selected": selected.astype(np.int64), "image_scores": image}
        return arrays, {"metrics": {k: json_float(v) for k, v in metrics.items()}}

    record = cached(rt, EVALUATE, source.name, inputs, compute)
    metrics = from_json(rt.store.get("evaluate", record.digest).attrs["metrics"])
    return Evaluation(metrics, [*records, record])


def _oracle(
    rt: Runtime, version: ModelVersion, j: int, source: TaskSource, records: list[StageRecord]
) -> tuple[np.ndarray, dict[int, StageRecord]]:
    """Diagnostic routing: every image is scored with its own class."""
    n = len(source.read("test").test)  # the file list: a cached result loads no image
    record = run_scores(rt, source, version.tasks[j], np.arange(n), {"routing": "oracle"})
    records.append(record)
    return np.full(n, j, dtype=np.int64), {j: record}


def _route_and_score(
    rt: Runtime, version: ModelVersion, j: int, source: TaskSource, records: list[StageRecord]
) -> tuple[np.ndarray, dict[int, StageRecord]]:
    """The class each image of test set j selects, and the score artifacts that cover them."""
    records.append(run_features(rt, source))
    sources = [task.data for task in version.tasks]
    features = [features_digest(rt, source) for source in sources]  # names only: no lookup
    keys = [task.keys for task in version.tasks]
    routed: dict[int, StageRecord] = {}  # classes routed among -> routing record

    @cache
    def route(count: int) -> np.ndarray:
        """The class each image of test set j selects among the first `count` classes (j <
        count), from the routing of those classes' test sets (read once)."""
        known = count
        while known > 0 and known not in routed:  # the longest routing already in the store
            inputs = routing_inputs(features[:known], keys[:known])
            found = lookup(rt, ROUTING, sources[known - 1].name, inputs)
            if found.cached:
                routed[known] = found
                records.append(found)
                break
            known -= 1
        if count not in routed:  # built on it (or from nothing): the classes after it at once
            previous = routed[known].digest if known else None
            routed[count], made = run_routing(rt, sources[:count], keys[:count], previous)
            records.extend([*made, routed[count]])
        artifact = rt.store.get("routing", routed[count].digest)
        return artifact.array("selected")[rows_of(artifact.array("offsets"), j)]

    selected = route(len(keys))
    scored = {}
    for t in np.unique(selected).tolist():
        # Scores under class t are computed once, at the first version holding both j and t:
        # every later class can only take images away from t, never add any.
        first = max(j, t) + 1
        index = np.flatnonzero(route(first) == t)
        chosen_by = {"routing": "agnostic", "routing_among": routed[first].digest}
        record = run_scores(rt, source, version.tasks[t], index, chosen_by)
        records.append(record)
        scored[t] = record
    return selected, scored
