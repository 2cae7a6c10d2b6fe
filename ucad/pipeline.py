"""The cached pipeline's machinery: stage declarations, digests, the runtime, the cache lookup.

Each stage (one module under `ucad.stages`) declares once, in a `Stage`, what its artifacts
depend on besides their input data: the config fields its own code reads, the stages whose
artifacts it consumes, its code version and whether it runs the backbone or a structure model.
Its digest is derived from that declaration, collected over every stage it consumes, so a field
read anywhere upstream is part of every digest downstream and a warm store always reports what
an empty store would. A stage body is an ordinary function; this module only looks its digest
up and publishes what it computes (docs/method.md, "The cached pipeline").
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property, lru_cache
from typing import Any, TypeVar

import numpy as np
import torch

from ucad.allocator import keep_freed_memory, release_freed_memory
from ucad.backbone import PromptedViT, backbone_identity, create_backbone, input_geometry
from ucad.config import Config
from ucad.data.images import Geometry, TestSet, load_images, load_test_set
from ucad.data.source import TaskSource
from ucad.device import resolve_device, resolve_precision
from ucad.digests import digest, file_identity
from ucad.sam_masks import SAM_GENERATOR_VERSION
from ucad.sam_structure import config_settings
from ucad.store import ArtifactStore
from ucad.structure import (
    SAM_CHECKPOINTS,
    StructureSource,
    make_structure_source,
    resolve_sam_checkpoint,
)

log = logging.getLogger(__name__)

FieldsOf = Callable[[Config], tuple[str, ...]]


@dataclass(frozen=True)
class Stage:
    """What a stage's artifacts depend on besides their input data, declared in one place.

    `fields` are the config fields the stage's own code reads (a function of the config where
    that depends on a choice, like the structure source); `consumes` are the stages whose
    artifacts it reads. Bump `version` when the code changes what it computes.
    """

    name: str
    version: str
    fields: tuple[str, ...] | FieldsOf = ()
    consumes: tuple[Stage, ...] = ()
    runs_backbone: bool = False
    runs_structure_model: bool = False

    def closure(self) -> list[Stage]:
        """This stage and every stage it consumes, directly or not; each once."""
        found: dict[str, Stage] = {}
        pending = [self]
        while pending:
            stage = pending.pop()
            if stage.name not in found:
                found[stage.name] = stage
                pending.extend(stage.consumes)
        return [found[name] for name in sorted(found)]

    def own_fields(self, config: Config) -> tuple[str, ...]:
        return self.fields(config) if callable(self.fields) else self.fields

    def field_names(self, config: Config) -> list[str]:
        """Every config field this stage's artifacts depend on, its consumed stages' included."""
        return sorted({name for stage in self.closure() for name in stage.own_fields(config)})

    def digest(self, rt: Runtime, inputs: dict[str, Any]) -> str:
        closure = self.closure()
        environment: dict[str, Any] = {}
        if any(stage.runs_backbone for stage in closure):
            environment["backbone_identity"] = rt.backbone_identity
        if any(stage.runs_structure_model for stage in closure):
            environment["structure_identity"] = rt.structure_identity
        versions = {stage.name: stage.version for stage in closure}
        fields = rt.config.digest_fields(*self.field_names(rt.config))
        return digest(self.name, versions, fields, {**inputs, **environment})


@dataclass(frozen=True)
class StageRecord:
    """What one stage did in this run: `cached` means its artifact existed and nothing ran.

    `raced`: another worker was computing the same artifact at the same time; this stage waited
    for it (or computed it too and found it published first) and reports it cached.
    """

    stage: str
    task: str
    digest: str
    cached: bool
    seconds: float
    raced: bool = False

    @property
    def records(self) -> list[StageRecord]:
        return [self]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Evaluation:
    """One test set evaluated by one model version: its metrics and the stages it took."""

    metrics: dict[str, float]
    records: list[StageRecord] = field(default_factory=list)  # the evaluate stage's comes last

    @property
    def digest(self) -> str:
        """The evaluate artifact that holds these figures."""
        return self.records[-1].digest


Claim = Callable[[str], AbstractContextManager[object]]
T = TypeVar("T")
KEPT_IMAGE_SETS = 4  # training or test sets of images a Runtime keeps in memory, each


def no_claim(name: str) -> AbstractContextManager[object]:
    """One process computes alone: nothing to coordinate."""
    return nullcontext()


class Runtime:
    """Per-process state shared by the stages: config, store, and the models they load lazily.

    `claim(name)` is held while a stage computes an artifact, so that workers of one cluster asked
    for the same digest at once compute it once (ucad.cluster: a Dask lock); by default nothing.
    Making one sets the process's allocator to keep freed memory (`ucad.allocator`).
    """

    def __init__(
        self,
        config: Config,
        store: ArtifactStore,
        structure_source: StructureSource | None = None,
        claim: Claim = no_claim,
    ) -> None:
        keep_freed_memory()  # large tensors reuse freed memory (ucad.allocator)
        self.config = config
        self.store = store
        self.claim = claim
        self._structure_source = structure_source  # a built one (bench: SAM with random weights)
        self._train: OrderedDict[str, np.ndarray] = OrderedDict()
        self._test: OrderedDict[str, TestSet] = OrderedDict()
        self._images_lock = threading.Lock()

    @cached_property
    def device(self) -> torch.device:
        return resolve_device(self.config.device)

    @cached_property
    def precision(self) -> torch.dtype:
        """float32 or bfloat16: what the backbone and SAM compute in (config `precision`)."""
        return resolve_precision(self.config.precision, self.device)

    @cached_property
    def backbone(self) -> PromptedViT:
        return create_backbone(self.config, self.precision).to(self.device)

    @cached_property
    def backbone_identity(self) -> dict[str, Any]:
        """The backbone's weights by content or name, and the precision it computes in."""
        return {**backbone_identity(self.config), "precision": str(self.precision)}

    @cached_property
    def structure_source(self) -> StructureSource:
        if self._structure_source is not None:
            return self._structure_source
        return structure_source_for(self.config, self.device, self.precision)

    @cached_property
    def structure_identity(self) -> dict[str, Any]:
        identity = structure_identity(self.config)
        if self.config.structure != "superpixel":  # SAM runs at the run's precision
            identity["precision"] = str(self.precision)
        return identity

    @cached_property
    def geometry(self) -> Geometry:
        return input_geometry(self.config, self.backbone)

    def train_images(self, source: TaskSource) -> np.ndarray:
        def load() -> np.ndarray:
            paths = source.read("train").train
            return load_images(paths, self.geometry, self.config.workers)

        return self._kept(self._train, source.train, load)

    def test_set(self, source: TaskSource) -> TestSet:
        def load() -> TestSet:
            samples = source.read("test").test
            return load_test_set(samples, self.geometry, self.config.workers)

        return self._kept(self._test, source.test, load)

    def _kept(self, kept: OrderedDict[str, T], key: str, load: Callable[[], T]) -> T:
        """The image set `key`, loaded once while it is among the latest `KEPT_IMAGE_SETS` used:
        a class's stages read its images one after another, and a long-lived worker (Dask,
        a flow's process) serves many classes, so older sets are let go."""
        with self._images_lock:
            if key in kept:
                kept.move_to_end(key)
                return kept[key]
        value = load()
        with self._images_lock:
            kept[key] = value
            while len(kept) > KEPT_IMAGE_SETS:
                kept.popitem(last=False)
        return value


def process_runtime(config: Config, store_root: str) -> Runtime:
    """This process's Runtime for a config and store: models load once per process (a flow's
    process, a Dask worker), not once per stage."""
    return _process_runtime(config.model_dump_json(), store_root)


@lru_cache(maxsize=1)  # one config at a time; a long-lived process keeps only the latest
def _process_runtime(config_json: str, store_root: str) -> Runtime:
    return Runtime(Config.model_validate_json(config_json), ArtifactStore(store_root))


def structure_source_for(
    config: Config, device: torch.device, precision: torch.dtype
) -> StructureSource:
    if config.structure == "superpixel":
        return make_structure_source("superpixel", n_segments=config.superpixel_segments)
    return make_structure_source(
        config.structure,
        model_type=config.sam_model,
        checkpoint=config.sam_checkpoint,
        device=device,
        settings=config_settings(config, precision),
    )


def structure_identity(config: Config) -> dict[str, Any]:
    """The structure model's weights by content: the checkpoint file's hash, or the official
    checkpoint's published SHA-256 (which the download is verified against)."""
    if config.structure == "superpixel":
        return {"source": "superpixel"}
    if config.sam_checkpoint is not None:
        # the same check and message as loading it, before hashing a file that is not there
        path = resolve_sam_checkpoint(config.sam_model, config.sam_checkpoint)
        identity = {"sam_sha256": file_identity(path)}
    else:
        identity = {"sam_sha256": SAM_CHECKPOINTS[config.sam_model].sha256}
    if config.structure == "sam":  # ucad's generator: its arithmetic can move a mask's edge
        identity["generator"] = SAM_GENERATOR_VERSION
    return identity


Compute = Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]]


def lookup(rt: Runtime, stage: Stage, task: str, inputs: dict[str, Any]) -> StageRecord:
    """The stage's record for these inputs: `cached` when the store has its artifact."""
    key = stage.digest(rt, inputs)
    cached = rt.store.has(stage.name, key)
    if cached:
        log.info("%s/%s: cached (%s)", stage.name, task, key[:12])
    return StageRecord(stage.name, task, key, cached, 0.0)


def cached(
    rt: Runtime, stage: Stage, task: str, inputs: dict[str, Any], compute: Compute
) -> StageRecord:
    """Look the stage's digest up in the store; compute and publish it only when absent.

    While computing, the runtime's claim on the digest is held: a worker that asks for it
    meanwhile waits, then finds it published. Where no claim reaches (separate processes, a lost
    claim), a racing computation is noticed before publishing and reported as cached too.
    """
    record = lookup(rt, stage, task, inputs)
    if record.cached:
        return record
    with rt.claim(f"ucad-{stage.name}-{record.digest}"):
        if rt.store.has(stage.name, record.digest):
            log.info("%s/%s: computed by another worker meanwhile", stage.name, task)
            return replace(record, cached=True, raced=True)
        return _compute(rt, stage, task, inputs, compute, record)


def _compute(
    rt: Runtime,
    stage: Stage,
    task: str,
    inputs: dict[str, Any],
    compute: Compute,
    record: StageRecord,
) -> StageRecord:
    log.info("%s/%s: computing", stage.name, task)
    started = time.perf_counter()
    arrays, attrs = compute()
    if rt.store.has(stage.name, record.digest):  # published by a racing process meanwhile
        log.info("%s/%s: computed by another process meanwhile", stage.name, task)
        return replace(record, cached=True, raced=True)
    provenance = {
        "task": task,
        "config": rt.config.digest_fields(*stage.field_names(rt.config)),
        "inputs": inputs,
        "code_version": stage.version,
    }
    rt.store.put(stage.name, record.digest, arrays, {**provenance, **attrs})
    del arrays
    release_freed_memory()  # what the computation kept for reuse does not outlive it
    seconds = time.perf_counter() - started
    log.info("%s/%s: done in %.1f s (%s)", stage.name, task, seconds, record.digest[:12])
    return replace(record, seconds=seconds)


def chunk_bounds(count: int, chunks: int) -> list[tuple[int, int]]:
    """(start, stop) of at most `chunks` contiguous, near-equal, non-empty parts of range(count)."""
    parts = max(1, min(chunks, count))
    edges = [count * i // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))
