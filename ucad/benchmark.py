"""A whole continual stream: learn classes in order, evaluate every class seen after each."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ucad import __version__
from ucad.config import Config
from ucad.data.datasets import list_tasks, read_task
from ucad.data.images import Geometry, load_images, load_test_set
from ucad.metrics import METRICS, ResultsMatrix
from ucad.model import UCAD
from ucad.stages.evaluate import ContinualEvaluator

log = logging.getLogger(__name__)

ROUTINGS = ("agnostic", "oracle")


@dataclass
class StreamResult:
    tasks: list[str]
    routing: str
    config: Config
    results: ResultsMatrix
    device: str
    seconds: dict[str, float] = field(
        default_factory=dict
    )  # per step: "learn/<task>", "eval/<task>"
    forward_passes: list[int] = field(default_factory=list)  # evaluation passes per step

    def as_json(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            **self.results.as_json(),
            "routing": self.routing,
            "seed": self.config.seed,
            "device": self.device,
            "config": self.config.model_dump(mode="json"),
            "seconds": self.seconds,
            "evaluation_forward_passes": self.forward_passes,
            "versions": {
                "ucad": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }


def geometry_for(config: Config, model: UCAD) -> Geometry:
    """The backbone's own resize + centre crop, applied alike to images and masks."""
    interpolation = model.backbone.interpolation
    if interpolation not in ("bicubic", "bilinear"):
        interpolation = "bicubic"
    return Geometry(config.resize_to, config.image_size, interpolation)


def resolve_tasks(root: Path, data_format: str, tasks: list[str] | None) -> list[str]:
    """The explicit class order, or all classes of the dataset in alphabetical order."""
    if tasks:
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"a class appears twice in the task order: {', '.join(tasks)}")
        return list(tasks)
    found = list_tasks(root, data_format)
    if not found:
        raise ValueError(f"{root}: no classes found in {data_format} layout")
    return found


def run_stream(
    root: Path,
    data_format: str,
    config: Config,
    tasks: list[str] | None = None,
    routing: str = "agnostic",
) -> StreamResult:
    """Learn `tasks` in order into one model; after each, evaluate every task learned so far."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    tasks = resolve_tasks(root, data_format, tasks)
    torch.manual_seed(config.seed)
    model = UCAD(config)
    geometry = geometry_for(config, model)
    evaluator = ContinualEvaluator(model)
    result = StreamResult(
        tasks, routing, config, ResultsMatrix(len(tasks), METRICS), str(model.device)
    )
    log.info("stream of %d classes, order: %s; seed %d", len(tasks), ", ".join(tasks), config.seed)
    for t, name in enumerate(tasks):
        data = read_task(root, name, data_format)
        started = time.perf_counter()
        images = load_images(data.train, geometry, config.workers)
        model.learn_task(name, images)
        result.seconds[f"learn/{name}"] = time.perf_counter() - started

        started = time.perf_counter()
        evaluator.add_test_set(name, load_test_set(data.test, geometry, config.workers))
        passes = 0
        for j in range(t + 1):
            evaluation = evaluator.evaluate(j, routing)
            result.results.set(t, j, evaluation.metrics)
            passes += evaluation.forward_passes
        result.forward_passes.append(passes)
        result.seconds[f"eval/{name}"] = time.perf_counter() - started
        row = result.results.row(t)
        log.info(
            "after %s (%d/%d): mean image AUROC %.3f, pixel AP %.3f, routing %.3f",
            name,
            t + 1,
            len(tasks),
            _mean(row["image_auroc"]),
            _mean(row["pixel_ap"]),
            _mean(row["routing_accuracy"]),
        )
    return result


def _mean(values: list[float]) -> float:
    return float(torch.tensor(values).nanmean())
