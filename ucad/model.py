"""The continual model: one frozen backbone and a key-prompt-knowledge memory per learned task."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ucad import scoring
from ucad.backbone import PromptedViT, create_backbone
from ucad.config import Config
from ucad.device import resolve_device
from ucad.sampling import sample_keys, sample_knowledge
from ucad.stages.features import extract_features
from ucad.stages.prompts import EpochCallback, train_prompts
from ucad.structure import StructureSource, make_structure_source, patch_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskMemory:
    """Everything kept of one learned task; its training images are not kept."""

    name: str
    keys: Tensor  # (key_size, D) frozen features, farthest-point sampled
    prompts: Tensor  # the backbone's prompt shape
    knowledge: Tensor  # (knowledge_size, D) prompted features, coreset sampled


@dataclass(frozen=True)
class Prediction:
    tasks: Tensor  # (N,) index of the task each image was scored with
    image_scores: Tensor  # (N,)
    patch_scores: Tensor  # (N, P)
    maps: Tensor  # (N, H, W) anomaly maps at the model's input size


def structure_source_for(config: Config, device: torch.device) -> StructureSource:
    if config.structure == "sam":
        return make_structure_source(
            "sam",
            model_type=config.sam_model,
            checkpoint=config.sam_checkpoint,
            device=device,
            points_per_side=config.sam_points_per_side,
            pred_iou_thresh=config.sam_pred_iou_thresh,
            stability_score_thresh=config.sam_stability_score_thresh,
            box_nms_thresh=config.sam_box_nms_thresh,
        )
    return make_structure_source("superpixel", n_segments=config.superpixel_segments)


class UCAD:
    """Learns tasks one after another; scores images of any learned task without its label.

    >>> model = UCAD(config)
    >>> model.learn_task("bottle", train_images)        # uint8 (N, H, W, 3)
    >>> prediction = model.predict(test_images)          # task chosen per image by its keys
    """

    def __init__(self, config: Config, backbone: PromptedViT | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.backbone = (backbone or create_backbone(config)).to(self.device)
        self.memories: list[TaskMemory] = []
        self._structure: StructureSource | None = None

    @property
    def task_names(self) -> list[str]:
        return [memory.name for memory in self.memories]

    # Learning -------------------------------------------------------------------------
    def structure_maps(self, images: np.ndarray) -> np.ndarray:
        """Structure label maps (N, H, W) of the images the backbone sees."""
        if self._structure is None:
            self._structure = structure_source_for(self.config, self.device)
        return self._structure.label_maps(images)

    def frozen_features(self, images: np.ndarray, desc: str = "frozen features") -> Tensor:
        return extract_features(
            self.backbone, images, None, self.config.inference_batch_size, desc=desc
        )

    def prompted_features(
        self, images: np.ndarray, prompts: Tensor, desc: str = "prompted features"
    ) -> Tensor:
        return extract_features(
            self.backbone, images, prompts, self.config.inference_batch_size, desc=desc
        )

    def learn_task(
        self,
        name: str,
        images: np.ndarray,
        structure_maps: np.ndarray | None = None,
        on_epoch: EpochCallback | None = None,
    ) -> TaskMemory:
        """Learn one task from its normal training images and append its memory."""
        if name in self.task_names:
            raise ValueError(f"task {name!r} is already learned by this model")
        config = self.config
        log.info("task %s: %d training images", name, len(images))
        if structure_maps is None:
            structure_maps = self.structure_maps(images)
        keys = sample_keys(self.frozen_features(images), config.key_size)
        labels = patch_labels(structure_maps, self.backbone.patch_size)
        prompts = train_prompts(self.backbone, images, labels, config, on_epoch)
        knowledge = sample_knowledge(
            self.prompted_features(images, prompts),
            config.knowledge_size,
            config.projection_dim,
            config.seed,
        )
        memory = TaskMemory(name, keys, prompts, knowledge)
        self.memories.append(memory)
        return memory

    # Inference ------------------------------------------------------------------------
    def task_distances(self, frozen: Tensor, tasks: Sequence[int] | None = None) -> Tensor:
        """(N, T) summed nearest-key distances of each image to each task (or the given ones)."""
        chosen = range(len(self.memories)) if tasks is None else tasks
        return scoring.task_distances(frozen, [self.memories[t].keys for t in chosen])

    def score_task(self, prompted: Tensor, task: int) -> tuple[Tensor, Tensor]:
        """Patch scores (N, P) and image scores (N,) of prompted features against one task."""
        knowledge = self.memories[task].knowledge
        patches = scoring.patch_scores(prompted, knowledge)
        images = scoring.image_scores(
            prompted,
            knowledge,
            patches,
            reweight=self.config.reweight,
            neighbours=self.config.reweight_neighbours,
        )
        return patches, images

    def anomaly_maps(self, patch_scores: Tensor) -> Tensor:
        return scoring.anomaly_maps(
            patch_scores, self.backbone.grid, self.config.image_size, self.config.blur_sigma
        )

    def predict(self, images: np.ndarray, task: int | None = None) -> Prediction:
        """Score images; the task is chosen per image by its keys unless `task` is given."""
        if not self.memories:
            raise ValueError("the model has learned no task yet")
        if task is None:
            tasks = self.task_distances(self.frozen_features(images)).argmin(dim=1)
        else:
            tasks = torch.full((len(images),), task, dtype=torch.long)
        patch = torch.empty(len(images), self.backbone.num_patches)
        image = torch.empty(len(images))
        for t in tasks.unique().tolist():
            index = (tasks == t).nonzero().flatten()
            prompted = self.prompted_features(images[index.numpy()], self.memories[t].prompts)
            patch[index], image[index] = self.score_task(prompted, t)
        return Prediction(tasks, image, patch, self.anomaly_maps(patch))
