"""Stage `keys`: a class's frozen patch features reduced by farthest-point sampling."""

from __future__ import annotations

from ucad.data.source import TaskSource
from ucad.pipeline import Runtime, Stage, StageRecord, cached
from ucad.sampling import sample_keys
from ucad.stages.common import BATCHED_BACKBONE_FIELDS
from ucad.stages.features import extract_features

KEYS = Stage("keys", "2", BATCHED_BACKBONE_FIELDS + ("key_size",), runs_backbone=True)


def run_keys(rt: Runtime, source: TaskSource) -> StageRecord:
    def compute():
        frozen = extract_features(
            rt.backbone, rt.train_images(source), None, rt.config.inference_batch_size
        )
        return {"keys": sample_keys(frozen, rt.config.key_size).numpy()}, {}

    return cached(rt, KEYS, source.name, {"train": source.train}, compute)
