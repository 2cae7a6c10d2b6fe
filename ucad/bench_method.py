"""What the method costs at the preset's architecture, for `ucad bench`: fp32 against bf16, the
structure source against segment-anything's generator, and one paper class end to end.

Each figure is measured in the run that reports it, on the bench's generated images, with
random weights (speed does not depend on the weight values).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ucad.backbone import PromptedViT, create_backbone
from ucad.bench_meter import synchronize
from ucad.bench_passes import forward_passes, training_passes, warm_up
from ucad.config import Config
from ucad.device import cpu_has_native_bf16

PAPER_EPOCHS = 25  # METHOD: 25 epochs per class
PAPER_TRAIN_IMAGES = 16  # the class the bench learns: 16 training, 24 test images


def has_native_bf16(device: torch.device) -> bool:
    return device.type == "cuda" or cpu_has_native_bf16()


def precision_figures(
    config: Config,
    device: torch.device,
    train: np.ndarray,
    test: np.ndarray,
    prompts: Tensor,
) -> dict[str, Any]:
    """Images per second of keys (frozen passes), a training epoch (prompted forward+backward)
    and inference (a frozen and a prompted pass per image), in float32 and, where the hardware
    has native bf16, in bf16 autocast; `speedup` = bf16 / float32 images per second."""
    precisions = {"fp32": torch.float32}
    if has_native_bf16(device):
        precisions["bf16"] = torch.bfloat16
    figures: dict[str, Any] = {"native_bf16": "bf16" in precisions}
    for name, dtype in precisions.items():
        backbone = create_backbone(config, dtype).to(device)
        warm_up(backbone, config)
        figures[name] = _rates(backbone, config, device, train, test, prompts)
    if "bf16" in figures:
        figures["speedup"] = {
            k: figures["bf16"][k] / figures["fp32"][k] for k in ("keys", "epoch", "inference")
        }
    return figures


def _rates(
    backbone: PromptedViT,
    config: Config,
    device: torch.device,
    train: np.ndarray,
    test: np.ndarray,
    prompts: Tensor,
) -> dict[str, float]:
    batch = config.inference_batch_size

    def inference() -> None:
        forward_passes(backbone, test, None, batch)
        forward_passes(backbone, test, prompts, batch)

    return {
        "keys": fastest_rate(
            len(train), lambda: forward_passes(backbone, train, None, batch), device
        ),
        "epoch": fastest_rate(
            len(train), lambda: training_passes(backbone, train, prompts, config.batch_size), device
        ),
        "inference": fastest_rate(len(test), inference, device),
    }


# Timed runs of each precision figure; the fastest counts. On the 2-vCPU machine one run's bf16
# inference speedup was 1.49x in one bench and 2.71x and 2.44x in two others of the same day.
RATE_RUNS = 3


def fastest_rate(
    items: int, work: Callable[[], Any], device: torch.device, runs: int = RATE_RUNS
) -> float:
    """Items per second of `work`, from the fastest of `runs` timed runs: what the work costs,
    not how busy the machine was meanwhile."""
    seconds = []
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return items / min(seconds)


def paper_class_seconds(
    stages: dict[str, dict[str, Any]], structure_s_per_image: float | None, note: str
) -> dict[str, Any]:
    """One paper-preset class end to end (16 training and 24 test images, 25 epochs, SAM
    structure, evaluation), composed from this run's measured stage times: the structure maps at
    the measured seconds per image, the training epoch 25 times, the other stages once."""
    if structure_s_per_image is None:
        return {"seconds": None, "how": "not composed: no SAM structure figure in this run"}
    parts = {
        "structure": PAPER_TRAIN_IMAGES * structure_s_per_image,
        "keys": stages["keys"]["seconds"],
        "prompts": PAPER_EPOCHS * stages["prompts"]["seconds"],
        "knowledge": stages["knowledge"]["seconds"],
        "calibrate": stages["calibrate"]["seconds"],
        "evaluate": stages["evaluate"]["seconds"],
    }
    return {
        "seconds": sum(parts.values()),
        "parts": parts,
        "how": f"composed from this run's measured figures: {PAPER_TRAIN_IMAGES} x SAM structure "
        f"seconds per image ({note}) + keys + {PAPER_EPOCHS} x one training epoch + knowledge "
        "+ calibration + evaluation of 24 test images",
    }
