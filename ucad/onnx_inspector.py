"""Inspect images with an exported model (`ucad export --format onnx`) on onnxruntime.

    >>> inspector = load_onnx_inspector("line-3-v2")       # the folder `export_onnx` wrote
    >>> result = inspector.predict(["part.png"])[0]        # paths, PIL images or arrays
    >>> result.task, result.score, result.anomalous

The same surface as `ucad.inference.Inspector` for `predict_files` and `ucad predict`: `name`,
`version`, `thresholds`, `task_names`, `workers`, `predict` and `iter_predict`, yielding the same
`Result`s. Images go through the same loader and `Geometry` (resize, centre crop) as the torch
path, outside the graph; the graph does the rest (see `ucad.onnx_graph`). Heat maps are carried
back to each image's size by `frame_map`, a numpy twin of `ucad.inference.image_frame`.

It needs onnxruntime, numpy and PIL, not torch: `Result` and the image-reading helpers it shares
with the torch path live in `ucad.predictions`, which does not import torch either.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ucad.data.images import Geometry
from ucad.export import EXPORT_FILE, EXPORT_FORMAT, file_sha256
from ucad.onnx_graph import INPUT_NAME, OUTPUT_NAMES
from ucad.predictions import ImageInput, Result, as_rgb, merge_thresholds


@dataclass(frozen=True)
class OnnxPrediction:
    """The graph's outputs for N images, as numpy arrays."""

    tasks: np.ndarray  # int64 (N,)
    image_scores: np.ndarray  # float32 (N,)
    maps: np.ndarray  # float32 (N, crop, crop)
    key_distances: np.ndarray  # float32 (N, classes)


def read_export(folder: str | Path) -> dict[str, Any]:
    """The `ucad-export.json` of an export folder, checked against the graph beside it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such export folder")
    path = folder / EXPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder}: no {EXPORT_FILE}; write one with "
            f"`ucad export --model NAME --format onnx --out {folder}`"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: export format {found!r}; this ucad reads {EXPORT_FORMAT!r}")
    graph = folder / meta["graph"]
    if not graph.is_file():
        raise FileNotFoundError(f"{graph}: the graph {EXPORT_FILE} names is missing")
    if file_sha256(graph) != meta["graph_sha256"]:
        raise ValueError(f"{graph}: content differs from the sha256 in {EXPORT_FILE} (damaged?)")
    return meta


class OnnxInspector:
    """An exported model version on onnxruntime, with one decision threshold per class."""

    def __init__(
        self,
        folder: str | Path,
        thresholds: Mapping[str, float] | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        meta = read_export(self.folder)
        self.meta = meta
        self.name: str = meta["model"]
        self.version: int = meta["version"]
        self.digest: str = meta["model_digest"]
        self.task_names: list[str] = list(meta["classes"])
        where = f"model {self.name!r} version {self.version} (export {self.folder})"
        self.thresholds = merge_thresholds(where, meta["thresholds"], thresholds or {})
        self.workers: int = meta["workers"]  # threads for decoding and writing overlays
        # images decoded at once, and run at once where the graph takes any batch size
        self.batch_size: int = meta["inference_batch_size"]
        self.graph_batch: int | None = None if meta["dynamic_batch"] else 1
        pre = meta["preprocessing"]
        self.geometry = Geometry(pre["resize"], pre["crop"], pre["interpolation"])
        self.session = _session(self.folder / meta["graph"], providers, threads)

    def predict_arrays(self, images: np.ndarray) -> OnnxPrediction:
        """Run the graph on uint8 (N, crop, crop, 3) images already through `geometry`."""
        crop = self.geometry.crop
        if images.dtype != np.uint8 or images.shape[1:] != (crop, crop, 3):
            raise ValueError(
                f"expected uint8 images of shape (N, {crop}, {crop}, 3), "
                f"got {images.dtype} {images.shape}"
            )
        step = self.graph_batch or self.batch_size
        runs = [
            self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[start : start + step]})
            for start in range(0, len(images), step)
        ]
        return OnnxPrediction(*(np.concatenate(parts) for parts in zip(*runs, strict=True)))

    def predict(self, images: Sequence[ImageInput]) -> list[Result]:
        """Results for all `images`, in order; see `iter_predict` for long sequences."""
        return list(self.iter_predict(images))

    def iter_predict(self, images: Iterable[ImageInput]) -> Iterator[Result]:
        """Results in input order; `batch_size` images are decoded (in threads) at a time."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            numbered = enumerate(images)
            while batch := list(islice(numbered, self.batch_size)):
                yield from self._score(list(pool.map(self._prepare, batch)))

    def _prepare(self, numbered: tuple[int, ImageInput]) -> tuple[Image.Image, np.ndarray]:
        image = as_rgb(*numbered)
        return image, self.geometry.image(image)

    def _score(self, batch: list[tuple[Image.Image, np.ndarray]]) -> Iterator[Result]:
        prediction = self.predict_arrays(np.stack([crop for _, crop in batch]))
        for (image, _), t, score, crop_map in zip(
            batch, prediction.tasks, prediction.image_scores, prediction.maps, strict=True
        ):
            task = self.task_names[int(t)]
            threshold = self.thresholds[task]
            full_map = frame_map(crop_map, image.size, self.geometry)
            yield Result(task, float(score), threshold, float(score) > threshold, full_map, image)


def load_onnx_inspector(
    folder: str | Path, thresholds: Mapping[str, float] | None = None
) -> OnnxInspector:
    """The inspector `ucad predict --onnx DIR` uses: onnxruntime on the CPU."""
    return OnnxInspector(folder, thresholds)


def _session(path: Path, providers: Sequence[str], threads: int | None) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=list(providers))


def frame_map(crop_map: np.ndarray, size: tuple[int, int], geometry: Geometry) -> np.ndarray:
    """A (crop, crop) map carried back to an image of `size` (width, height), as
    `ucad.inference.image_frame` does: each image pixel's centre is mapped into the crop and
    sampled bilinearly (border-clamped); pixels outside the crop are NaN. float32 (H, W)."""
    width, height = size
    resized_width, resized_height = geometry.resized_size(size)
    left, top, _, _ = geometry.crop_box(size)
    x = (np.arange(width, dtype=np.float32) + 0.5) * np.float32(resized_width / width) - left
    y = (np.arange(height, dtype=np.float32) + 0.5) * np.float32(resized_height / height) - top
    x0, x1, wx = _taps(x, geometry.crop)
    y0, y1, wy = _taps(y, geometry.crop)
    source = np.asarray(crop_map, dtype=np.float32)
    upper = source[np.ix_(y0, x0)] * (1 - wx) + source[np.ix_(y0, x1)] * wx
    lower = source[np.ix_(y1, x0)] * (1 - wx) + source[np.ix_(y1, x1)] * wx
    sampled = upper * (1 - wy)[:, None] + lower * wy[:, None]
    crop = geometry.crop
    inside = ((y >= 0) & (y < crop))[:, None] & ((x >= 0) & (x < crop))[None, :]
    return np.where(inside, sampled, np.nan).astype(np.float32)


def _taps(at: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear source indices and weight for crop coordinates `at` (pixel c spans [c, c+1))."""
    position = np.clip(at - 0.5, 0, length - 1)  # pixel centres; border: clamp to the edge
    first = np.floor(position).astype(np.intp)
    return first, np.minimum(first + 1, length - 1), (position - first).astype(np.float32)
