"""The cached pipeline: every stage output is a versioned artifact named by its digest.

A digest covers the stage name, its code version, the config fields the stage reads and the
fingerprints of its inputs (dataset files by content, upstream digests). Same inputs, same
digest, nothing recomputed; adding a class computes only that class's stages and the evaluations
of the new model version.

Stages of one class:   structure -> prompts -> knowledge -> calibrate      keys
    knowledge is built from the training images minus a seeded held-out share; calibrate scores
    those held-out normal images with the class's memory and keeps their threshold
Evaluation of test set j by model version v (tasks 0..v):
    features(j)  frozen features of j's test images, computed once ever
    routing(j,t) summed nearest-key distances of j's images to task t, once per pair
    scores(j,t)  prompted scores of the images of j that choose task t; computed once, at the
                 version where both j and t exist (later tasks only take images away from t)
    evaluate     routing + scores -> maps and metrics of j under version v

Each `run_*` function is one stage: plain arguments and digests in, a StageRecord out. The
Prefect flows call them one per task; the `ucad` command calls them directly.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ucad.backbone import PromptedViT, create_backbone
from ucad.config import Config
from ucad.data.datasets import TaskData, read_task
from ucad.data.images import Geometry, TestSet, load_images, load_test_set
from ucad.device import resolve_device
from ucad.metrics import json_float, task_metrics
from ucad.model import TaskMemory, input_geometry, score_images
from ucad.sampling import sample_keys, sample_knowledge
from ucad.scoring import anomaly_maps, task_distances
from ucad.stages.features import extract_features
from ucad.stages.prompts import train_prompts
from ucad.store import ArtifactStore, digest, fingerprint_files
from ucad.structure import StructureSource, make_structure_source, patch_labels

log = logging.getLogger(__name__)

# Bump a stage's version when its code changes what it computes: its artifacts are then redone.
CODE_VERSIONS = {
    "structure": "1",
    "keys": "1",
    "prompts": "1",
    "knowledge": "2",  # 2: built without the images held out for calibration
    "calibrate": "1",
    "features": "1",
    "routing": "1",
    "scores": "1",
    "evaluate": "1",
}

BACKBONE_FIELDS = (
    "backbone",
    "pretrained",
    "weights_file",
    "backbone_args",
    "feature_layer",
    "image_size",
    "resize",
)
PROMPT_FIELDS = ("prompt_mode", "prompt_length")
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "keys": BACKBONE_FIELDS + ("key_size",),
    "prompts": BACKBONE_FIELDS
    + PROMPT_FIELDS
    + ("temperature", "lambda_pos", "lambda_neg", "lr", "betas", "batch_size", "epochs")
    + ("grad_clip", "seed"),
    "knowledge": BACKBONE_FIELDS
    + PROMPT_FIELDS
    + ("knowledge_size", "projection_dim", "seed", "calibration_fraction"),
    "calibrate": BACKBONE_FIELDS
    + PROMPT_FIELDS
    + ("reweight", "reweight_neighbours", "seed", "calibration_fraction", "threshold_quantile"),
    "features": BACKBONE_FIELDS,
    "routing": (),
    "scores": BACKBONE_FIELDS + PROMPT_FIELDS + ("reweight", "reweight_neighbours"),
    "evaluate": ("image_size", "blur_sigma"),
}
SAM_FIELDS = (
    "sam_model",
    "sam_checkpoint",
    "sam_points_per_side",
    "sam_pred_iou_thresh",
    "sam_stability_score_thresh",
    "sam_box_nms_thresh",
)


def stage_fields(stage: str, config: Config) -> dict[str, Any]:
    """The config fields one stage reads: exactly what its digest depends on."""
    if stage == "structure":
        # the backbone name fixes the resize interpolation of the images SAM sees
        names = ("backbone", "image_size", "resize", "structure")
        names += SAM_FIELDS if config.structure == "sam" else ("superpixel_segments",)
        return config.digest_fields(*names)
    return config.digest_fields(*STAGE_FIELDS[stage])


@dataclass(frozen=True)
class StageRecord:
    """What one stage did in this run: `cached` means its artifact existed and nothing ran."""

    stage: str
    task: str
    digest: str
    cached: bool
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class DataUnavailableError(FileNotFoundError):
    """A class's recorded data cannot be read any more, or its files have changed."""


def _test_files(data: TaskData) -> list[Path]:
    return [s.image for s in data.test] + [s.mask for s in data.test if s.mask]


@dataclass(frozen=True)
class TaskSource:
    """Where one class's data lives, and what it is by content."""

    name: str
    root: str
    format: str
    train: str  # fingerprint of the training images
    test: str  # fingerprint of the test images and masks

    @classmethod
    def from_data(cls, root: str, data_format: str, data: TaskData) -> TaskSource:
        return cls(
            name=data.name,
            root=os.path.abspath(root),  # flow runs and commands may start in other folders
            format=data_format,
            train=fingerprint_files(data.train, root),
            test=fingerprint_files(_test_files(data), root),
        )

    def read(self, split: str) -> TaskData:
        """The class's data, verified by content: its `split` files must be those recorded.

        Earlier classes' data may be gone (or replaced) by the time a later class is learned;
        computing on other files under the recorded fingerprint would corrupt the store.
        """
        try:
            data = read_task(self.root, self.name, self.format)
        except (OSError, ValueError) as err:
            raise DataUnavailableError(
                f"class {self.name!r}: its data cannot be read: {err}"
            ) from err
        files = data.train if split == "train" else _test_files(data)
        if fingerprint_files(files, self.root) != getattr(self, split):
            raise DataUnavailableError(
                f"class {self.name!r}: the {split} files under {self.root} have changed since "
                "the class was learned"
            )
        return data


def structure_source_for(config: Config, device: torch.device) -> StructureSource:
    if config.structure == "sam":
        return make_structure_source(
            "sam",
            model_type=config.sam_model,
            checkpoint=config.sam_checkpoint,
            device=device,
            points_per_side=config.sam_points_per_side,
            pred_iou_thresh=config.sam_pred_iou_thresh,
            stability_score_thresh=config.sam_stability_score_thresh,
            box_nms_thresh=config.sam_box_nms_thresh,
        )
    return make_structure_source("superpixel", n_segments=config.superpixel_segments)


class Runtime:
    """Per-process state shared by the stages: config, store, and the models they load lazily."""

    def __init__(self, config: Config, store: ArtifactStore) -> None:
        self.config = config
        self.store = store
        self._train: dict[str, np.ndarray] = {}
        self._test: dict[str, TestSet] = {}

    @cached_property
    def device(self) -> torch.device:
        return resolve_device(self.config.device)

    @cached_property
    def backbone(self) -> PromptedViT:
        torch.manual_seed(self.config.seed)  # random-initialised backbones are reproducible
        return create_backbone(self.config).to(self.device)

    @cached_property
    def structure_source(self) -> StructureSource:
        return structure_source_for(self.config, self.device)

    @cached_property
    def geometry(self) -> Geometry:
        return input_geometry(self.config, self.backbone)

    def train_images(self, source: TaskSource) -> np.ndarray:
        if source.train not in self._train:
            paths = source.read("train").train
            self._train[source.train] = load_images(paths, self.geometry, self.config.workers)
        return self._train[source.train]

    def test_set(self, source: TaskSource) -> TestSet:
        if source.test not in self._test:
            samples = source.read("test").test
            self._test[source.test] = load_test_set(samples, self.geometry, self.config.workers)
        return self._test[source.test]


Compute = Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]]


def _lookup(
    rt: Runtime, stage: str, task: str, inputs: dict[str, Any]
) -> tuple[str, StageRecord | None]:
    """The stage's digest, and its cached record when the store already has the artifact."""
    key = digest(stage, CODE_VERSIONS[stage], stage_fields(stage, rt.config), inputs)
    if not rt.store.has(stage, key):
        return key, None
    log.info("%s/%s: cached (%s)", stage, task, key[:12])
    return key, StageRecord(stage, task, key, True, 0.0)


def _cached(
    rt: Runtime, stage: str, task: str, inputs: dict[str, Any], compute: Compute
) -> StageRecord:
    """Look the stage's digest up in the store; compute and publish it only when absent."""
    key, cached = _lookup(rt, stage, task, inputs)
    if cached is not None:
        return cached
    fields = stage_fields(stage, rt.config)
    log.info("%s/%s: computing", stage, task)
    started = time.perf_counter()
    arrays, attrs = compute()
    provenance = {
        "task": task,
        "config": fields,
        "inputs": inputs,
        "code_version": CODE_VERSIONS[stage],
    }
    rt.store.put(stage, key, arrays, {**provenance, **attrs})
    seconds = time.perf_counter() - started
    log.info("%s/%s: done in %.1f s (%s)", stage, task, seconds, key[:12])
    return StageRecord(stage, task, key, False, seconds)


# Stages of one class ---------------------------------------------------------------------------


def structure_maps(rt: Runtime, source: TaskSource, start: int, stop: int) -> np.ndarray:
    """Structure maps of a class's training images start..stop-1: the unit of per-image work."""
    return rt.structure_source.label_maps(rt.train_images(source)[start:stop])


def map_in_process(
    rt: Runtime, source: TaskSource, chunks: list[tuple[int, int]]
) -> list[np.ndarray]:
    return [structure_maps(rt, source, start, stop) for start, stop in chunks]


# Computes `structure_maps` of each (start, stop) chunk, in order. The Prefect flow passes one
# that spreads the chunks over its task runner (threads, or a Dask cluster).
MapChunks = Callable[[Runtime, TaskSource, list[tuple[int, int]]], list[np.ndarray]]


def chunk_bounds(count: int, chunks: int) -> list[tuple[int, int]]:
    """(start, stop) of at most `chunks` contiguous, near-equal, non-empty parts of range(count)."""
    parts = max(1, min(chunks, count))
    edges = [count * i // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def run_structure(
    rt: Runtime, source: TaskSource, map_chunks: MapChunks = map_in_process
) -> StageRecord:
    def compute():
        chunks = chunk_bounds(len(rt.train_images(source)), rt.config.max_workers)
        maps = np.concatenate(map_chunks(rt, source, chunks))
        return {"label_maps": maps.astype(np.int32)}, {"source": rt.config.structure}

    return _cached(rt, "structure", source.name, {"train": source.train}, compute)


def run_keys(rt: Runtime, source: TaskSource) -> StageRecord:
    def compute():
        frozen = extract_features(
            rt.backbone, rt.train_images(source), None, rt.config.inference_batch_size
        )
        return {"keys": sample_keys(frozen, rt.config.key_size).numpy()}, {}

    return _cached(rt, "keys", source.name, {"train": source.train}, compute)


def run_prompts(rt: Runtime, source: TaskSource, structure: str) -> StageRecord:
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
    return _cached(rt, "prompts", source.name, inputs, compute)


def calibration_split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices of the training images that build the knowledge, and of those held out.

    ceil(fraction * count) images, at least 1 and at most count - 1, are held out by a seeded
    permutation: the same files, config and seed always give the same split.
    """
    if count < 2:
        raise ValueError(
            f"{count} training image(s): at least 2 are needed, one of them held out "
            "to calibrate the class's threshold"
        )
    held = min(count - 1, max(1, math.ceil(fraction * count)))
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[held:]), np.sort(order[:held])


def conformal_threshold(scores: np.ndarray, quantile: float) -> float:
    """The ceil((m + 1) * quantile)-th smallest of m held-out normal scores, at most the largest.

    Split conformal: a new normal image exchangeable with the m held-out ones scores above this
    threshold with probability at most 1 - quantile, as long as that rank is <= m. With fewer
    images (m < 99 for 0.99) the rank is capped at m: the threshold is the largest held-out
    score, and a new normal image exceeds it with probability about 1 / (m + 1).
    """
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    # 1e-9: float products like 100 * 0.07 = 7.000000000000001 must not round up a whole rank
    rank = math.ceil((len(ordered) + 1) * quantile - 1e-9)
    return float(ordered[min(len(ordered), max(1, rank)) - 1])


def run_knowledge(rt: Runtime, source: TaskSource, prompts: str) -> StageRecord:
    def compute():
        config = rt.config
        images = rt.train_images(source)
        # Held-out images are scored at calibration as new images are at inspection: against a
        # knowledge they did not help build. Otherwise their scores could run low (the coreset
        # keeps the most unusual patches, those that set an image's score, at distance 0) and
        # the threshold's false-alarm bound would not hold.
        fit, _ = calibration_split(len(images), config.calibration_fraction, config.seed)
        prompt = torch.from_numpy(rt.store.get("prompts", prompts).array("prompts"))
        prompted = extract_features(rt.backbone, images[fit], prompt, config.inference_batch_size)
        knowledge = sample_knowledge(
            prompted, config.knowledge_size, config.projection_dim, config.seed
        )
        return {"knowledge": knowledge.numpy()}, {}

    inputs = {"train": source.train, "prompts": prompts}
    return _cached(rt, "knowledge", source.name, inputs, compute)


def run_calibrate(rt: Runtime, source: TaskSource, memory: dict[str, Any]) -> StageRecord:
    """Image scores of the class's held-out normal training images, and its threshold.

    `memory` names the class's keys, prompts and knowledge digests. Keys and prompts were learned
    from all training images, held-out ones included: keys only route images, and prompts are
    fit to structure maps without looking at any distance, so neither makes a held-out image
    look more normal to the knowledge; and their artifacts stay shared by every split.
    """

    def compute():
        config = rt.config
        images = rt.train_images(source)
        _, held = calibration_split(len(images), config.calibration_fraction, config.seed)
        task = TaskMemory.load(rt.store, memory)
        _, scores = score_images(rt.backbone, images[held], task, config)
        threshold = conformal_threshold(scores.numpy(), config.threshold_quantile)
        arrays = {"index": held.astype(np.int64), "scores": scores.numpy()}
        return arrays, {"threshold": threshold}

    inputs = {"train": source.train, "prompts": memory["prompts"], "knowledge": memory["knowledge"]}
    return _cached(rt, "calibrate", source.name, inputs, compute)


# Evaluation --------------------------------------------------------------------------------------


def run_features(rt: Runtime, source: TaskSource) -> StageRecord:
    def compute():
        images = rt.test_set(source).images
        frozen = extract_features(rt.backbone, images, None, rt.config.inference_batch_size)
        return {"features": frozen.numpy()}, {}

    return _cached(rt, "features", source.name, {"test": source.test}, compute)


def run_routing(rt: Runtime, test_task: str, features: str, keys: str) -> StageRecord:
    def compute():
        frozen = torch.from_numpy(rt.store.get("features", features).array("features"))
        key_vectors = torch.from_numpy(rt.store.get("keys", keys).array("keys"))
        return {"distances": task_distances(frozen, [key_vectors])[:, 0].numpy()}, {}

    return _cached(rt, "routing", test_task, {"features": features, "keys": keys}, compute)


def run_scores(
    rt: Runtime,
    source: TaskSource,
    memory: dict[str, Any],
    index: np.ndarray,
    routing_inputs: dict[str, Any],
) -> StageRecord:
    """Prompted patch and image scores of `index` images of a test set under one task."""

    def compute():
        task = TaskMemory.load(rt.store, memory)
        images = rt.test_set(source).images[index]
        patch, image = score_images(rt.backbone, images, task, rt.config)
        arrays = {"index": index.astype(np.int64), "patch": patch.numpy(), "image": image.numpy()}
        return arrays, {"scored_as": memory["name"]}

    inputs = {
        "test": source.test,
        "prompts": memory["prompts"],
        "knowledge": memory["knowledge"],
        **routing_inputs,
    }
    return _cached(rt, "scores", source.name, inputs, compute)


def run_evaluate(
    rt: Runtime, tasks: list[dict[str, Any]], j: int, routing: str = "agnostic"
) -> tuple[list[StageRecord], dict[str, float]]:
    """Evaluate test set j with the model made of `tasks` (manifest entries 0..v)."""
    if routing not in ("agnostic", "oracle"):
        raise ValueError(f"routing must be 'agnostic' or 'oracle', got {routing!r}")
    source = TaskSource(**tasks[j]["data"])
    memories = [{k: t[k] for k in ("keys", "prompts", "knowledge")} for t in tasks]
    inputs = {"test": source.test, "tasks": memories, "routing": routing, "j": j}
    # Checked before routing and scoring: a cached evaluation needs none of its inputs' work.
    key, cached = _lookup(rt, "evaluate", source.name, inputs)
    if cached is not None:
        return [cached], _metrics_of(rt.store.get("evaluate", key).attrs)

    records: list[StageRecord] = []
    selected, score_records = _route_and_score(rt, tasks, j, source, routing, records)

    def compute():
        test = rt.test_set(source)
        patch = np.empty((len(test.labels), rt.backbone.num_patches), dtype=np.float32)
        image = np.empty(len(test.labels), dtype=np.float32)
        for t, record in score_records.items():
            scored = rt.store.get("scores", record.digest)
            rows = np.flatnonzero(selected == t)
            # the artifact's index is sorted and covers every image that now selects t
            take = np.searchsorted(scored.array("index"), rows)
            patch[rows] = scored.array("patch")[take]
            image[rows] = scored.array("image")[take]
        maps = anomaly_maps(
            torch.from_numpy(patch),
            rt.backbone.grid,
            rt.config.image_size,
            rt.config.blur_sigma,
        ).numpy()
        metrics = task_metrics(image, test.labels, maps, test.masks, selected, j)
        arrays = {"selected": selected.astype(np.int64), "image_scores": image}
        return arrays, {"metrics": {k: json_float(v) for k, v in metrics.items()}}

    record = _cached(rt, "evaluate", source.name, inputs, compute)
    records.append(record)
    return records, _metrics_of(rt.store.get("evaluate", record.digest).attrs)


def _route_and_score(
    rt: Runtime,
    tasks: list[dict[str, Any]],
    j: int,
    source: TaskSource,
    routing: str,
    records: list[StageRecord],
) -> tuple[np.ndarray, dict[int, StageRecord]]:
    """The task each image of test set j selects, and the score artifacts that cover them."""
    if routing == "oracle":
        n = len(rt.test_set(source).labels)
        selected = np.full(n, j, dtype=np.int64)
        record = run_scores(rt, source, tasks[j], np.arange(n), {"routing": "oracle"})
        records.append(record)
        return selected, {j: record}

    features = run_features(rt, source)
    records.append(features)
    distances = []
    routing_digests = []
    for task in tasks:
        record = run_routing(rt, source.name, features.digest, task["keys"])
        records.append(record)
        routing_digests.append(record.digest)
        distances.append(rt.store.get("routing", record.digest).array("distances"))
    distances = np.stack(distances, axis=1)
    selected = distances.argmin(axis=1)
    score_records = {}
    for t in np.unique(selected).tolist():
        # Scores under task t are computed once, at the first version holding both j and t:
        # every later task can only take images away from t, never add any.
        first = max(j, t)
        index = np.flatnonzero(distances[:, : first + 1].argmin(axis=1) == t)
        routing_inputs = {"routing": "agnostic", "routing_digests": routing_digests[: first + 1]}
        record = run_scores(rt, source, tasks[t], index, routing_inputs)
        records.append(record)
        score_records[t] = record
    return selected, score_records


def _metrics_of(attrs: dict[str, Any]) -> dict[str, float]:
    return {k: float("nan") if v is None else v for k, v in attrs["metrics"].items()}
