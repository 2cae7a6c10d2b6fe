"""Stage `scores`: prompted patch and image scores of the test images that chose one class."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ucad.data.source import TaskSource
from ucad.manifest import TaskEntry
from ucad.memory import score_images
from ucad.pipeline import Runtime, Stage, StageRecord, cached
from ucad.stages.common import BATCHED_BACKBONE_FIELDS
from ucad.stages.knowledge import KNOWLEDGE
from ucad.stages.prompts import PROMPTS
from ucad.stages.routing import ROUTING

SCORES = Stage(
    "scores",
    "2",
    BATCHED_BACKBONE_FIELDS + ("reweight", "reweight_neighbours"),
    consumes=(PROMPTS, KNOWLEDGE, ROUTING),
    runs_backbone=True,
)


def run_scores(
    rt: Runtime,
    source: TaskSource,
    task: TaskEntry,
    index: np.ndarray,
    routing_inputs: dict[str, Any],
) -> StageRecord:
    """Scores of test images `index` of `source` under class `task`'s prompts and knowledge.

    `routing_inputs` names what chose these images (the routing artifact, or oracle routing).
    """

    def compute():
        images = rt.test_set(source).images[index]
        patch, image = score_images(
            rt.backbone,
            images,
            torch.from_numpy(rt.store.get("prompts", task.prompts).array("prompts")),
            torch.from_numpy(rt.store.get("knowledge", task.knowledge).array("knowledge")),
            rt.config,
        )
        arrays = {"index": index.astype(np.int64), "patch": patch.numpy(), "image": image.numpy()}
        return arrays, {"scored_as": task.name}

    return cached(rt, SCORES, source.name, _inputs(source, task, routing_inputs), compute)


def scores_digest(
    rt: Runtime, source: TaskSource, task: TaskEntry, routing_inputs: dict[str, Any]
) -> str:
    """The name of `run_scores`' artifact for these arguments, without looking it up: which
    images it covers follows from what chose them (`routing_inputs`)."""
    return SCORES.digest(rt, _inputs(source, task, routing_inputs))


def _inputs(source: TaskSource, task: TaskEntry, routing_inputs: dict[str, Any]) -> dict[str, Any]:
    return {
        "test": source.test,
        "prompts": task.prompts,
        "knowledge": task.knowledge,
        **routing_inputs,
    }
