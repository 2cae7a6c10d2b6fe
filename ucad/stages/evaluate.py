"""Continual evaluation whose cost grows linearly with the stream.

Once task t is learned its keys, prompts and knowledge never change. So, per test image:
- its frozen features are computed once ever (they serve task selection at every step),
- its distance to task t's keys is computed once, when task t arrives,
- its prompted features and scores under task t are computed once, the first time the image
  is routed to task t.
After learning a new task, only the new test set and the images whose selected task changed
need forward passes, instead of every earlier test set again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ucad.data.images import TestSet
from ucad.metrics import task_metrics
from ucad.model import UCAD

log = logging.getLogger(__name__)


@dataclass
class _Cached:
    """One task's test set and what has been computed for it so far."""

    name: str
    data: TestSet
    frozen: Tensor | None = None  # (N, P, D)
    distances: Tensor | None = None  # (N, tasks seen so far)
    # task -> (patch scores (N, P), image scores (N,)); NaN where not computed yet
    scores: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.data.images)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    selected: Tensor  # (N,) task chosen per image
    image_scores: Tensor  # (N,)
    maps: Tensor  # (N, H, W)
    forward_passes: int  # backbone passes this evaluation needed (frozen + prompted)


class ContinualEvaluator:
    """Evaluates every test set seen so far against the model's current memories."""

    def __init__(self, model: UCAD) -> None:
        self.model = model
        self.test_sets: list[_Cached] = []

    def add_test_set(self, name: str, test_set: _Cached) -> None:
        self.test_sets.append(_Cached(name, test_set))

    def evaluate(self, j: int, routing: str = "agnostic") -> Evaluation:
        """Metrics of test set j; `oracle` routing uses the true task (diagnostic only)."""
        test_set = self.test_sets[j]
        passes = 0
        if routing == "oracle":
            selected = torch.full((len(test_set),), j, dtype=torch.long)
        elif routing == "agnostic":
            passes += self._update_distances(test_set)
            selected = test_set.distances.argmin(dim=1)
        else:
            raise ValueError(f"routing must be 'agnostic' or 'oracle', got {routing!r}")
        passes += self._score(test_set, selected)
        patch, image = self._gather(test_set, selected)
        maps = self.model.anomaly_maps(patch)
        metrics = task_metrics(
            image.numpy(),
            test_set.data.labels,
            maps.numpy(),
            test_set.data.masks,
            selected.numpy(),
            np.full(len(test_set), j),
        )
        return Evaluation(metrics, selected, image, maps, passes)

    def _update_distances(self, test_set: _Cached) -> int:
        passes = 0
        if test_set.frozen is None:
            test_set.frozen = self.model.frozen_features(
                test_set.data.images, f"{test_set.name} frozen"
            )
            test_set.distances = torch.empty(len(test_set), 0)
            passes = len(test_set)
        known = test_set.distances.shape[1]
        new_tasks = list(range(known, len(self.model.memories)))
        if new_tasks:
            new = self.model.task_distances(test_set.frozen, new_tasks)
            test_set.distances = torch.cat([test_set.distances, new], dim=1)
        return passes

    def _score(self, test_set: _Cached, selected: Tensor) -> int:
        passes = 0
        for t in selected.unique().tolist():
            patch, image = test_set.scores.setdefault(t, self._empty_scores(len(test_set)))
            todo = ((selected == t) & image.isnan()).nonzero().flatten()
            if len(todo) == 0:
                continue
            memory = self.model.memories[t]
            prompted = self.model.prompted_features(
                test_set.data.images[todo.numpy()],
                memory.prompts,
                f"{test_set.name} as {memory.name}",
            )
            patch[todo], image[todo] = self.model.score_task(prompted, t)
            passes += len(todo)
        return passes

    def _empty_scores(self, n: int) -> tuple[Tensor, Tensor]:
        patches = self.model.backbone.num_patches
        return torch.full((n, patches), float("nan")), torch.full((n,), float("nan"))

    def _gather(self, test_set: _Cached, selected: Tensor) -> tuple[Tensor, Tensor]:
        patch, image = self._empty_scores(len(test_set))
        for t, (task_patch, task_image) in test_set.scores.items():
            rows = selected == t
            patch[rows] = task_patch[rows]
            image[rows] = task_image[rows]
        return patch, image
