"""Readable text tables of a continual run: results matrices, final means, forgetting."""

from __future__ import annotations

from typing import Any

from ucad.metrics import METRICS


def _cell(value: float | None, width: int = 6) -> str:
    return f"{'-':>{width - 2}}  " if value is None else f"{value:{width}.3f}"


def format_matrix(tasks: list[str], rows: list[list[float | None]], metric: str) -> str:
    """Row t = after learning task t, column j = task j; columns as wide as the class names."""
    width = max(len(name) for name in tasks + ["after"])
    column = max(6, *(len(name) for name in tasks))
    header = " " * (width + 2) + " ".join(f"{name:>{column}}" for name in tasks)
    lines = [f"{metric} (row: after learning, column: task)", header]
    for name, row in zip(tasks, rows, strict=True):
        lines.append(f"{name:<{width}}  " + " ".join(_cell(v, column) for v in row))
    return "\n".join(lines)


def format_summary(result: dict[str, Any]) -> str:
    """Final mean of each metric (last row) and its forgetting measure."""
    lines = [f"{'metric':<18} {'final':>7} {'forgetting':>11}"]
    for metric in METRICS:
        lines.append(
            f"{metric:<18} {_cell(result['final'][metric]):>7} "
            f"{_cell(result['forgetting'][metric]):>11}"
        )
    return "\n".join(lines)


def format_result(result: dict[str, Any], metrics: tuple[str, ...] = METRICS) -> str:
    tasks = result["tasks"]
    parts = [
        f"classes (in order): {', '.join(tasks)}   seed: {result.get('seed')}   "
        f"routing: {result.get('routing')}"
    ]
    parts += [format_matrix(tasks, result["matrix"][m], m) for m in metrics]
    parts.append(format_summary(result))
    return "\n\n".join(parts)


def format_run(result: dict[str, Any]) -> str:
    """The tables of a run's JSON, then which model version it made and what it computed."""
    computed = sum(not stage["cached"] for stage in result["stages"])
    raced = sum(stage.get("raced", False) for stage in result["stages"])
    unchanged = "" if result["new_version"] else " (unchanged)"
    shared = f" ({raced} computed by another worker at the same time)" if raced else ""
    return (
        f"{format_result(result)}\n\nmodel {result['model']} version {result['version']}"
        f"{unchanged}; stages: {computed} computed, {len(result['stages']) - computed} cached"
        f"{shared}"
    )
