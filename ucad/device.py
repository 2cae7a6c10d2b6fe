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
        log.info("device: %s (%s)", device, torch.cuda.get_device_name(device))
    else:
        log.info("device: cpu (%d threads)", torch.get_num_threads())
    return device


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 matmuls are fast.

    Asked of PyTorch's own CPU dispatch, not guessed from the model name: on CPUs without them
    bf16 is emulated and slower than float32.
    """
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA and on CPUs with native bf16, float32 elsewhere."""
    if name != "auto":
        return PRECISIONS[name]
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device` for the backbone's forward and backward; none for float32.

    bf16 needs no loss scaling (float32's exponent range). Distances, losses and scores are
    always computed in float32 by their callers.
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
