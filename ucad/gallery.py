"""A gallery of what `ucad predict` says about a few test images of each class of a version.

Each image selects its class by its keys and is decided against that class's threshold, as in
deployment. Made by the caller of tracking (the command, the flows) and logged as figures.
"""

from __future__ import annotations

import logging

import numpy as np
from matplotlib.figure import Figure

from ucad.data.datasets import TaskData, TestSample
from ucad.data.images import load_mask
from ucad.figures import gallery_figure
from ucad.inference import Inspector
from ucad.manifest import ModelVersion
from ucad.store import ArtifactStore

log = logging.getLogger(__name__)

GALLERY_NORMAL = 2
GALLERY_DEFECTIVE = 2


def gallery(store: ArtifactStore, version: ModelVersion) -> dict[str, Figure]:
    """One figure per class: a few normal and defective test images, verdicts and heat maps.

    A class whose test data is gone is skipped with a warning.
    """
    inspector = Inspector.load(store, version.ref)
    figures = {}
    for task in version.tasks:
        try:
            samples = _gallery_samples(task.data.read("test"))
            results = inspector.predict([sample.image for sample in samples])
            masks = [None if s.mask is None else load_mask(s.mask) for s in samples]
        except (OSError, ValueError) as err:
            log.warning("gallery: skipping class %s: %s", task.name, err)
            continue
        figures[task.name] = gallery_figure(task.name, samples, results, masks)
    return figures


def _gallery_samples(task: TaskData) -> list[TestSample]:
    normal = [s for s in task.test if s.label == 0]
    defective = [s for s in task.test if s.label == 1]
    return _spread(normal, GALLERY_NORMAL) + _spread(defective, GALLERY_DEFECTIVE)


def _spread(samples: list[TestSample], k: int) -> list[TestSample]:
    """k samples evenly spaced over the path-sorted list, so they span defect types."""
    if len(samples) <= k:
        return samples
    return [samples[i] for i in np.linspace(0, len(samples) - 1, k).round().astype(int)]
