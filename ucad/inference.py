"""Inspect new images with a stored model version: class, score, decision and heat map.

    >>> inspector = Inspector.load(ArtifactStore(), "line-3@2")   # or "line-3": latest version
    >>> result = inspector.predict(["part.png"])[0]               # paths, PIL images or arrays
    >>> result.task, result.score, result.threshold, result.anomalous
    >>> result.overlay().save("part.heatmap.png")

Images of any size and mode go through the one loader (`ucad.data.images`) and the model's
geometry (shorter side resized, centre crop). Each image chooses its class by its keys and is
decided against that class's threshold, calibrated when the class was learned
(`ucad.stages.calibrate`) unless the caller overrides it. Heat maps are carried back to
the image's own size; pixels the centre crop cut away have no score (NaN in `Result.map`, left
uncoloured in the overlay).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ucad.data.images import Geometry
from ucad.manifest import load_version
from ucad.model import UCAD
from ucad.predictions import ImageInput, Result, as_rgb, merge_thresholds
from ucad.store import ArtifactStore, validate_name


class Inspector:
    """A model version loaded once, with one decision threshold per class."""

    def __init__(
        self,
        model: UCAD,
        thresholds: Mapping[str, float],
        name: str | None = None,
        version: int | None = None,
    ) -> None:
        missing = [task for task in model.task_names if task not in thresholds]
        if missing:
            raise ValueError(
                f"no threshold for class(es) {', '.join(missing)}: "
                f"give one for each class the model knows ({', '.join(model.task_names)})"
            )
        self.model = model
        self.name = name  # where it was loaded from, for messages and reports
        self.version = version
        self.thresholds = {task: float(thresholds[task]) for task in model.task_names}
        self.workers = model.config.workers  # threads for decoding and writing overlays

    @classmethod
    def load(
        cls,
        store: ArtifactStore,
        ref: str,
        thresholds: Mapping[str, float] | None = None,
        device: str | None = None,
        batch_size: int | None = None,
    ) -> Inspector:
        """Load `ref` ("NAME" for the latest version, or "NAME@VERSION") from `store`.

        `thresholds` overrides the stored threshold of the classes it names; `device` and
        `batch_size` override the model config's `device` and `inference_batch_size`.
        """
        name, number = parse_model_ref(ref)
        version = load_version(store, name, number)
        stored = {task.name: task.threshold for task in version.tasks}
        merged = merge_thresholds(
            f"model {name!r} version {version.version}", stored, thresholds or {}
        )
        runtime = {"device": device, "inference_batch_size": batch_size}
        model = UCAD.from_version(
            store, version, **{k: v for k, v in runtime.items() if v is not None}
        )
        return cls(model, merged, name, version.version)

    def predict(self, images: Sequence[ImageInput]) -> list[Result]:
        """Results for all `images`, in order; see `iter_predict` for long sequences."""
        return list(self.iter_predict(images))

    def iter_predict(self, images: Iterable[ImageInput]) -> Iterator[Result]:
        """Results in input order, computed `inference_batch_size` images at a time.

        Only one batch of images and maps is held at once, so any number of paths can be
        streamed through. An unreadable image stops the iteration with a ValueError naming it.
        """
        config = self.model.config
        with ThreadPoolExecutor(max_workers=config.workers) as pool:
            numbered = enumerate(images)
            while batch := list(islice(numbered, config.inference_batch_size)):
                yield from self._score(list(pool.map(self._prepare, batch)))

    def _prepare(self, numbered: tuple[int, ImageInput]) -> tuple[str, Image.Image, np.ndarray]:
        index, source = numbered
        image = as_rgb(index, source)
        name = str(source) if isinstance(source, (str, os.PathLike)) else f"image {index}"
        return name, image, self.model.geometry.image(image)

    def _score(self, batch: list[tuple[str, Image.Image, np.ndarray]]) -> Iterator[Result]:
        prediction = self.model.predict(np.stack([crop for _, _, crop in batch]))
        scores = prediction.image_scores.tolist()
        for (name, image, _), t, score, crop_map in zip(
            batch, prediction.tasks.tolist(), scores, prediction.maps, strict=True
        ):
            task = self.model.task_names[t]
            if not math.isfinite(score):
                raise ValueError(
                    f"{name}: anomaly score {score} under class {task!r} of model "
                    f"{self.name} version {self.version}: not a number, so the class's "
                    "memory is damaged; run `ucad store verify`"
                )
            threshold = self.thresholds[task]
            full_map = image_frame(crop_map, image.size, self.model.geometry)
            yield Result(task, score, threshold, score > threshold, full_map, image)


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """Split "NAME" or "NAME@VERSION" into the name and the version (None: the latest)."""
    name, sep, version = ref.partition("@")
    validate_name(name, "model name")
    if not sep:
        return name, None
    if not version.isdecimal() or int(version) < 1:
        raise ValueError(
            f"invalid model version {version!r} in {ref!r}: use NAME or NAME@VERSION "
            "with VERSION a number from 1 (see `ucad models`)"
        )
    return name, int(version)


def image_frame(crop_map: Tensor, size: tuple[int, int], geometry: Geometry) -> np.ndarray:
    """A (crop, crop) anomaly map carried back to an image of `size` (width, height).

    Inverts the resize and centre crop: each image pixel's centre is mapped into crop
    coordinates and the map is sampled there bilinearly. Pixels whose centre falls outside the
    crop were never seen by the model: NaN. Returns float32 (height, width).
    """
    width, height = size
    resized_width, resized_height = geometry.resized_size(size)
    left, top, _, _ = geometry.crop_box(size)
    x = (torch.arange(width, dtype=torch.float32) + 0.5) * (resized_width / width) - left
    y = (torch.arange(height, dtype=torch.float32) + 0.5) * (resized_height / height) - top
    crop = geometry.crop
    # grid_sample's coordinates with align_corners=False: -1 and 1 are the crop's outer edges.
    grid_y, grid_x = torch.meshgrid(y / crop * 2 - 1, x / crop * 2 - 1, indexing="ij")
    grid = torch.stack((grid_x, grid_y), dim=-1)[None]
    source = crop_map.detach().float().cpu()[None, None]
    sampled = F.grid_sample(
        source, grid, mode="bilinear", padding_mode="border", align_corners=False
    )[0, 0]
    inside = ((y >= 0) & (y < crop))[:, None] & ((x >= 0) & (x < crop))[None, :]
    return torch.where(inside, sampled, torch.nan).numpy()
