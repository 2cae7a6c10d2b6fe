"""Stage `knowledge`: a class's prompted patch features reduced by an approximate coreset."""

from __future__ import annotations

import torch

from ucad.calibration import calibration_split
from ucad.data.source import TaskSource
from ucad.pipeline import Runtime, Stage, StageRecord, cached
from ucad.sampling import sample_knowledge
from ucad.stages.common import BATCHED_BACKBONE_FIELDS
from ucad.stages.features import extract_features
from ucad.stages.prompts import PROMPTS

KNOWLEDGE = Stage(
    "knowledge",
    "3",
    BATCHED_BACKBONE_FIELDS + ("knowledge_size", "projection_dim", "seed", "calibration_fraction"),
    consumes=(PROMPTS,),
    runs_backbone=True,
)


def run_knowledge(rt: Runtime, source: TaskSource, prompts: str) -> StageRecord:
    def compute():
        config = rt.config
        images = rt.train_images(source)
        # Held-out images are scored at calibration as new images are at inspection: against a
        # knowledge they did not help build. Otherwise their scores could run low (the coreset
        # keeps the most unusual patches, those that set an image's score, at distance 0) and
        # the threshold's false-alarm bound would not hold.
        fit, _ = calibration_split(len(images), config.calibration_fraction, config.seed)
        prompt = torch.from_numpy(rt.store.get("prompts", prompts).array("prompts"))
        prompted = extract_features(rt.backbone, images[fit], prompt, config.inference_batch_size)
        knowledge = sample_knowledge(
            prompted, config.knowledge_size, config.projection_dim, config.seed
        )
        return {"knowledge": knowledge.numpy()}, {}

    inputs = {"train": source.train, "prompts": prompts}
    return cached(rt, KNOWLEDGE, source.name, inputs, compute)
