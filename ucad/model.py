"""A learned model version in memory: a frozen backbone and a key-prompt-knowledge memory per task.

Learning happens in the cached pipeline (`ucad.continual.add_task`); this object loads a model
version once and scores images of any of its tasks without being told the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ucad import scoring
from ucad.backbone import PromptedViT, create_backbone
from ucad.config import Config
from ucad.data.images import Geometry
from ucad.device import resolve_device
from ucad.stages.features import extract_features
from ucad.store import ArtifactStore


@dataclass(frozen=True)
class TaskMemory:
    """Everything kept of one learned task; its training images are not kept."""

    name: str
    keys: Tensor  # (key_size, D) frozen features, farthest-point sampled
    prompts: Tensor  # the backbone's prompt shape
    knowledge: Tensor  # (knowledge_size, D) prompted features, coreset sampled

    @classmethod
    def load(cls, store: ArtifactStore, entry: dict) -> TaskMemory:
        """The memory of one task entry of a model manifest."""

        def array(stage: str) -> Tensor:
            return torch.from_numpy(store.get(stage, entry[stage]).array(stage))

        return cls(entry["name"], array("keys"), array("prompts"), array("knowledge"))


@dataclass(frozen=True)
class Prediction:
    tasks: Tensor  # (N,) index of the task each image was scored with
    image_scores: Tensor  # (N,)
    patch_scores: Tensor  # (N, P)
    maps: Tensor  # (N, H, W) anomaly maps at the model's input size


def input_geometry(config: Config, backbone: PromptedViT) -> Geometry:
    """How images become model input: the config's resize and crop, the backbone's interpolation."""
    interpolation = backbone.interpolation
    if interpolation not in ("bicubic", "bilinear"):
        interpolation = "bicubic"
    return Geometry(config.resize_to, config.image_size, interpolation)


def score_images(
    backbone: PromptedViT, images: np.ndarray, memory: TaskMemory, config: Config
) -> tuple[Tensor, Tensor]:
    """Patch scores (N, P) and image scores (N,), on the CPU, of images under one task's memory.

    The nearest-neighbour search runs where the backbone runs (the GPU when there is one).
    """
    prompted = extract_features(
        backbone, images, memory.prompts, config.inference_batch_size, on_device=True
    )
    knowledge = memory.knowledge.to(prompted.device)
    patch = scoring.patch_scores(prompted, knowledge)
    image = scoring.image_scores(
        prompted,
        knowledge,
        patch,
        reweight=config.reweight,
        neighbours=config.reweight_neighbours,
    )
    return patch.cpu(), image.cpu()


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
            torch.manual_seed(config.seed)  # random-initialised backbones are reproducible
            backbone = create_backbone(config)
        self.backbone = backbone.to(self.device)
        self.geometry = input_geometry(config, self.backbone)

    @classmethod
    def from_store(cls, store: ArtifactStore, model: str, version: int | None = None) -> UCAD:
        return cls.from_manifest(store, store.read_model(model, version))

    @classmethod
    def from_manifest(cls, store: ArtifactStore, manifest: dict, **runtime: Any) -> UCAD:
        """The model a manifest describes; ``runtime`` overrides fields such as ``device``."""
        config = Config(**{**manifest["config"], **runtime})
        return cls(config, [TaskMemory.load(store, entry) for entry in manifest["tasks"]])

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
                self.backbone, images[index.numpy()], memory, self.config
            )
        maps = scoring.anomaly_maps(
            patch, self.backbone.grid, self.config.image_size, self.config.blur_sigma
        )
        return Prediction(tasks, image, patch, maps)
