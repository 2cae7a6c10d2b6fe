"""Where the arithmetic runs: the GPU when there is one, the CPU otherwise, with no code change."""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when available; an explicit CUDA request without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but no CUDA GPU is available")
    if device.type == "cuda":
        log.info("device: %s (%s), bf16 autocast", device, torch.cuda.get_device_name(device))
    else:
        log.info("device: cpu (%d threads), float32", torch.get_num_threads())
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (safe for ViT forward/backward: no loss scaling needed); none on CPU.

    Distances, losses and scores are always computed in float32 by their callers.
    """
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
