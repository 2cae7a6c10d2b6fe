"""The bare backbone passes `ucad bench` measures stages against (their floors)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ucad.backbone import PromptedViT
from ucad.config import Config
from ucad.device import autocast


@torch.inference_mode()
def forward_passes(
    backbone: PromptedViT, images: np.ndarray, prompts: Tensor | None, batch_size: int
) -> None:
    """Frozen (prompts None) or prompted passes over `images`, outputs discarded."""
    device = backbone.mean.device
    prompts = None if prompts is None else prompts.to(device)
    for start in range(0, len(images), batch_size):
        batch = backbone.prepare(images[start : start + batch_size], device)
        with autocast(device, backbone.compute_dtype):
            backbone.features(batch, prompts)


def training_passes(
    backbone: PromptedViT, images: np.ndarray, prompts: Tensor, batch_size: int
) -> None:
    """Prompted forward and backward (to the prompts) over `images`: one epoch's floor."""
    device = backbone.mean.device
    prompts = prompts.detach().to(device).clone().requires_grad_(True)
    for start in range(0, len(images), batch_size):
        batch = backbone.prepare(images[start : start + batch_size], device)
        with autocast(device, backbone.compute_dtype):
            features = backbone.features(batch, prompts)
        features.float().sum().backward()


def warm_up(backbone: PromptedViT, config: Config) -> None:
    """Run one batch of each kind, at the run's batch sizes, before anything is measured.

    No measured block then pays one-time set-up: kernel selection, the first allocation of each
    buffer size (a long-running worker pays these once, not per stage).
    """
    generator = torch.Generator().manual_seed(config.seed)
    shape = (config.inference_batch_size, config.image_size, config.image_size, 3)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).numpy()
    prompts = backbone.init_prompts(generator)
    for prompt in (None, prompts):
        forward_passes(backbone, images, prompt, config.inference_batch_size)
    training_passes(backbone, images[: config.batch_size], prompts, config.batch_size)
