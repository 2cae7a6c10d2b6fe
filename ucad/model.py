"""A learned model version in memory: a frozen backbone and a key-prompt-knowledge memory per task.

Learning happens in the cached pipeline (`ucad.continual.AddTask`); this object loads a model
version once and scores images of any of its tasks without being told the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ucad import scoring
from ucad.backbone import PromptedViT, create_backbone, input_geometry
from ucad.config import Config
from ucad.device import resolve_device, resolve_precision
from ucad.manifest import ModelVersion, load_version
from ucad.memory import TaskMemory, score_images
from ucad.stages.features import extract_features
from ucad.store import ArtifactStore


@dataclass(frozen=True)
class Prediction:
    tasks: Tensor  # (N,) index of the task each image was scored with
    image_scores: Tensor  # (N,)
    patch_scores: Tensor  # (N, P)
    maps: Tensor  # (N, H, W) anomaly maps at the model's input size


class UCAD:
    """Scores images of any learned task; the task is chosen per image by its keys.

    >>> model = UCAD.from_store(ArtifactStore(), "line-3")     # latest version
    >>> prediction = model.predict(images)                     # uint8 (N, H, W, 3)
    """

    def __init__(
        self, config: Config, memories: list[TaskMemory], backbone: PromptedViT | None = None
    ) -> None:
        if not memories:
            raise ValueError("a model needs at least one learned task")
        self.config = config
        self.memories = memories
        self.device = resolve_device(config.device)
        if backbone is None:
            backbone = create_backbone(config, resolve_precision(config.precision, self.device))
        self.backbone = backbone.to(self.device)
        self.geometry = input_geometry(config, self.backbone)

    @classmethod
    def from_store(cls, store: ArtifactStore, model: str, version: int | None = None) -> UCAD:
        return cls.from_version(store, load_version(store, model, version))

    @classmethod
    def from_version(cls, store: ArtifactStore, version: ModelVersion, **runtime: Any) -> UCAD:
        """The model a version describes; ``runtime`` overrides fields such as ``device``."""
        config = Config(**{**version.config.model_dump(), **runtime})
        return cls(config, [TaskMemory.load(store, task) for task in version.tasks])

    @property
    def task_names(self) -> list[str]:
        return [memory.name for memory in self.memories]

    def select_task(self, images: np.ndarray) -> Tensor:
        """(N,) index of the task each image's frozen features are closest to."""
        frozen = extract_features(
            self.backbone, images, None, self.config.inference_batch_size, on_device=True
        )
        keys = [memory.keys.to(frozen.device) for memory in self.memories]
        return scoring.select_task(frozen, keys).cpu()

    def predict(self, images: np.ndarray, task: int | None = None) -> Prediction:
        """Score uint8 (N, H, W, 3) images; the task is chosen per image unless given."""
        if task is None:
            tasks = self.select_task(images)
        else:
            tasks = torch.full((len(images),), task, dtype=torch.long)
        patch = torch.empty(len(images), self.backbone.num_patches)
        image = torch.empty(len(images))
        for t in tasks.unique().tolist():
            index = (tasks == t).nonzero().flatten()
            memory = self.memories[t]
            patch[index], image[index] = score_images(
                self.backbone, images[index.numpy()], memory.prompts, memory.knowledge, self.config
            )
        maps = scoring.anomaly_maps(
            patch, self.backbone.grid, self.config.image_size, self.config.blur_sigma
        )
        return Prediction(tasks, image, patch, maps)
