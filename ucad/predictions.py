"""What one prediction is, and how predictions meet files: `Result` (the verdict on one image),
the inputs an inspector accepts, threshold overrides, heat-map overlays, the images a command
line names and the overlay files written for them (`predict_files`).

Shared by both inspectors, `ucad.inference.Inspector` (torch) and
`ucad.onnx_inspector.OnnxInspector` (onnxruntime), and free of torch, so that the ONNX path
starts without importing it.
"""

from __future__ import annotations

import math
import os
import re
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from ucad.data.datasets import IMAGE_EXTENSIONS
from ucad.data.images import load_image, to_rgb
from ucad.store_files import owner, owner_alive

ImageInput = str | os.PathLike | Image.Image | np.ndarray
HEATMAP_SUFFIX = ".heatmap.png"


@dataclass(frozen=True)
class Result:
    """The verdict on one image."""

    task: str  # the class the image chose by its keys
    score: float  # image anomaly score: a raw feature distance
    threshold: float  # the chosen class's threshold
    anomalous: bool  # score > threshold
    map: np.ndarray = field(repr=False)  # float32 (H, W) at the image's size; NaN: not scored
    image: Image.Image = field(repr=False)  # the image as scored, in RGB

    def overlay(self) -> Image.Image:
        return overlay(self.image, self.map, self.threshold)


class Predictor(Protocol):
    """What `predict_files` needs of an inspector (either kind)."""

    workers: int

    def iter_predict(self, images: Sequence[ImageInput]) -> Iterator[Result]: ...


def merge_thresholds(
    model: str, stored: Mapping[str, float], overrides: Mapping[str, float]
) -> dict[str, float]:
    unknown = sorted(set(overrides) - set(stored))
    if unknown:
        raise ValueError(
            f"threshold given for class {unknown[0]!r}, which {model} does not have; "
            f"its classes: {', '.join(stored)}"
        )
    return {**stored, **{task: _finite(task, value) for task, value in overrides.items()}}


def _finite(task: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"threshold for class {task!r} must be a finite number, got {value!r}")
    return number


def as_rgb(index: int, image: ImageInput) -> Image.Image:
    """Any accepted input as an RGB image, converted as files are by the one loader."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    name = f"image {index}"
    if isinstance(image, np.ndarray):
        try:
            image = Image.fromarray(image)
        except TypeError as err:
            raise ValueError(
                f"{name}: cannot use an array of shape {image.shape} and dtype {image.dtype} as "
                f"an image ({err}); use uint8 (H, W), (H, W, 3) or (H, W, 4), or uint16 (H, W)"
            ) from None
    if not isinstance(image, Image.Image):
        raise ValueError(
            f"{name}: expected a path, a PIL image or a numpy array, got {type(image).__name__}"
        )
    try:
        image.load()  # an opened file is decoded only now: a truncated one fails here
    except OSError as err:
        raise ValueError(f"{name}: cannot read image: {err}") from err
    return to_rgb(image, name)


def overlay(
    image: Image.Image, anomaly_map: np.ndarray, threshold: float, alpha: float = 0.5
) -> Image.Image:
    """The image with its anomaly map blended in: blue at 0, green at the threshold, red at 2x.

    The colour scale is tied to the class's threshold, not to each image's own range, so a
    colour means the same in every image. Pixels without a score keep their own colours.
    """
    scaled = np.clip(np.nan_to_num(anomaly_map) / max(2 * threshold, 1e-12), 0, 1)
    pixels = np.asarray(image, dtype=np.float32)
    blended = (1 - alpha) * pixels + alpha * _jet(scaled)
    scored = ~np.isnan(anomaly_map)[..., None]
    return Image.fromarray(np.where(scored, blended, pixels).round().astype(np.uint8))


def _jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map of values in [0, 1], as float RGB in [0, 255]."""
    return np.stack([np.clip(1.5 - np.abs(4 * values - c), 0, 1) for c in (3, 2, 1)], -1) * 255


# Command-line use: folders of images in, one record and one overlay file per image out ---------


def find_images(paths: Sequence[str | Path], exclude: str | Path | None = None) -> list[Path]:
    """The images `paths` name: files as given; folders searched recursively for image
    extensions, hidden entries and anything under `exclude` (the output folder) skipped.

    Each file comes once, in the order given (folders sorted).
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    found: dict[Path, Path] = {}
    for path in map(Path, paths):
        if path.is_dir():
            files = [f for f in sorted(path.rglob("*")) if _is_image(f, path, skip)]
            if not files:
                raise ValueError(
                    f"{path}: no images in this folder (extensions {sorted(IMAGE_EXTENSIONS)})"
                )
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
        for file in files:
            found.setdefault(file.resolve(), file)
    return list(found.values())


def _is_image(file: Path, folder: Path, skip: Path | None) -> bool:
    if file.suffix.lower() not in IMAGE_EXTENSIONS or not file.is_file():
        return False
    if any(part.startswith(".") for part in file.relative_to(folder).parts):
        return False
    return skip is None or skip not in file.resolve().parents


def heatmap_paths(files: Sequence[Path], inputs: Sequence[str | Path], out: Path) -> list[Path]:
    """Where each image's overlay goes: its path relative to the inputs' common folder, under
    `out`, with ".heatmap.png" appended; distinct images therefore never share a name."""
    roots = [os.path.abspath(p if Path(p).is_dir() else Path(p).parent) for p in inputs]
    base = os.path.commonpath(roots)
    relative = [Path(os.path.relpath(os.path.abspath(f), base)) for f in files]
    return [out / r.parent / (r.name + HEATMAP_SUFFIX) for r in relative]


def predict_files(
    inspector: Predictor, paths: Sequence[str | Path], out: Path | None = None
) -> Iterator[dict[str, Any]]:
    """Score the images `paths` name (see `find_images`) with a progress bar; yield one
    JSON-ready record per image. With `out`, overlay PNGs are written by background threads
    while the next images are scored, under temporary names: all take their names when the
    iteration ends, none if it fails (an unreadable image), so a failed run leaves no partial
    set of maps and earlier ones in their place."""
    files = find_images(paths, exclude=out)
    targets: list[Path | None] = heatmap_paths(files, paths, out) if out else [None] * len(files)
    if out is not None:
        remove_abandoned_overlays(out)
    results = inspector.iter_predict(files)
    workers = inspector.workers
    pending: deque[Future] = deque()
    written: list[tuple[Path, Path]] = []  # (temporary, target)
    try:
        with (
            ThreadPoolExecutor(max_workers=workers) as writer,
            tqdm(total=len(files), unit="image", desc="predict", disable=None) as progress,
        ):
            for file, target, result in zip(files, targets, results, strict=True):
                if target is not None:
                    temporary = target.with_name(f".{target.name}.{owner()}.partial")
                    written.append((temporary, target))
                    pending.append(writer.submit(_write_overlay, result, temporary))
                    while len(pending) > 2 * workers:  # each holds a full-size image and map
                        pending.popleft().result()
                progress.update()
                yield {
                    "path": str(file),
                    "task": result.task,
                    "score": result.score,
                    "threshold": result.threshold,
                    "anomalous": result.anomalous,
                    "heatmap": None if target is None else str(target),
                }
            for future in pending:
                future.result()
    except GeneratorExit:  # the caller stopped early: the maps of the records it got are kept
        _publish(written, pending)
        raise
    except BaseException:  # the writers have finished: leaving the pool waited for them
        for temporary, _ in written:
            temporary.unlink(missing_ok=True)
        raise
    _publish(written, pending)


# An overlay being written: ".<image>.heatmap.png.<host>-<pid>.partial" (`ucad.store_files.owner`).
_PARTIAL_OVERLAY = re.compile(
    r"^\.(?P<name>.+" + re.escape(HEATMAP_SUFFIX) + r")"
    r"\.(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d{1,10})\.partial$"
)


def remove_abandoned_overlays(out: Path) -> list[Path]:
    """Delete, under `out`, overlays left half-written by a `predict` that was killed (its
    process on this host is gone); those of a run still going, or of another host, stay."""
    removed = []
    if out.is_dir():
        for path in out.rglob(".*.partial"):
            match = _PARTIAL_OVERLAY.match(path.name)
            if match and owner_alive(match["host"], int(match["pid"])) is False:
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _publish(written: list[tuple[Path, Path]], pending: deque[Future]) -> None:
    """Give the finished overlays their names."""
    for future in pending:
        future.result()
    for temporary, target in written:
        os.replace(temporary, target)


def _write_overlay(result: Result, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # zlib level 1: about 5x faster than the default 6, files about 15 % larger
    result.overlay().save(target, format="PNG", compress_level=1)
