"""The SAM structure sources: `BatchedSamStructure` (`sam`, the method's source) and
`SamStructure` (`sam_reference`, segment-anything's own generator, kept to check it against;
see `ucad.structure.compare_with_reference`).

Both take their mask settings as one `SamSettings` (`ucad.sam_masks`), and their weights from
`ucad.sam_checkpoints` when built with `from_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam
from tqdm import tqdm

from ucad.label_maps import StructureSource, check_image, paint_masks
from ucad.sam_checkpoints import load_sam, resolve_sam_checkpoint
from ucad.sam_masks import SamMaskGenerator, SamSettings, autocast_to, sam_device

if TYPE_CHECKING:
    from ucad.config import Config

_Source = TypeVar("_Source", bound="_SamSource")


def config_settings(config: Config, precision: torch.dtype = torch.float32) -> SamSettings:
    """A config's SAM settings (its `sam_*` fields), run under autocast to `precision` unless
    that is float32."""
    return SamSettings(
        points_per_side=config.sam_points_per_side,
        pred_iou_thresh=config.sam_pred_iou_thresh,
        stability_score_thresh=config.sam_stability_score_thresh,
        box_nms_thresh=config.sam_box_nms_thresh,
        autocast_dtype=None if precision == torch.float32 else precision,
    )


class _SamSource(StructureSource):
    """What both SAM sources share: their settings, and building from a checkpoint name or file.

    `fields`: any of `SamSettings`' fields by name, replacing those of `settings` (callers that
    set a few, like `ucad.bench`, pass them so).
    """

    def __init__(
        self,
        model: Sam,
        device: torch.device | str | None = None,
        settings: SamSettings | None = None,
        **fields: Any,
    ) -> None:
        self.settings = SamSettings.of(settings, **fields)
        self.model = self._start(model, sam_device(device))

    def _start(self, model: Sam, device: torch.device) -> Sam:
        """Set up the mask generator for `model` on `device`; returns the model it runs."""
        raise NotImplementedError

    @classmethod
    def from_checkpoint(
        cls: type[_Source],
        model_type: str = "vit_b",
        checkpoint: str | Path | None = None,
        cache_dir: Path | None = None,
        **params: Any,
    ) -> _Source:
        """SAM `model_type` with its weights from `checkpoint`, or the verified download cache;
        `params` go to the constructor (device, settings or settings' fields)."""
        path = resolve_sam_checkpoint(model_type, checkpoint, cache_dir)
        return cls(load_sam(model_type, path), **params)


class _AutocastEncoderPredictor(SamPredictor):
    """A SamPredictor whose image encoder runs under autocast; features come back float32."""

    def __init__(self, model: Sam, dtype: torch.dtype) -> None:
        super().__init__(model)
        self.dtype = dtype

    def set_torch_image(
        self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]
    ) -> None:
        with autocast_to(self.device, self.dtype):
            super().set_torch_image(transformed_image, original_image_size)
        self.features = self.features.float()


class SamStructure(_SamSource):
    """Segment Anything's automatic mask generator, its masks painted by `paint_masks`.

    The reference for `BatchedSamStructure`: one image at a time, as segment-anything runs it.
    `settings.autocast_dtype` applies to the image encoder only: the generator's post-processing
    cannot take bfloat16 tensors (`MaskData.to_numpy`).
    """

    name = "sam_reference"

    def _start(self, model: Sam, device: torch.device) -> Sam:
        model = model.to(device).eval()
        # SamSettings' fields but the autocast are the generator's own parameters, by name.
        parameters = dataclasses.asdict(self.settings)
        autocast_dtype = parameters.pop("autocast_dtype")
        self.generator = SamAutomaticMaskGenerator(model, **parameters)
        if autocast_dtype is not None:
            self.generator.predictor = _AutocastEncoderPredictor(model, autocast_dtype)
        # The generator keeps the current image's embedding between calls: one image at a time.
        self._lock = threading.Lock()
        return model

    def label_map(self, image: np.ndarray) -> np.ndarray:
        check_image(image)
        with self._lock:
            masks = [mask["segmentation"] for mask in self.generator.generate(image)]
        return paint_masks(masks, image.shape[:2])


class BatchedSamStructure(_SamSource):
    """SAM's automatic masks from `SamMaskGenerator`: images batched, maps at the image's size.

    Paints the same masks in the same order as `SamStructure` (see `ucad.sam_masks` for the
    differences in how they are computed). `batch_size` images go through the encoder at once on
    a GPU (one at a time on a CPU: `ucad.sam_masks.CPU_IMAGES_PER_PASS`).
    """

    name = "sam"

    def __init__(self, *args: Any, batch_size: int = 4, **kwargs: Any) -> None:
        """`_SamSource`'s arguments, and `batch_size`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        super().__init__(*args, **kwargs)

    def _start(self, model: Sam, device: torch.device) -> Sam:
        self.generator = SamMaskGenerator(model, self.settings, device)
        return self.generator.model

    def label_map(self, image: np.ndarray) -> np.ndarray:
        return self.label_maps(image[None])[0]

    def label_maps(self, images: np.ndarray) -> np.ndarray:
        if images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, 3), got shape {images.shape}")
        for image in images[:1]:
            check_image(image)  # one array: one dtype and shape for all
        maps = np.empty(images.shape[:3], dtype=np.int32)
        batches = range(0, len(images), self.batch_size)
        for start in tqdm(batches, desc="structure maps", disable=None):
            batch = images[start : start + self.batch_size]
            for i, masks in enumerate(self.generator.generate(batch, len(batch))):
                maps[start + i] = paint_masks(list(masks.cpu().numpy()), images.shape[1:3])
        return maps
