"""Stage `structure`: region label maps of a class's training images (SAM, or superpixels)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ucad.config import Config
from ucad.data.source import TaskSource
from ucad.pipeline import Runtime, Stage, StageRecord, cached, chunk_bounds

SAM_FIELDS = (
    "sam_model",
    "sam_points_per_side",
    "sam_pred_iou_thresh",
    "sam_stability_score_thresh",
    "sam_box_nms_thresh",
)


def structure_fields(config: Config) -> tuple[str, ...]:
    # the backbone name fixes the resize interpolation of the images the source sees
    common = ("backbone", "image_size", "resize", "structure")
    if config.structure == "superpixel":
        return common + ("superpixel_segments",)
    return common + SAM_FIELDS  # the checkpoint enters by content: Runtime.structure_identity


STRUCTURE = Stage("structure", "2", structure_fields, runs_structure_model=True)


def structure_maps(rt: Runtime, source: TaskSource, start: int, stop: int) -> np.ndarray:
    """Structure maps of a class's training images start..stop-1: the unit of per-image work."""
    return rt.structure_source.label_maps(rt.train_images(source)[start:stop])


# Computes `structure_maps` of each (start, stop) chunk, in order. The Prefect flow passes one
# that spreads the chunks over its task runner (threads, or a Dask cluster).
MapChunks = Callable[[Runtime, TaskSource, list[tuple[int, int]]], list[np.ndarray]]


def map_in_process(
    rt: Runtime, source: TaskSource, chunks: list[tuple[int, int]]
) -> list[np.ndarray]:
    return [structure_maps(rt, source, start, stop) for start, stop in chunks]


def run_structure(
    rt: Runtime, source: TaskSource, map_chunks: MapChunks = map_in_process
) -> StageRecord:
    def compute():
        chunks = chunk_bounds(len(rt.train_images(source)), rt.config.max_workers)
        maps = np.concatenate(map_chunks(rt, source, chunks))
        return {"label_maps": maps.astype(np.int32)}, {"source": rt.config.structure}

    return cached(rt, STRUCTURE, source.name, {"train": source.train}, compute)
