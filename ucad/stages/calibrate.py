"""Stage `calibrate`: a class's decision threshold from its held-out normal training images."""

from __future__ import annotations

import numpy as np
import torch

from ucad.calibration import calibration_split, conformal_threshold
from ucad.data.source import TaskSource
from ucad.memory import score_images
from ucad.pipeline import Runtime, Stage, StageRecord, cached
from ucad.stages.common import BATCHED_BACKBONE_FIELDS
from ucad.stages.knowledge import KNOWLEDGE
from ucad.stages.prompts import PROMPTS

CALIBRATE = Stage(
    "calibrate",
    "2",
    BATCHED_BACKBONE_FIELDS
    + ("reweight", "reweight_neighbours", "seed", "calibration_fraction", "threshold_quantile"),
    consumes=(PROMPTS, KNOWLEDGE),
    runs_backbone=True,
)


def run_calibrate(rt: Runtime, source: TaskSource, prompts: str, knowledge: str) -> StageRecord:
    """Image scores of the class's held-out normal training images, and its threshold.

    Keys and prompts were learned from all training images, held-out ones included: keys only
    route images, and prompts are fit to structure maps without looking at any distance, so
    neither makes a held-out image look more normal to the knowledge; and their artifacts stay
    shared by every split.
    """

    def compute():
        config = rt.config
        images = rt.train_images(source)
        _, held = calibration_split(len(images), config.calibration_fraction, config.seed)
        _, scores = score_images(
            rt.backbone,
            images[held],
            torch.from_numpy(rt.store.get("prompts", prompts).array("prompts")),
            torch.from_numpy(rt.store.get("knowledge", knowledge).array("knowledge")),
            config,
        )
        threshold = conformal_threshold(scores.numpy(), config.threshold_quantile)
        arrays = {"index": held.astype(np.int64), "scores": scores.numpy()}
        return arrays, {"threshold": threshold}

    inputs = {"train": source.train, "prompts": prompts, "knowledge": knowledge}
    return cached(rt, CALIBRATE, source.name, inputs, compute)
