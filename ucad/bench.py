"""`ucad bench`: the speed of every stage, next to the floor it cannot go below.

A stage's floor is the bare backbone work the method forces on it, measured in the same run on
the same images: frozen passes through blocks 0..feature_layer (keys, routing), prompted passes
(knowledge, calibration, scoring), prompted forward + backward (one prompt-training epoch).
A ratio near 1 means the stage costs little beyond those passes.

Everything runs on generated data in a temporary folder, with random backbone weights (speed does
not depend on the weight values): one class of the chosen preset through the real cached pipeline
(`ucad.continual.add_task`) and the in-memory model (`ucad.model`), then a stream of classes with
the smoke backbone, which is enough to count forward passes and to see how learning and
evaluation time grow along a stream.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ucad import scoring
from ucad.bench_meter import EVALUATION_CALLS, Meter, MeteredRunner, Reading, machine
from ucad.bench_method import paper_class_seconds, precision_figures
from ucad.bench_passes import forward_passes, training_passes, warm_up
from ucad.bench_stream import measure_stream, scale_out
from ucad.bench_structure import structure_choice, structure_comparison
from ucad.bench_targets import FLOOR_TARGET_NAMES, FLOOR_TARGETS, targets
from ucad.calibration import calibration_split
from ucad.config import Config, load_config
from ucad.continual import AddTask
from ucad.data.synth import LAYOUT, generate
from ucad.manifest import TaskEntry, load_version
from ucad.memory import TaskMemory, score_images
from ucad.pipeline import Runtime, StageRecord
from ucad.runners import LocalRunner
from ucad.stages.features import extract_features
from ucad.store import ArtifactStore

MODEL = "bench"
SCALING_CLASSES = (1, 10, 100)
MEMORY_STAGES = ("keys", "prompts", "knowledge")  # what a model keeps per class
# Targets. Largest allowed stage time / floor time:


# Figures -----------------------------------------------------------------------------------------


@dataclass
class StageFigure:
    """One row of the stage table."""

    stage: str
    images: int
    seconds: float
    peak_bytes: int | None
    floor_seconds: float | None = None
    target: float | None = None  # largest allowed ratio to the floor
    parts: dict[str, float] = field(default_factory=dict)  # seconds of the stage's parts

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else math.inf

    @property
    def ratio(self) -> float | None:
        return self.seconds / self.floor_seconds if self.floor_seconds else None

    def as_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "images_per_second": _finite(self.images_per_second),
            "ratio": self.ratio,
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# The bench ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSettings:
    """What `ucad bench` measures; `config` is the preset plus overrides, random weights."""

    config: Config
    stream_config: Config
    images: int = 16  # training images per class; tests: images // 2 good + images defective
    classes: int = 10  # classes in the stream
    structure: str = "auto"  # auto: SAM if its weights are on disk, else superpixels
    scale_out: int = 4  # the stream's first classes run on 1 and 2 Dask workers (0: skip)


def bench_settings(
    preset: str = "paper",
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    images: int = 16,
    classes: int = 10,
    epochs: int = 1,
    device: str | None = None,
    structure: str = "auto",
    scale_out: int = 4,
) -> BenchSettings:
    """Validate the request: the preset's architecture with random weights and `epochs` epochs."""
    if images < 2:
        raise ValueError(f"--images must be at least 2 (one is held out for calibration): {images}")
    if classes < 1:
        raise ValueError(f"--classes must be at least 1, got {classes}")
    if epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {epochs}")
    if scale_out < 0:
        raise ValueError(f"--scale-out must be at least 0, got {scale_out}")
    if structure not in ("auto", "sam", "superpixel"):
        raise ValueError(f"--structure must be auto, sam or superpixel, got {structure!r}")
    forced = {"pretrained": False, "epochs": epochs, **({"device": device} if device else {})}
    values = {**(overrides or {}), **forced}
    return BenchSettings(
        config=load_config(preset, config_file, values),
        stream_config=load_config("smoke", config_file, values),
        images=images,
        classes=classes,
        structure=structure,
        scale_out=min(scale_out, classes),
    )


def run_bench(settings: BenchSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every measurement; returns the report (`format_report` prints it)."""
    with tempfile.TemporaryDirectory(prefix="ucad-bench-") as tmp:
        root = Path(tmp)
        data = root / "data"
        log(f"generating {settings.classes} synthetic classes in {data} ...")
        names = generate(
            data,
            classes=settings.classes,
            seed=settings.config.seed,
            train=settings.images,
            test_good=max(1, settings.images // 2),
            test_defect=settings.images,
        )
        choice = structure_choice(settings.config, settings.structure)
        config, structure_source, structure_note = choice
        rt = Runtime(config, ArtifactStore(root / "store"), structure_source)
        meter = Meter(rt.device)
        log(f"one class ({names[0]}) through the pipeline, backbone {config.backbone} ...")
        report = _measure_class(rt, meter, data, names[0])
        log(f"a stream of {len(names)} classes with the smoke backbone ...")
        report["stream"] = measure_stream(settings.stream_config, meter, data, names, root)
        report["scale_out"] = None
        if settings.scale_out:
            log(f"the first {settings.scale_out} classes on 1 and 2 local Dask workers ...")
            stream = names[: settings.scale_out]
            report["scale_out"] = scale_out(settings.stream_config, data, stream, root, log)
    report["settings"] = {
        "images": settings.images,
        "classes": settings.classes,
        "config": config.model_dump(mode="json"),
        "stream_backbone": settings.stream_config.backbone,
        "structure": structure_note,
        "weights": "random weights: timing only",
        "memory_kind": meter.memory_kind,
    }
    report["machine"] = machine(rt.device)
    structure = report["structure"]
    report["paper_class_s"] = paper_class_seconds(
        {row["stage"]: row for row in report["stages"]},
        structure["s_per_image"] if structure else None,
        structure_note,
    )
    report["targets"] = [t.as_json() for t in targets(report, config)]
    # a stage's verdict is its target's: none without one, or where it does not apply
    verdicts = {target["name"]: target["met"] for target in report["targets"]}
    for row in report["stages"]:
        row["met"] = verdicts.get(FLOOR_TARGET_NAMES.get(row["stage"]))
    return report


def _measure_class(rt: Runtime, meter: Meter, data: Path, task: str) -> dict[str, Any]:
    """Learn and evaluate one class through the pipeline, then infer with the in-memory model."""
    config = rt.config
    warm_up(rt.backbone, config)
    runner = MeteredRunner(LocalRunner(rt), meter)
    with meter.measure() as first:
        result = AddTask(MODEL, task, data, config, rt.store, LAYOUT).run(runner)
    entry = load_version(rt.store, MODEL).tasks[0]
    memory = TaskMemory.load(rt.store, entry)
    train, test = rt.train_images(entry.data), rt.test_set(entry.data).images

    stages = _learning_figures(rt, runner, train, memory)
    inference, frozen = _inference_figures(rt, meter, test, memory)
    stages += [*inference, _evaluation_figure(runner, result.stages, inference)]
    with meter.measure() as rerun:
        again = AddTask(MODEL, task, data, config, ArtifactStore(rt.store.root), LAYOUT).run()
    return {
        "task": task,
        "images": {"train": len(train), "test": len(test)},
        "stages": [figure.as_json() for figure in stages],
        "bytes_per_class": _memory_bytes(rt.store, entry),
        "rerun": {
            "first_seconds": first.seconds,
            "rerun_seconds": rerun.seconds,
            "fraction": rerun.seconds / first.seconds,
            "computed_stages": sum(not r.cached for r in again.stages),
        },
        "scaling": _scaling(meter, frozen, memory, inference, config.seed),
        "precision": precision_figures(config, rt.device, train, test, memory.prompts),
        # two images: segment-anything's generator takes minutes per image on a CPU
        "structure": structure_comparison(rt, train[:2]),
    }


def _evaluation_figure(
    runner: MeteredRunner, records: list[StageRecord], inference: list[StageFigure]
) -> StageFigure:
    """The pipeline's evaluation of the class: its calls (the row looked up, the class evaluated,
    the row written), with the stages they ran as parts."""
    learned = {stage for stage, _ in runner.calls if stage not in EVALUATION_CALLS}
    parts: dict[str, float] = {}
    for record in records:
        if record.stage not in learned:  # features, routing, scores, evaluate, row
            parts[record.stage] = parts.get(record.stage, 0.0) + record.seconds
    calls = [reading for stage, reading in runner.calls if stage in EVALUATION_CALLS]
    seconds = sum(reading.seconds for reading in calls)
    peaks = [reading.peak_bytes for reading in calls if reading.peak_bytes is not None]
    total = inference[-1]  # its floor: a frozen and a prompted pass per test image
    return StageFigure(
        "evaluate",
        total.images,
        seconds,
        max(peaks, default=None),
        total.floor_seconds,
        parts=parts,
    )


def _learning_figures(
    rt: Runtime, runner: MeteredRunner, train: np.ndarray, memory: TaskMemory
) -> list[StageFigure]:
    """Rows of the stages that learn a class, each with its floor measured right here."""
    config, backbone = rt.config, rt.backbone
    fit, held = calibration_split(len(train), config.calibration_fraction, config.seed)
    batch = config.inference_batch_size
    floors: dict[str, tuple[int, Callable[[], None]]] = {
        "keys": (len(train), lambda: forward_passes(backbone, train, None, batch)),
        "prompts": (
            len(train),
            lambda: training_passes(backbone, train, memory.prompts, config.batch_size),
        ),
        "knowledge": (
            len(fit),
            lambda: forward_passes(backbone, train[fit], memory.prompts, batch),
        ),
        "calibrate": (
            len(held),
            lambda: forward_passes(backbone, train[held], memory.prompts, batch),
        ),
    }
    figures = []
    for stage, reading in runner.calls:
        if stage in EVALUATION_CALLS:
            continue
        images, floor = floors.get(stage, (len(train), None))
        floor_seconds = None
        if floor is not None:
            with runner.meter.measure() as floor_reading:
                floor()
            floor_seconds = floor_reading.seconds
        seconds = reading.seconds
        if stage == "prompts":  # per epoch: the floor is one epoch
            seconds /= config.epochs
        figures.append(
            StageFigure(
                stage, images, seconds, reading.peak_bytes, floor_seconds, FLOOR_TARGETS.get(stage)
            )
        )
    return figures


def _inference_figures(
    rt: Runtime, meter: Meter, test: np.ndarray, memory: TaskMemory
) -> tuple[list[StageFigure], Tensor]:
    """Routing, scoring and anomaly maps of the test images, as `UCAD.predict` runs them.

    Returns the rows and the frozen features (reused by the scaling figures).
    """
    config, backbone = rt.config, rt.backbone
    batch = config.inference_batch_size
    with meter.measure() as frozen_reading:
        frozen = extract_features(backbone, test, None, batch, on_device=True)
    with meter.measure() as search:
        # every image selects the one class; the search runs on the backbone's device
        scoring.select_task(frozen, [memory.keys.to(frozen.device)])
    with meter.measure() as floor_frozen:
        forward_passes(backbone, test, None, batch)
    with meter.measure() as scored:
        patch, _ = score_images(backbone, test, memory.prompts, memory.knowledge, config)
    with meter.measure() as floor_prompted:
        forward_passes(backbone, test, memory.prompts, batch)
    with meter.measure() as mapped:
        scoring.anomaly_maps(patch, backbone.grid, config.image_size, config.blur_sigma)
    n = len(test)
    routing = StageFigure(
        "routing",
        n,
        frozen_reading.seconds + search.seconds,
        _max_peak(frozen_reading, search),
        floor_frozen.seconds,
        parts={"frozen_features": frozen_reading.seconds, "key_search": search.seconds},
    )
    scored_figure = StageFigure(
        "scoring", n, scored.seconds, scored.peak_bytes, floor_prompted.seconds
    )
    maps = StageFigure("anomaly_maps", n, mapped.seconds, mapped.peak_bytes)
    rows = [routing, scored_figure, maps]
    total = StageFigure(
        "inference",
        n,
        sum(row.seconds for row in rows),
        _max_peak(frozen_reading, search, scored, mapped),
        floor_frozen.seconds + floor_prompted.seconds,
        FLOOR_TARGETS["inference"],
        parts={row.stage: row.seconds for row in rows},
    )
    return [*rows, total], frozen


def _max_peak(*readings: Reading) -> int | None:
    peaks = [r.peak_bytes for r in readings if r.peak_bytes is not None]
    return max(peaks) if peaks else None


def _scaling(
    meter: Meter, frozen: Tensor, memory: TaskMemory, inference: list[StageFigure], seed: int
) -> list[dict[str, Any]]:
    """Per-image routing and scoring with 1, 10 and 100 classes in the model.

    Extra classes are synthetic: the learned class's keys plus Gaussian noise. Key search is the
    only part of inference that grows with the number of classes; the frozen pass is shared, and
    scoring runs one prompted pass per image under its selected class whatever the class count.
    """
    routing, scored, maps = inference[:3]
    n = len(frozen)
    per_image = {row.stage: row.seconds / n for row in (scored, maps)}
    frozen_per_image = routing.parts["frozen_features"] / n
    generator = torch.Generator().manual_seed(seed)
    spread = memory.keys.std()
    rows = []
    for classes in SCALING_CLASSES:
        keys = [memory.keys] + [
            memory.keys + spread * torch.randn(memory.keys.shape, generator=generator)
            for _ in range(classes - 1)
        ]
        keys = [k.to(frozen.device) for k in keys]
        with meter.measure() as search:
            scoring.select_task(frozen, keys)
        search_per_image = search.seconds / n
        inference_per_image = frozen_per_image + search_per_image + sum(per_image.values())
        rows.append(
            {
                "classes": classes,
                "routing_ms_per_image": 1e3 * (frozen_per_image + search_per_image),
                "key_search_ms_per_image": 1e3 * search_per_image,
                "scoring_ms_per_image": 1e3 * per_image["scoring"],
                "inference_ms_per_image": 1e3 * inference_per_image,
                "key_search_share": search_per_image / inference_per_image,
            }
        )
    return rows


def _memory_bytes(store: ArtifactStore, entry: TaskEntry) -> dict[str, int]:
    """Bytes on disk of the artifacts a model keeps per class."""
    sizes = {}
    for stage in MEMORY_STAGES:
        sizes[stage] = store.get(stage, getattr(entry, stage)).stored_bytes
    sizes["total"] = sum(sizes.values())
    return sizes
