"""Decision thresholds from normal images a class's knowledge never saw (docs/method.md,
"Calibration")."""

from __future__ import annotations

import math

import numpy as np


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
