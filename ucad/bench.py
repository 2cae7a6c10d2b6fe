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

import contextlib
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything import sam_model_registry
from torch import Tensor

from ucad import __version__, scoring
from ucad.bench_method import paper_class_seconds, precision_figures
from ucad.bench_passes import forward_passes, training_passes, warm_up
from ucad.bench_scale import scale_out
from ucad.calibration import calibration_split
from ucad.config import Config, load_config
from ucad.continual import AddTask
from ucad.data.datasets import read_task
from ucad.data.synth import generate
from ucad.manifest import TaskEntry, load_version
from ucad.memory import TaskMemory, score_images
from ucad.pipeline import Runtime, StageRecord
from ucad.provenance import peak_rss_bytes, reset_peak_rss
from ucad.runners import LocalRunner, StageRunner
from ucad.stages.features import extract_features
from ucad.store import ArtifactStore
from ucad.structure import (
    SAM_CHECKPOINTS,
    BatchedSamStructure,
    SamStructure,
    compare_with_reference,
    default_cache_dir,
)

MODEL = "bench"
FORMAT = "mvtec"
SCALING_CLASSES = (1, 10, 100)
MEMORY_STAGES = ("keys", "prompts", "knowledge")  # what a model keeps per class
# Targets. Largest allowed stage time / floor time:
FLOOR_TARGETS = {"keys": 1.2, "prompts": 1.3, "knowledge": 1.2, "inference": 1.3}
# and the others:
KEY_SEARCH_SHARE_TARGET = 0.10  # key search with 100 classes, as a share of inference
RERUN_TARGET = 0.02  # identical rerun through the cached pipeline, as a share of the first run
BYTES_PER_CLASS_TARGET = 1.3e6  # keys + prompts + knowledge on disk, at the paper preset
BF16_SPEEDUP_TARGETS = {"epoch": 1.5, "inference": 1.8}  # on hardware with native bf16
FLAT_EVALUATION_TARGET = 1.5  # evaluate seconds of the last stream step / the first
STRUCTURE_SPEEDUP_TARGET = 10.0  # segment-anything's generator seconds / ours, same images
STRUCTURE_AGREEMENT_TARGET = 0.95  # Rand index of the two partitions at the patch grid
# Fields that fix the size of a class's memory: the byte target applies when they are the paper's.
MEMORY_FIELDS = ("backbone", "feature_layer", "image_size", "prompt_mode", "prompt_length")
MEMORY_FIELDS += ("key_size", "knowledge_size")


# Measuring ---------------------------------------------------------------------------------------


@dataclass
class Reading:
    """Wall time and peak memory of one measured block (filled in when the block ends)."""

    seconds: float = 0.0
    peak_bytes: int | None = None


class Meter:
    """Times blocks of work and records their peak memory.

    On the CPU, peak memory is the process's peak resident set size during the block (Linux resets
    the high-water mark through /proc/self/clear_refs; elsewhere it is the peak since the process
    started). On CUDA it is the peak of memory allocated by PyTorch on the device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.memory_kind = "CUDA allocated" if device.type == "cuda" else "process RSS"
        if device.type != "cuda" and not reset_peak_rss():
            self.memory_kind = "process RSS since start"

    @contextlib.contextmanager
    def measure(self) -> Iterator[Reading]:
        reading = Reading()
        self._synchronize()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()
        start = time.perf_counter()
        try:
            yield reading
        finally:
            self._synchronize()
            reading.seconds = time.perf_counter() - start
            reading.peak_bytes = self._peak_bytes()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_rss_bytes()


class MeteredRunner:
    """A StageRunner that measures every stage call it passes on."""

    def __init__(self, runner: StageRunner, meter: Meter) -> None:
        self.runner = runner
        self.workers = runner.workers
        self.meter = meter
        self.calls: list[tuple[str, Reading]] = []

    def __call__(self, stage: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self.meter.measure() as reading:
            result = self.runner(stage, *args, **kwargs)
        self.calls.append((stage.__name__.removeprefix("run_"), reading))
        return result


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

    @property
    def met(self) -> bool | None:
        return None if self.target is None or self.ratio is None else self.ratio <= self.target

    def as_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "images_per_second": _finite(self.images_per_second),
            "ratio": self.ratio,
            "met": self.met,
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Target:
    """One checked figure: met when `value <= limit` (`value >= limit` for an `at_least`
    target); None when it does not apply."""

    name: str
    value: float | None
    limit: float
    applies: bool = True
    why_not: str = ""
    at_least: bool = False

    @property
    def met(self) -> bool | None:
        if not self.applies or self.value is None:
            return None
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


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
        config, structure_source, structure_note = _structure(settings)
        rt = Runtime(config, ArtifactStore(root / "store"), structure_source)
        meter = Meter(rt.device)
        log(f"one class ({names[0]}) through the pipeline, backbone {config.backbone} ...")
        report = _measure_class(rt, meter, data, names[0])
        log(f"a stream of {len(names)} classes with the smoke backbone ...")
        report["stream"] = _measure_stream(settings.stream_config, meter, data, names, root)
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
    report["targets"] = [t.as_json() for t in _targets(report, config)]
    return report


def _structure(settings: BenchSettings) -> tuple[Config, BatchedSamStructure | None, str]:
    """The structure source to time, and the line that says which one it is.

    `auto` times SAM only with its real weights on disk; `sam` times SAM with random weights when
    they are missing (speed does not depend on them, but on a CPU it takes minutes per image).
    """
    config, choice, fallback = settings.config, settings.structure, ""
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
    source = BatchedSamStructure(model, **_sam_settings(config))
    return config, source, f"SAM {config.sam_model}, random weights: timing only"


def _sam_settings(config: Config) -> dict[str, Any]:
    return {
        "device": config.device if config.device != "auto" else None,
        "points_per_side": config.sam_points_per_side,
        "pred_iou_thresh": config.sam_pred_iou_thresh,
        "stability_score_thresh": config.sam_stability_score_thresh,
        "box_nms_thresh": config.sam_box_nms_thresh,
    }


def _structure_comparison(rt: Runtime, images: np.ndarray) -> dict[str, Any] | None:
    """The structure source against segment-anything's own generator on the same model and
    images (`structure.*` figures); None when the run times superpixels."""
    fast = rt.structure_source
    if not isinstance(fast, BatchedSamStructure):
        return None
    reference = SamStructure(fast.model, **_sam_settings(rt.config))
    return compare_with_reference(fast, reference, images, rt.backbone.patch_size)


def _sam_weights(config: Config) -> Path | None:
    """The SAM checkpoint the pipeline would load, if it is on disk (never downloads)."""
    if config.sam_checkpoint is not None:
        path = Path(config.sam_checkpoint).expanduser()
    else:
        path = default_cache_dir() / "sam" / SAM_CHECKPOINTS[config.sam_model].filename
    return path if path.is_file() else None


def _measure_class(rt: Runtime, meter: Meter, data: Path, task: str) -> dict[str, Any]:
    """Learn and evaluate one class through the pipeline, then infer with the in-memory model."""
    config = rt.config
    warm_up(rt.backbone, config)
    runner = MeteredRunner(LocalRunner(rt), meter)
    with meter.measure() as first:
        result = AddTask(MODEL, task, data, config, rt.store, FORMAT).run(runner)
    entry = load_version(rt.store, MODEL).tasks[0]
    memory = TaskMemory.load(rt.store, entry)
    train, test = rt.train_images(entry.data), rt.test_set(entry.data).images

    stages = _learning_figures(rt, runner, train, memory)
    inference, frozen = _inference_figures(rt, meter, test, memory)
    stages += [*inference, _evaluation_figure(runner, result.stages, inference)]
    with meter.measure() as rerun:
        again = AddTask(MODEL, task, data, config, ArtifactStore(rt.store.root), FORMAT).run()
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
        "structure": _structure_comparison(rt, train[:2]),
    }


def _evaluation_figure(
    runner: MeteredRunner, records: list[StageRecord], inference: list[StageFigure]
) -> StageFigure:
    """The pipeline's evaluation of the class: its call, with the stages it ran as parts."""
    learned = {stage for stage, _ in runner.calls if stage != "evaluate"}
    parts: dict[str, float] = {}
    for record in records:
        if record.stage not in learned:  # features, routing, scores, evaluate
            parts[record.stage] = parts.get(record.stage, 0.0) + record.seconds
    call = dict(runner.calls)["evaluate"]
    total = inference[-1]  # its floor: a frozen and a prompted pass per test image
    return StageFigure(
        "evaluate", total.images, call.seconds, call.peak_bytes, total.floor_seconds, parts=parts
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
        if stage == "evaluate":
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


def _measure_stream(
    config: Config, meter: Meter, data: Path, names: list[str], root: Path
) -> dict[str, Any]:
    """Learn the classes one by one; per step, time and the forward passes evaluation needed.

    A re-extract-everything evaluation would run a frozen and a prompted pass over every test
    image of every class learned so far, at every step.
    """
    store = ArtifactStore(root / "stream-store")
    rt = Runtime(config, store)
    warm_up(rt.backbone, config)
    runner = MeteredRunner(LocalRunner(rt), meter)
    steps, test_images = [], 0
    for step, name in enumerate(names, start=1):
        runner.calls.clear()
        with meter.measure() as wall:
            result = AddTask("stream", name, data, config, store, FORMAT).run(runner)
        test_images += len(read_task(data, name, FORMAT).test)
        computed = [r for r in result.stages if not r.cached]
        steps.append(
            {
                "step": step,
                "task": name,
                "seconds": wall.seconds,
                "learn_seconds": sum(r.seconds for s, r in runner.calls if s != "evaluate"),
                "evaluate_seconds": sum(r.seconds for s, r in runner.calls if s == "evaluate"),
                "frozen_passes": _rows(store, computed, "features", "features"),
                "prompted_passes": _rows(store, computed, "scores", "index"),
                "reextract_passes": 2 * test_images,
            }
        )
    return {"backbone": config.backbone, "steps": steps}


def _rows(store: ArtifactStore, records: list[StageRecord], stage: str, array: str) -> int:
    """Images covered by the computed artifacts of one stage (array shapes; no data is read)."""
    return sum(store.get(stage, r.digest).shape(array)[0] for r in records if r.stage == stage)


def _targets(report: dict[str, Any], config: Config) -> list[Target]:
    figures = {row["stage"]: row for row in report["stages"]}
    paper = load_config("paper")
    is_paper = all(getattr(config, f) == getattr(paper, f) for f in MEMORY_FIELDS)
    return [
        Target("inference / floor", figures["inference"]["ratio"], FLOOR_TARGETS["inference"]),
        Target(
            "prompt-training epoch / floor", figures["prompts"]["ratio"], FLOOR_TARGETS["prompts"]
        ),
        Target("keys / floor", figures["keys"]["ratio"], FLOOR_TARGETS["keys"]),
        Target("knowledge / floor", figures["knowledge"]["ratio"], FLOOR_TARGETS["knowledge"]),
        Target(
            "key search with 100 classes / inference",
            report["scaling"][-1]["key_search_share"],
            KEY_SEARCH_SHARE_TARGET,
        ),
        Target("identical rerun / first run", report["rerun"]["fraction"], RERUN_TARGET),
        Target(
            "bytes stored per class",
            report["bytes_per_class"]["total"],
            BYTES_PER_CLASS_TARGET,
            applies=is_paper,
            why_not="" if is_paper else "memory sizes differ from the paper preset",
        ),
        *_precision_targets(report["precision"]),
        _structure_target(report["structure"]),
        _flat_evaluation_target(report["stream"]["steps"]),
    ]


def _precision_targets(precision: dict[str, Any]) -> list[Target]:
    speedup = precision.get("speedup", {})
    why_not = "" if precision["native_bf16"] else "no native bf16 on this machine"
    return [
        Target(
            f"bf16 speedup, {name}",
            speedup.get(key),
            limit,
            applies=precision["native_bf16"],
            why_not=why_not,
            at_least=True,
        )
        for name, key, limit in (
            ("training epoch", "epoch", BF16_SPEEDUP_TARGETS["epoch"]),
            ("inference", "inference", BF16_SPEEDUP_TARGETS["inference"]),
        )
    ]


def _structure_target(structure: dict[str, Any] | None) -> Target:
    """The structure source against segment-anything's generator, at agreement >= 0.95."""
    if structure is None:
        return Target(
            "SAM structure speedup over the generator",
            None,
            STRUCTURE_SPEEDUP_TARGET,
            applies=False,
            why_not="superpixels timed; --structure sam compares SAM",
            at_least=True,
        )
    agrees = structure["agreement"] >= STRUCTURE_AGREEMENT_TARGET
    return Target(
        "SAM structure speedup over the generator",
        structure["speedup"] if agrees else 0.0,
        STRUCTURE_SPEEDUP_TARGET,
        at_least=True,
    )


def _flat_evaluation_target(steps: list[dict[str, Any]]) -> Target:
    """Evaluation time per step stays flat along the stream: last step / first step."""
    first, last = steps[0]["evaluate_seconds"], steps[-1]["evaluate_seconds"]
    return Target(
        f"evaluate s, step {len(steps)} / step 1",
        last / first if first > 0 else None,
        FLAT_EVALUATION_TARGET,
        applies=len(steps) > 1,
        why_not="" if len(steps) > 1 else "a stream of one class",
    )


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "ucad": __version__,
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
