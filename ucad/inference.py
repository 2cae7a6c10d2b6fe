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
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from ucad.data.datasets import IMAGE_EXTENSIONS
from ucad.data.images import Geometry, load_image, to_rgb
from ucad.manifest import load_version
from ucad.model import UCAD
from ucad.store import ArtifactStore, validate_name
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
        merged = _merge_thresholds(
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
        image = _as_rgb(index, source)
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


def _merge_thresholds(
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


def _as_rgb(index: int, image: ImageInput) -> Image.Image:
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
    inspector: Inspector, paths: Sequence[str | Path], out: Path | None = None
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
    r"\.(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)\.partial$"
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
