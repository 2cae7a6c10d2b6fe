"""One learned class's key-prompt-knowledge memory, and scoring images against it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ucad import scoring
from ucad.backbone import PromptedViT
from ucad.config import Config
from ucad.manifest import TaskEntry
from ucad.stages.features import extract_features
from ucad.store import ArtifactStore


@dataclass(frozen=True)
class TaskMemory:
    """Everything kept of one learned class; its training images are not kept."""

    name: str
    keys: Tensor  # (key_size, D) frozen features, farthest-point sampled
    prompts: Tensor  # the backbone's prompt shape
    knowledge: Tensor  # (knowledge_size, D) prompted features, coreset sampled

    @classmethod
    def load(cls, store: ArtifactStore, entry: TaskEntry) -> TaskMemory:
        """The memory of one class of a model version, verified as it is read."""

        def array(stage: str) -> Tensor:
            return torch.from_numpy(store.get(stage, getattr(entry, stage)).array(stage))

        return cls(entry.name, array("keys"), array("prompts"), array("knowledge"))


def score_images(
    backbone: PromptedViT,
    images: np.ndarray,
    prompts: Tensor,
    knowledge: Tensor,
    config: Config,
) -> tuple[Tensor, Tensor]:
    """Patch scores (N, P) and image scores (N,), on the CPU, of images under one class.

    The nearest-neighbour search runs where the backbone runs (the GPU when there is one).
    """
    prompted = extract_features(
        backbone, images, prompts, config.inference_batch_size, on_device=True
    )
    knowledge = knowledge.to(prompted.device)
    patch = scoring.patch_scores(prompted, knowledge)
    image = scoring.image_scores(
        prompted,
        knowledge,
        patch,
        reweight=config.reweight,
        neighbours=config.reweight_neighbours,
    )
    return patch.cpu(), image.cpu()
