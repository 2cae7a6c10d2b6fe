"""`ucad bench`'s structure maps: which source to time, and SAM against segment-anything's own
generator on the same model and images."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything import sam_model_registry

from ucad.bench_method import fastest_rate
from ucad.config import Config
from ucad.device import PRECISIONS, resolve_device, resolve_precision
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
    # at the precision the pipeline would run SAM in (`Runtime.structure_source`)
    device = resolve_device(config.device)
    settings = config_settings(config, resolve_precision(config.precision, device))
    source = BatchedSamStructure(model, device, settings)
    return config, source, f"SAM {config.sam_model}, random weights: timing only"


def structure_comparison(rt: Runtime, images: np.ndarray) -> dict[str, Any] | None:
    """The structure source against segment-anything's own generator on the same model and
    images (`structure.*` figures), both at the run's precision (the generator runs only its
    image encoder in it); None when the run times superpixels."""
    fast = rt.structure_source
    if not isinstance(fast, BatchedSamStructure):
        return None
    settings = config_settings(rt.config, rt.precision)
    reference = SamStructure(fast.model, rt.device, settings)
    generator = fast.generator
    generator.prompts_decoded = generator.prompts_upscaled = generator.masks_resized = 0
    figures = compare_with_reference(fast, reference, images, rt.backbone.patch_size)
    figures["upscaled_share"] = generator.prompts_upscaled / generator.prompts_decoded
    # what the timed run decoded, upscaled and resized, per image (for the arithmetic floor)
    work = {
        "prompts": generator.prompts_decoded / len(images),
        "upscaled": generator.prompts_upscaled / len(images),
        "resized": generator.masks_resized / len(images),
    }
    figures["precision"] = {dtype: name for name, dtype in PRECISIONS.items()}[rt.precision]
    # ucad upscales only the masks of prompts past the IoU filter, so its time depends on the
    # weights (random ones pass almost none). Timed again with the filter off, every prompt's
    # masks are upscaled, resized and scored: an upper bound for any weights.
    every = BatchedSamStructure(fast.model, rt.device, settings, pred_iou_thresh=0.0)
    start = time.perf_counter()
    every.label_maps(images)
    figures["every_prompt_s_per_image"] = (time.perf_counter() - start) / len(images)
    figures["every_prompt_speedup"] = (
        figures["reference_s_per_image"] / figures["every_prompt_s_per_image"]
    )
    figures.update(_arithmetic_floor(fast, images[0], rt.device, rt.precision, work, figures))
    return figures


def _arithmetic_floor(
    fast: BatchedSamStructure,
    image: np.ndarray,
    device: torch.device,
    dtype: torch.dtype,
    work: dict[str, float],
    figures: dict[str, Any],
) -> dict[str, Any]:
    """ucad's SAM arithmetic against this machine's product rate: how long its products alone
    would take if they all ran at the rate of one large product, for the prompts and masks the
    timed run upscaled and resized (`work`, per image) and with every prompt upscaled. Says how
    far the measured times are from what the arithmetic needs."""
    products = fast.generator.count_products(image)
    rate = product_rate(device, dtype)
    fixed = products["encoder_macs"] + products["shared_macs"]
    tokens, upscale = products["tokens_macs_per_prompt"], products["upscale_macs_per_prompt"]
    resize = products["resize_macs_per_mask"]
    timed = fixed + work["prompts"] * tokens + work["upscaled"] * upscale + work["resized"] * resize
    every_prompt = tokens + upscale + products["masks_per_prompt"] * resize
    every = fixed + products["prompts"] * every_prompt
    floor, every_floor = timed / rate, every / rate
    return {
        "products": {**products, "every_prompt_macs_per_prompt": every_prompt},
        "product_macs_per_s": rate,
        "floor_s_per_image": floor,
        "every_prompt_floor_s_per_image": every_floor,
        "floor_speedup": figures["reference_s_per_image"] / floor,
        "every_prompt_floor_speedup": figures["reference_s_per_image"] / every_floor,
    }


def product_rate(
    device: torch.device, dtype: torch.dtype, repeats: int = 5, per_run: int = 10
) -> float:
    """Multiply-accumulates per second of one large matrix product in `dtype` on `device`, with
    every thread torch uses: (4096 x 768) by (768 x 3072), the size of a ViT-B MLP layer at SAM's
    input. The fastest of `repeats` runs of `per_run` products (so that a GPU's launch and
    synchronisation do not count), after one unmeasured run."""
    a = torch.randn(4096, 768, device=device).to(dtype)
    b = torch.randn(768, 3072, device=device).to(dtype)

    def products() -> None:
        for _ in range(per_run):
            a @ b

    products()  # unmeasured
    per_second = fastest_rate(per_run, products, device, runs=repeats)
    return per_second * a.shape[0] * a.shape[1] * b.shape[1]


def _sam_weights(config: Config) -> Path | None:
    """The SAM checkpoint the pipeline would load, if it is on disk (never downloads)."""
    if config.sam_checkpoint is not None:
        path = Path(config.sam_checkpoint).expanduser()
    else:
        path = default_cache_dir() / "sam" / SAM_CHECKPOINTS[config.sam_model].filename
    return path if path.is_file() else None
