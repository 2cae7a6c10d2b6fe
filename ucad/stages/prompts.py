"""Stage `prompts`: structure-based contrastive learning (SCL) of a class's prompts.

docs/method.md, "Prompts and the structure-based contrastive loss".

Per image, over all pairs of its patches: features f are L2-normalised prompted features,
S = f f^T / tau, M_ij = 1 where patches i and j carry the same structure label, and
loss = mean(-lambda_pos * S * M + lambda_neg * (1 - M) * exp(S)).
Patches of one structure region are pulled together, different regions pushed apart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ucad.backbone import PromptedViT
from ucad.config import Config
from ucad.data.source import TaskSource
from ucad.device import autocast
from ucad.pipeline import Runtime, Stage, StageRecord, cached
from ucad.stages.common import BACKBONE_FIELDS
from ucad.stages.structure import STRUCTURE
from ucad.structure import patch_labels

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, float], None]


def scl_loss(
    features: Tensor,
    labels: Tensor,
    temperature: float = 0.5,
    lambda_pos: float = 1.0,
    lambda_neg: float = 1.0,
) -> Tensor:
    """Structure-based contrastive loss of (B, P, D) features and (B, P) patch labels."""
    f = F.normalize(features.float(), dim=-1)
    similarity = f @ f.transpose(1, 2) / temperature
    same = (labels[:, :, None] == labels[:, None, :]).float()
    loss = -lambda_pos * similarity * same + lambda_neg * (1 - same) * similarity.exp()
    return loss.mean()


def train_prompts(
    backbone: PromptedViT,
    images: np.ndarray,
    patch_labels: np.ndarray,
    config: Config,
    on_epoch: EpochCallback | None = None,
) -> Tensor:
    """Learn one task's prompts on its normal training images; returns them on the CPU.

    The prompts after the last epoch are the task's prompts: model selection never looks at
    test data.
    """
    if len(images) != len(patch_labels):
        raise ValueError(f"{len(images)} images but {len(patch_labels)} structure maps")
    device = backbone.mean.device
    generator = torch.Generator().manual_seed(config.seed)
    prompts = backbone.init_prompts(generator).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([prompts], lr=config.lr, betas=config.betas)
    labels = torch.as_tensor(patch_labels, dtype=torch.long)
    batches = max(1, -(-len(images) // config.batch_size))
    for epoch in range(config.epochs):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in tqdm(
            range(0, len(images), config.batch_size),
            desc=f"prompts epoch {epoch + 1}/{config.epochs}",
            unit="batch",
            leave=False,
            disable=None,
        ):
            index = order[start : start + config.batch_size]
            batch = backbone.prepare(images[index.numpy()], device)
            with autocast(device, backbone.compute_dtype):
                features = backbone.features(batch, prompts)
            loss = scl_loss(
                features,
                labels[index].to(device),
                config.temperature,
                config.lambda_pos,
                config.lambda_neg,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([prompts], config.grad_clip)
            optimizer.step()
            total += loss.item()
        mean_loss = total / batches
        log.info("prompts epoch %d/%d: SCL loss %.4f", epoch + 1, config.epochs, mean_loss)
        if on_epoch is not None:
            on_epoch(epoch, mean_loss)
    return prompts.detach().cpu()


PROMPTS = Stage(
    "prompts",
    "2",
    BACKBONE_FIELDS
    + ("prompt_mode", "prompt_length", "temperature", "lambda_pos", "lambda_neg", "lr", "betas")
    + ("batch_size", "epochs", "grad_clip", "seed"),
    consumes=(STRUCTURE,),
    runs_backbone=True,
)


def run_prompts(rt: Runtime, source: TaskSource, structure: str) -> StageRecord:
    """Train a class's prompts on its training images and their structure maps."""

    def compute():
        maps = rt.store.get("structure", structure).array("label_maps")
        losses: list[float] = []
        prompts = train_prompts(
            rt.backbone,
            rt.train_images(source),
            patch_labels(maps, rt.backbone.patch_size),
            rt.config,
            on_epoch=lambda epoch, loss: losses.append(loss),
        )
        return {"prompts": prompts.numpy()}, {"epoch_losses": losses}

    inputs = {"train": source.train, "structure": structure}
    return cached(rt, PROMPTS, source.name, inputs, compute)
