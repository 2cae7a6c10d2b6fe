"""Stage `evaluate`: one class's test set under one model version, with task-agnostic routing.

Each test image chooses the class whose keys are nearest (routing), is scored with that class's
prompts and knowledge (scores), and the class's metrics are computed from those scores, the
anomaly maps and the test labels and masks. The evaluation is named by what its figures are
made of: the test set, the class each image chose and the score artifacts read. An earlier
class none of whose images change their choice under a new version therefore keeps its figures,
so each new version costs routing for the new class's keys (one routing artifact for the version,
one class's distances per earlier test set: ucad/stages/routing.py), not a re-evaluation of
everything. The evaluations of a version's classes share its routing: the first to need it
computes it, the others wait for it (the runtime's claim on its digest). The evaluation's name is
known once its images are routed (every score artifact's name follows from the class and the
routing that chose its images), so such an unchanged class is found with one lookup after its
routing is read; its scores are neither looked up nor read.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from ucad.config import ROUTINGS, Routing
from ucad.manifest import ModelVersion
from ucad.metrics import from_json, json_float, task_metrics
from ucad.pipeline import Evaluation, Runtime, Stage, StageRecord, cached, lookup
from ucad.scoring import anomaly_maps
from ucad.stages.features import FEATURES, features_digest, run_features
from ucad.stages.routing import ROUTING, routing_inputs, rows_of, run_routing
from ucad.stages.scores import SCORES, run_scores, scores_digest

EVALUATE = Stage(
    "evaluate", "2", ("image_size", "blur_sigma"), consumes=(FEATURES, ROUTING, SCORES)
)
ORACLE = {"routing": "oracle"}  # diagnostic routing: every image is scored with its own class


def run_evaluate(
    rt: Runtime, version: ModelVersion, j: int, routing: Routing = "agnostic"
) -> Evaluation:
    """Evaluate the test set of class j of `version` with every class of that version."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    source = version.tasks[j].data
    records: list[StageRecord] = []
    if routing == "oracle":
        n = len(source.read("test").test)  # the file list: a cached result loads no image
        selected = np.full(n, j, dtype=np.int64)
        routes, chosen_by = None, {j: ORACLE}
    else:
        routes = _Routes(rt, version, j, records)
        selected = routes.selected(len(version.tasks))
        chosen_by = {t: routes.chosen_by(t) for t in np.unique(selected).tolist()}
    names = {t: scores_digest(rt, source, version.tasks[t], by) for t, by in chosen_by.items()}
    inputs = {
        "test": source.test,
        "j": j,
        "routing": routing,
        "selected": "sha256:" + hashlib.sha256(selected.astype(np.int64).tobytes()).hexdigest(),
        "scores": [[t, names[t]] for t in sorted(names)],
    }
    found = lookup(rt, EVALUATE, source.name, inputs)
    if found.cached:  # an earlier class whose images all chose as before: nothing to score
        return Evaluation(_metrics(rt, found.digest), [*records, found])
    scored: dict[int, StageRecord] = {}
    for t, by in chosen_by.items():
        index = np.arange(len(selected)) if routes is None else routes.chose(t)
        scored[t] = run_scores(rt, source, version.tasks[t], index, by)
        records.append(scored[t])

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
    return Evaluation(_metrics(rt, record.digest), [*records, record])


def _metrics(rt: Runtime, digest: str) -> dict[str, float]:
    return from_json(rt.store.get(EVALUATE.name, digest).attrs["metrics"])


class _Routes:
    """The class each image of test set j chooses among the first classes of a version, from
    the routing artifacts of those classes' test sets; each read once."""

    def __init__(self, rt: Runtime, version: ModelVersion, j: int, records: list[StageRecord]):
        self.rt, self.j, self.records = rt, j, records
        self.sources = [task.data for task in version.tasks]
        self.features = [features_digest(rt, s) for s in self.sources]  # names only: no lookup
        self.keys = [task.keys for task in version.tasks]
        self.routed: dict[int, StageRecord] = {}  # classes routed among -> routing record
        self.chosen: dict[int, np.ndarray] = {}
        records.append(run_features(rt, self.sources[j]))

    def selected(self, count: int) -> np.ndarray:
        """The class each image of test set j selects among the first `count` classes (j <
        count), from the routing of those classes' test sets."""
        if count in self.chosen:
            return self.chosen[count]
        rt, sources, known = self.rt, self.sources, count
        while known > 0 and known not in self.routed:  # the longest routing already stored
            found = lookup(rt, ROUTING, sources[known - 1].name, self._inputs(known))
            if found.cached:
                self.routed[known] = found
                self.records.append(found)
                break
            known -= 1
        if count not in self.routed:  # built on it (or from nothing): the classes after it at once
            previous = self.routed[known].digest if known else None
            self.routed[count], made = run_routing(rt, sources[:count], self.keys[:count], previous)
            self.records.extend([*made, self.routed[count]])
        artifact = rt.store.get("routing", self.routed[count].digest)
        self.chosen[count] = artifact.array("selected")[rows_of(artifact.array("offsets"), self.j)]
        return self.chosen[count]

    def chosen_by(self, t: int) -> dict[str, str]:
        """What chose the images of test set j that class t scores: the routing among the first
        max(j, t) + 1 classes, by name (no lookup). Scores under class t are computed once, at
        the first version holding both j and t: every later class can only take images away
        from t, never add any."""
        among = self._inputs(max(self.j, t) + 1)
        return {"routing": "agnostic", "routing_among": ROUTING.digest(self.rt, among)}

    def _inputs(self, count: int) -> dict[str, Any]:
        """What names the routing among the first `count` classes (`run_routing`'s inputs)."""
        return routing_inputs(self.features[:count], self.keys[:count])

    def chose(self, t: int) -> np.ndarray:
        """The images of test set j that class t scores (`chosen_by`), in order."""
        return np.flatnonzero(self.selected(max(self.j, t) + 1) == t)
