"""Evaluation metrics, the continual results matrix and the forgetting measure.

All threshold curves share one vectorised path (`_count`): one curve point per distinct score t,
counting the scores >= t, so pixels with equal scores always enter at the same threshold. Counts
come from sorting and binary search, with no Python loops, so pixel metrics over tens of millions
of float32 pixels stay at a few seconds; `task_metrics` shares the counts between pixel AUROC,
pixel AP and AUPRO.

Undefined values are NaN, never an exception: AUROC needs both classes; AP and F1-max need at
least one positive; AUPRO needs at least one defect region and one normal pixel; routing accuracy
needs at least one image. Scores must be finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

METRICS = (
    "image_auroc",
    "image_ap",
    "image_f1max",
    "pixel_auroc",
    "pixel_ap",
    "aupro",
    "routing_accuracy",
)

# MVTec AD's official AUPRO code labels regions with a 3x3 structure of ones (8-connectivity).
# The zero planes before and after keep regions of different images apart when labelling (N, H, W).
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


@dataclass(frozen=True)
class _Counts:
    """At each distinct score t, highest first: positives (`tps`) and negatives (`fps`) >= t."""

    thresholds: np.ndarray
    tps: np.ndarray
    fps: np.ndarray
    n_pos: int
    n_neg: int


def _count(scores: np.ndarray, labels: np.ndarray) -> _Counts:
    """Threshold counts from one plain sort of all scores plus a sort of the positives.

    A plain sort is several times faster than an argsort on tens of millions of pixels, and
    neither labels nor indices need to travel with it: the number of scores >= each distinct
    value follows from where its run of equal values starts (equal scores enter together), and
    positives above it from a binary search in the (usually much smaller) sorted positives.
    """
    flat, labels = scores.ravel(), labels.ravel()
    if not np.isfinite(flat).all():
        raise ValueError("scores contain NaN or infinite values")
    ranked = np.sort(flat)
    is_start = np.ones(ranked.size, dtype=bool)
    is_start[1:] = ranked[1:] != ranked[:-1]
    starts = np.flatnonzero(is_start)
    thresholds = ranked[starts]
    positives = np.sort(flat[labels])
    tps = positives.size - np.searchsorted(positives, thresholds, side="left")
    fps = flat.size - starts - tps
    return _Counts(
        thresholds=thresholds[::-1],
        tps=tps[::-1],
        fps=fps[::-1],
        n_pos=positives.size,
        n_neg=flat.size - positives.size,
    )


def _as_labels(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype != bool:
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise ValueError(f"{name} must be boolean or 0/1, got values {np.unique(labels)[:5]}")
        labels = labels.astype(bool)
    return labels


def _check_pair(scores: np.ndarray, labels: np.ndarray, names: tuple[str, str]) -> None:
    if scores.shape != labels.shape:
        raise ValueError(f"{names[0]} shape {scores.shape} != {names[1]} shape {labels.shape}")


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2)


def _auroc(counts: _Counts) -> float:
    if counts.n_pos == 0 or counts.n_neg == 0:
        return math.nan
    tpr = np.concatenate(([0.0], counts.tps / counts.n_pos))
    fpr = np.concatenate(([0.0], counts.fps / counts.n_neg))
    return _trapezoid(fpr, tpr)


def _ap(counts: _Counts) -> float:
    """Step-wise average precision (sklearn's definition): sum of precision times recall gain."""
    if counts.n_pos == 0:
        return math.nan
    precision = counts.tps / (counts.tps + counts.fps)
    recall_gain = np.diff(counts.tps, prepend=0) / counts.n_pos
    return float(np.sum(precision * recall_gain))


def _f1max(counts: _Counts) -> float:
    if counts.n_pos == 0:
        return math.nan
    # F1 = 2PR / (P + R) = 2 TP / (predicted positives + actual positives).
    return float(np.max(2 * counts.tps / (counts.tps + counts.fps + counts.n_pos)))


def _aupro(maps: np.ndarray, masks: np.ndarray, counts: _Counts, fpr_limit: float) -> float:
    regions, n_regions = ndimage.label(masks, structure=_REGION_STRUCTURE)
    if n_regions == 0 or counts.n_neg == 0:
        return math.nan
    # PRO(t) = sum over defect pixels scoring >= t of 1 / (their region's size * n_regions).
    defect_ids = regions[masks]
    weights = 1.0 / (np.bincount(defect_ids)[defect_ids] * n_regions)
    defect_scores = maps[masks]
    order = np.argsort(defect_scores)
    ranked = defect_scores[order]
    weight_at_least = np.append(np.cumsum(weights[order][::-1])[::-1], 0.0)
    pro = weight_at_least[np.searchsorted(ranked, counts.thresholds, side="left")]
    fpr = counts.fps / counts.n_neg
    return _area_to_limit(np.append(0.0, fpr), np.append(0.0, pro), fpr_limit) / fpr_limit


def _area_to_limit(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area under (fpr, pro) from 0 to fpr_limit, cutting the curve exactly there."""
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:inside], pro[:inside]
    if inside < fpr.size:
        # fpr[inside - 1] <= limit < fpr[inside], so this segment is not vertical.
        share = (fpr_limit - fpr[inside - 1]) / (fpr[inside] - fpr[inside - 1])
        y_limit = pro[inside - 1] + share * (pro[inside] - pro[inside - 1])
        x, y = np.append(x, fpr_limit), np.append(y, y_limit)
    return _trapezoid(x, y)


def _image_counts(scores: np.ndarray, labels: np.ndarray) -> _Counts:
    scores, labels = np.asarray(scores), _as_labels(labels, "labels")
    _check_pair(scores, labels, ("scores", "labels"))
    if scores.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {scores.shape}")
    return _count(scores, labels)


def _pixel_inputs(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps, masks = np.asarray(maps), _as_labels(masks, "masks")
    _check_pair(maps, masks, ("maps", "masks"))
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (N, H, W), got {maps.shape}")
    return maps, masks


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of image scores; NaN unless both classes are present."""
    return _auroc(_image_counts(scores, labels))


def image_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of image scores (anomalous = positive); NaN without positives."""
    return _ap(_image_counts(scores, labels))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Best F1 over all thresholds `score >= t`; NaN without positives."""
    return _f1max(_image_counts(scores, labels))


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """ROC AUC over all pixels of (N, H, W) anomaly maps against boolean ground-truth masks."""
    maps, masks = _pixel_inputs(maps, masks)
    return _auroc(_count(maps, masks))


def pixel_ap(maps: np.ndarray, masks: np.ndarray) -> float:
    """Average precision over all pixels of (N, H, W) anomaly maps."""
    maps, masks = _pixel_inputs(maps, masks)
    return _ap(_count(maps, masks))


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit`, divided by `fpr_limit`.

    MVTec AD's definition: regions are 8-connected components of each image's mask; at threshold
    t, PRO is the mean over regions of the fraction of region pixels scoring >= t, FPR is the
    fraction of normal pixels scoring >= t. NaN without regions or without normal pixels.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    maps, masks = _pixel_inputs(maps, masks)
    return _aupro(maps, masks, _count(maps, masks), fpr_limit)


def routing_accuracy(selected: np.ndarray, true: np.ndarray) -> float:
    """Fraction of images routed to their own task; NaN for no images."""
    selected, true = np.asarray(selected), np.asarray(true)
    _check_pair(selected, true, ("selected", "true"))
    return float(np.mean(selected == true)) if selected.size else math.nan


def task_metrics(
    image_scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray | None,
    selected: np.ndarray,
    true_task: np.ndarray | int,
) -> dict[str, float]:
    """All of METRICS for one task's test set; pixel metrics share a single sort of the maps.

    `true_task` is one task id for the whole set or one per image. `masks=None` means the
    dataset has no pixel ground truth: the pixel metrics are then NaN.
    """
    image = _image_counts(image_scores, labels)
    selected = np.asarray(selected)
    metrics = {
        "image_auroc": _auroc(image),
        "image_ap": _ap(image),
        "image_f1max": _f1max(image),
        "pixel_auroc": math.nan,
        "pixel_ap": math.nan,
        "aupro": math.nan,
        "routing_accuracy": routing_accuracy(selected, np.broadcast_to(true_task, selected.shape)),
    }
    if masks is not None:
        maps, masks = _pixel_inputs(maps, masks)
        pixel = _count(maps, masks)
        metrics["pixel_auroc"] = _auroc(pixel)
        metrics["pixel_ap"] = _ap(pixel)
        metrics["aupro"] = _aupro(maps, masks, pixel, fpr_limit=0.3)
    return metrics


def _as_square(matrix: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Rows of a results matrix as a float array; None, and anything at j > t, become NaN."""
    width = max(len(row) for row in matrix)
    out = np.full((len(matrix), width), np.nan)
    for t, row in enumerate(matrix):
        if len(row) < t + 1:
            raise ValueError(f"results row {t} has {len(row)} entries, needs at least {t + 1}")
        out[t, : t + 1] = [math.nan if v is None else v for v in row[: t + 1]]
    return out


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def final(matrix: Sequence[Sequence[float | None]]) -> float:
    """Mean over tasks of the last row, ignoring NaN/None; NaN if nothing is defined."""
    if not matrix:
        raise ValueError("results matrix has no rows")
    last = len(matrix) - 1
    return _nanmean(_as_square(matrix)[last, : last + 1])


def forgetting(matrix: Sequence[Sequence[float | None]]) -> float | None:
    """Forgetting measure (Chaudhry et al. 2018) after the last row k (0-indexed).

    FM = 1/k * sum_{j<k} (max_{j<=l<k} R[l][j] - R[k][j]). Undefined (NaN/None) entries are
    skipped: the max runs over the defined earlier values and the mean over tasks whose drop is
    defined, so the result is NaN only when no drop is defined. None with fewer than two rows.
    """
    if len(matrix) < 2:
        return None
    results = _as_square(matrix)
    k = len(matrix) - 1
    # fmax ignores NaN unless the whole column is NaN (and, unlike nanmax, does not warn then).
    best_before = np.fmax.reduce(results[:k, :k], axis=0)
    return _nanmean(best_before - results[k, :k])


def json_float(value: float | None) -> float | None:
    """A figure for JSON: undefined values (NaN) become None (null)."""
    return None if value is None or math.isnan(value) else float(value)


def from_json(figures: Mapping[str, float | None]) -> dict[str, float]:
    """Figures read back from JSON: null (an undefined figure) becomes NaN again."""
    return {k: float("nan") if v is None else float(v) for k, v in figures.items()}


class ResultsMatrix:
    """Per-metric T x T results of a continual run: entry (t, j) is task j after learning task t.

    Rows are learned in order; `final` and `forgetting` use the rows learned so far (up to the
    highest row set), so the same object serves intermediate logging and the end of the run.
    """

    def __init__(self, n_tasks: int, metrics: Sequence[str] = METRICS) -> None:
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be at least 1, got {n_tasks}")
        self.n_tasks = n_tasks
        self.metrics = tuple(metrics)
        self._values = {m: np.full((n_tasks, n_tasks), np.nan) for m in self.metrics}
        self.n_learned = 0

    def set(self, t: int, j: int, values: Mapping[str, float]) -> None:
        """Store the metrics of task j evaluated after learning task t (j <= t)."""
        if not 0 <= j <= t < self.n_tasks:
            raise ValueError(f"need 0 <= j <= t < {self.n_tasks}, got t={t}, j={j}")
        unknown = set(values) - set(self.metrics)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; tracked: {self.metrics}")
        for metric, value in values.items():
            self._values[metric][t, j] = value
        self.n_learned = max(self.n_learned, t + 1)

    def set_row(self, t: int, row: Mapping[int, Mapping[str, float]]) -> None:
        """Store row t: the metrics of each task j evaluated after learning task t."""
        for j, values in row.items():
            self.set(t, j, values)
        self.n_learned = max(self.n_learned, t + 1)

    def row(self, t: int) -> dict[str, list[float]]:
        """Each metric's values for tasks 0..t after learning task t (NaN where unset)."""
        if not 0 <= t < self.n_tasks:
            raise ValueError(f"row {t} outside 0..{self.n_tasks - 1}")
        return {m: self._values[m][t, : t + 1].tolist() for m in self.metrics}

    def matrix(self, metric: str) -> list[list[float | None]]:
        """Rows learned so far, each of length T, None for j > t and undefined values."""
        if metric not in self._values:
            raise ValueError(f"unknown metric {metric!r}; tracked: {self.metrics}")
        values = self._values[metric][: self.n_learned]
        return [
            [json_float(v) if j <= t else None for j, v in enumerate(row)]
            for t, row in enumerate(values)
        ]

    def final(self) -> dict[str, float]:
        return {m: final(self.matrix(m)) for m in self.metrics}

    def forgetting(self) -> dict[str, float | None]:
        return {m: forgetting(self.matrix(m)) for m in self.metrics}

    def as_json(self) -> dict[str, dict]:
        """`{"matrix": {metric: rows}, "final": {...}, "forgetting": {...}}`, NaN as None."""
        if self.n_learned == 0:
            raise ValueError("no results set yet")
        return {
            "matrix": {m: self.matrix(m) for m in self.metrics},
            "final": {m: json_float(v) for m, v in self.final().items()},
            "forgetting": {m: json_float(v) for m, v in self.forgetting().items()},
        }
