"""`ucad bench`'s structure maps: which source to time, and SAM against segment-anything's own
generator on the same model and images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from segment_anything import sam_model_registry

from ucad.config import Config
from ucad.pipeline import Runtime
from ucad.sam_structure import config_settings
from ucad.structure import (
    SAM_CHECKPOINTS,
    BatchedSamStructure,
    SamStructure,
    compare_with_reference,
    default_cache_dir,
)


def structure_choice(config: Config, choice: str) -> tuple[Config, BatchedSamStructure | None, str]:
    """The structure source to time, and the line that says which one it is.

    `auto` times SAM only with its real weights on disk; `sam` times SAM with random weights when
    they are missing (speed does not depend on them, but on a CPU it takes minutes per image).
    """
    fallback = ""
    if choice == "auto":
        choice = config.structure
        if choice == "sam" and _sam_weights(config) is None:
            choice = "superpixel"
            fallback = " (SAM weights not on disk; --structure sam times SAM with random ones)"
    config = config.model_copy(update={"structure": choice})
    if choice == "superpixel":
        return config, None, f"superpixel{fallback}"
    if _sam_weights(config) is not None:
        return config, None, f"SAM {config.sam_model}"
    model = sam_model_registry[config.sam_model](checkpoint=None)
    source = BatchedSamStructure(model, _device(config), config_settings(config))
    return config, source, f"SAM {config.sam_model}, random weights: timing only"


def structure_comparison(rt: Runtime, images: np.ndarray) -> dict[str, Any] | None:
    """The structure source against segment-anything's own generator on the same model and
    images (`structure.*` figures); None when the run times superpixels."""
    fast = rt.structure_source
    if not isinstance(fast, BatchedSamStructure):
        return None
    reference = SamStructure(fast.model, _device(rt.config), config_settings(rt.config))
    return compare_with_reference(fast, reference, images, rt.backbone.patch_size)


def _sam_weights(config: Config) -> Path | None:
    """The SAM checkpoint the pipeline would load, if it is on disk (never downloads)."""
    if config.sam_checkpoint is not None:
        path = Path(config.sam_checkpoint).expanduser()
    else:
        path = default_cache_dir() / "sam" / SAM_CHECKPOINTS[config.sam_model].filename
    return path if path.is_file() else None


def _device(config: Config) -> str | None:
    return None if config.device == "auto" else config.device
