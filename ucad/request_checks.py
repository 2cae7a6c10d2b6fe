"""What a request checks before any of its stages runs, so that bad input stops it with the
store unchanged: the class order, the routing mode, the model's config, every file of a class."""

from __future__ import annotations

from pathlib import Path

from ucad.calibration import calibration_split
from ucad.config import ROUTINGS, Config, result_fields
from ucad.data.datasets import DatasetFormat, TaskData, list_tasks
from ucad.data.images import MIN_SIZE, Geometry, load_images, load_test_set
from ucad.manifest import ModelVersion


def resolve_tasks(
    root: str | Path, data_format: DatasetFormat, tasks: tuple[str, ...] | list[str] | None
) -> list[str]:
    """The explicit class order, or all classes of the dataset in alphabetical order."""
    if tasks:
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"a class appears twice in the task order: {', '.join(tasks)}")
        return list(tasks)
    return list_tasks(root, data_format)


def check_routing(routing: str) -> None:
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")


def check_same_config(head: ModelVersion, config: Config) -> None:
    """A model keeps one config (runtime fields aside)."""
    theirs, ours = result_fields(head.config), result_fields(config)
    differing = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
    if differing:
        details = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in differing)
        raise ValueError(
            f"model {head.model!r} was built with another config ({details}); "
            "a model keeps one config: use a new model name for these settings"
        )


def check_task_files(data: TaskData, config: Config) -> None:
    """Decode every image and mask of a class before its first stage runs.

    A broken file then stops the request with the store unchanged, instead of after the class's
    stages and a new model version were written (test images are otherwise first read by the
    evaluation, after the version).
    """
    try:
        calibration_split(len(data.train), config.calibration_fraction, config.seed)
    except ValueError as err:
        raise ValueError(f"class {data.name!r} ({data.train[0].parent}): {err}") from None
    probe = Geometry(MIN_SIZE, MIN_SIZE)  # only decoding and the checks matter, not the pixels
    load_images(data.train, probe, config.workers)
    load_test_set(data.test, probe, config.workers)
