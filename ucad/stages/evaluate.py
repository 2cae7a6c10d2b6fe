"""Stage `evaluate`: one class's test set under one model version, with task-agnostic routing.

Each test image chooses the class whose keys are nearest (routing), is scored with that class's
prompts and knowledge (scores), and the class's metrics are computed from those scores, the
anomaly maps and the test labels and masks. The evaluation is named by what its figures are
made of: the test set, the class each image chose and the score artifacts read. An earlier
class none of whose images change their choice under a new version therefore keeps its figures,
so each new version costs routing for the new class's keys (one routing artifact for the version,
one class's distances per earlier test set: ucad/stages/routing.py), not a re-evaluation of
everything. The evaluations of a version's classes share its routing: the first to need it
computes it, the others wait for it (the runtime's claim on its digest). Such an unchanged class is
not even looked up again stage by stage: given the evaluation of the version before (its row's),
it is that artifact once the routing shows every image choosing as it did then.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ucad.artifact import Artifact
from ucad.config import ROUTINGS, Routing
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
ORACLE = {"routing": "oracle"}  # diagnostic routing: every image is scored with its own class


def run_evaluate(
    rt: Runtime,
    version: ModelVersion,
    j: int,
    routing: Routing = "agnostic",
    before: str | None = None,
) -> Evaluation:
    """Evaluate the test set of class j of `version` with every class of that version.

    `before` names the evaluate artifact of class j under the version before this one, with the
    same routing (that version's row holds it), or is None. Where each image of j chooses the
    class it chose then (the new class took none of them), the scores it reads and so its
    figures are that artifact's: it is returned without looking its scores up again.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    source = version.tasks[j].data
    records: list[StageRecord] = []
    if routing == "oracle":
        n = len(source.read("test").test)  # the file list: a cached result loads no image
        selected = np.full(n, j, dtype=np.int64)
        routes = None
    else:
        routes = _Routes(rt, version, j, records)
        selected = routes.selected(len(version.tasks))
    chosen = "sha256:" + hashlib.sha256(selected.astype(np.int64).tobytes()).hexdigest()
    if before is not None:
        same = _same_evaluation(rt, before, {"test": source.test, "j": j, "routing": routing})
        if same is not None and same.attrs["inputs"]["selected"] == chosen:
            record = StageRecord(EVALUATE.name, source.name, before, cached=True, seconds=0.0)
            return Evaluation(from_json(same.attrs["metrics"]), [*records, record])
    if routes is None:
        record = run_scores(rt, source, version.tasks[j], np.arange(len(selected)), ORACLE)
        records.append(record)
        scored = {j: record}
    else:
        scored = routes.scores(selected)
    inputs = {
        "test": source.test,
        "j": j,
        "routing": routing,
        "selected": chosen,
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


def _same_evaluation(rt: Runtime, digest: str, wanted: dict[str, object]) -> Artifact | None:
    """The evaluate artifact `digest` when the store has it and it evaluated the same test set
    as class j with the same routing (`wanted`), else None (it is then evaluated in full)."""
    try:
        artifact = rt.store.get(EVALUATE.name, digest)
    except FileNotFoundError:  # moved aside or deleted since its row was written
        return None
    inputs = artifact.attrs["inputs"]
    return artifact if all(inputs.get(name) == value for name, value in wanted.items()) else None


class _Routes:
    """The class each image of test set j chooses among the first classes of a version, from
    the routing artifacts of those classes' test sets; each read once."""

    def __init__(self, rt: Runtime, version: ModelVersion, j: int, records: list[StageRecord]):
        self.rt, self.version, self.j, self.records = rt, version, j, records
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
            inputs = routing_inputs(self.features[:known], self.keys[:known])
            found = lookup(rt, ROUTING, sources[known - 1].name, inputs)
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

    def scores(self, selected: np.ndarray) -> dict[int, StageRecord]:
        """The score artifacts that cover test set j's images as `selected` routes them."""
        scored = {}
        for t in np.unique(selected).tolist():
            # Scores under class t are computed once, at the first version holding both j and
            # t: every later class can only take images away from t, never add any.
            first = max(self.j, t) + 1
            index = np.flatnonzero(self.selected(first) == t)
            chosen_by = {"routing": "agnostic", "routing_among": self.routed[first].digest}
            source = self.sources[self.j]
            record = run_scores(self.rt, source, self.version.tasks[t], index, chosen_by)
            self.records.append(record)
            scored[t] = record
        return scored
