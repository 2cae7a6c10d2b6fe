"""Figures of a run: results matrices, mean and forgetting curves, a gallery of verdicts.

Pure drawing: values and predictions in, matplotlib figures out (no pyplot state, no I/O).
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from ucad.data.datasets import TestSample
from ucad.metrics import ResultsMatrix, final, forgetting
from ucad.predictions import Result


def matrix_figure(tasks: list[str], rows: list[list[float | None]], metric: str) -> Figure:
    values = np.array([[np.nan if v is None else v for v in row] for row in rows])
    size = min(2.0 + 0.6 * len(tasks), 12.0)
    figure = Figure(figsize=(size + 1.0, size), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=1.0)
    for (t, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            colour = "black" if value > 0.6 else "white"  # readable on viridis
            ax.text(j, t, f"{value:.2f}", ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), tasks[: len(rows)])
    ax.set_xlabel("class evaluated")
    ax.set_ylabel("after learning")
    ax.set_title(metric)
    figure.colorbar(image, ax=ax, shrink=0.8)
    return figure


def curves_figure(results: ResultsMatrix) -> Figure:
    """Mean and forgetting of every metric after each class learned."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    mean_ax, forgetting_ax = figure.subplots(1, 2)
    steps = np.arange(1, results.n_learned + 1)
    for metric in results.metrics:
        rows = results.matrix(metric)
        mean_ax.plot(steps, [final(rows[:s]) for s in steps], marker="o", label=metric)
        forgetting_ax.plot(
            steps[1:], [forgetting(rows[:s]) for s in steps[1:]], marker="o", label=metric
        )
    for ax, title in ((mean_ax, "mean over classes learned"), (forgetting_ax, "forgetting")):
        ax.set_title(title)
        ax.set_xlabel("classes learned")
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
    mean_ax.set_ylim(0, 1.02)
    mean_ax.legend(fontsize=8, loc="lower left")
    return figure


def gallery_figure(
    name: str, samples: list[TestSample], results: list[Result], masks: list[np.ndarray | None]
) -> Figure:
    """Top: the image; bottom: its heat map; ground truth outlined in white on both."""
    figure = Figure(figsize=(1.8 * len(samples), 4.2), dpi=72, layout="constrained")
    axes = figure.subplots(2, len(samples), squeeze=False)
    for (top, bottom), sample, result, mask in zip(axes.T, samples, results, masks, strict=True):
        top.imshow(result.image)
        bottom.imshow(result.overlay())
        if mask is not None and mask.any():
            for ax in (top, bottom):
                ax.contour(mask, levels=[0.5], colors="white", linewidths=0.8)
        verdict = "anomalous" if result.anomalous else "normal"
        title = f"{sample.defect}: {verdict}\n{result.score:.3g} / {result.threshold:.3g}"
        if result.task != name:
            title += f"\nas {result.task}"
        top.set_title(title, fontsize=8)
        top.set_axis_off()
        bottom.set_axis_off()
    figure.suptitle(
        f"{name}   (score / threshold; heat: blue 0, green threshold, red 2x threshold)",
        fontsize=8,
    )
    return figure
