"""Batched feature extraction, and stage `features`: frozen features of a test set."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ucad.backbone import PromptedViT
from ucad.data.source import TaskSource
from ucad.device import autocast
from ucad.pipeline import Runtime, Stage, StageRecord, cached
from ucad.stages.common import BATCHED_BACKBONE_FIELDS


@torch.inference_mode()
def extract_features(
    backbone: PromptedViT,
    images: np.ndarray,
    prompts: Tensor | None = None,
    batch_size: int = 32,
    desc: str = "features",
    on_device: bool = False,
) -> Tensor:
    """uint8 images (N, H, W, 3) -> float32 patch features (N, P, D), on the CPU by default.

    `prompts=None` is the frozen backbone (keys, task selection); a task's prompts give the
    prompted features (knowledge, scoring). `on_device=True` keeps them on the backbone's device
    for a search that follows there (inference on a GPU).
    """
    device = backbone.mean.device
    if prompts is not None:
        prompts = prompts.to(device)
    shape = (len(images), backbone.num_patches, backbone.embed_dim)
    out = torch.empty(shape, dtype=torch.float32, device=device if on_device else "cpu")
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=None):
        batch = backbone.prepare(images[start : start + batch_size], device)
        with autocast(device, backbone.compute_dtype):
            feats = backbone.features(batch, prompts)
        out[start : start + len(batch)] = feats.float().to(out.device)
    return out


FEATURES = Stage("features", "2", BATCHED_BACKBONE_FIELDS, runs_backbone=True)


def features_digest(rt: Runtime, source: TaskSource) -> str:
    """The name of a test set's frozen features, without looking them up."""
    return FEATURES.digest(rt, _inputs(source))


def _inputs(source: TaskSource) -> dict[str, str]:
    return {"test": source.test}


def run_features(rt: Runtime, source: TaskSource) -> StageRecord:
    """Frozen features of a class's test images: computed once, read by every routing."""

    def compute():
        images = rt.test_set(source).images
        frozen = extract_features(rt.backbone, images, None, rt.config.inference_batch_size)
        return {"features": frozen.numpy()}, {}

    return cached(rt, FEATURES, source.name, _inputs(source), compute)
