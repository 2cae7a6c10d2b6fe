"""Defects of the synthetic dataset (`ucad.data.synth`): cracks, holes, scratches, stains and
missing pieces drawn on a normal `Scene`, each with the mask of exactly the pixels it changed.

`defective(rng, kind, scene, size)` places one where it shows (on the object, for objects) and
retries until it changes enough pixels to be visible.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from PIL import Image, ImageDraw

from ucad.data.synth_scenes import Scene, grid, quantise

TEXTURE_DEFECTS = ("crack", "hole", "scratch", "stain")
OBJECT_DEFECTS = ("hole", "missing", "scratch", "stain")
_STAIN_COLOURS = ((0.55, 0.27, 0.07), (0.1, 0.38, 0.42))  # rust, or teal on rust-like surfaces
_MIN_DEFECT_AREA = 0.004  # fraction of the image a defect must change to count as visible


def _blob(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float) -> np.ndarray:
    """Irregular round region: radius modulated by a few low harmonics of the angle. Returns
    the normalised distance from the centre (< 1 inside)."""
    x, y = grid(size)
    dx, dy = x - centre[0], y - centre[1]
    theta = np.arctan2(dy, dx)
    k = np.arange(2, 5)[:, None, None]
    wobble = (
        rng.uniform(0, 0.12, (3, 1, 1)) * np.sin(k * theta + rng.uniform(0, 2 * np.pi, (3, 1, 1)))
    ).sum(0)
    return np.hypot(dx, dy) / (radius * (1 + wobble))


def _stroke(size: int, points: np.ndarray, width: int) -> np.ndarray:
    """Bool mask of a polyline through ``points`` (pixels, relative to the image centre)."""
    canvas = Image.new("L", (size, size), 0)
    xy = [tuple(p) for p in (points + size / 2).tolist()]
    ImageDraw.Draw(canvas).line(xy, fill=255, width=width, joint="curve")
    return np.asarray(canvas) > 0


def _scratch_path(rng: np.random.Generator, size: int, centre: np.ndarray) -> np.ndarray:
    """A gently curved line: quadratic Bezier through ``centre``."""
    length = size * rng.uniform(0.3, 0.5)
    direction = np.array([np.cos(a := rng.uniform(0, np.pi)), np.sin(a)])
    bend = np.array([-direction[1], direction[0]]) * length * rng.uniform(-0.25, 0.25)
    t = np.linspace(0, 1, 24)[:, None]
    start, end = centre - direction * length / 2, centre + direction * length / 2
    return (1 - t) ** 2 * start + 2 * t * (1 - t) * (centre + bend) + t**2 * end


def _crack_path(rng: np.random.Generator, size: int, centre: np.ndarray) -> np.ndarray:
    """A jagged random walk through ``centre``."""
    steps = 16
    angles = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.uniform(-0.6, 0.6, steps))
    step = size * rng.uniform(0.025, 0.035)
    walk = np.cumsum(step * np.stack([np.cos(angles), np.sin(angles)], 1), 0)
    return centre + walk - walk[steps // 2]


def _on_object(scene: Scene) -> np.ndarray | bool:
    return True if scene.coverage is None else scene.coverage > 0.5


def _missing(
    rng: np.random.Generator, scene: Scene, size: int, centre: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A bite out of the object's edge that shows the background."""
    bite = _blob(rng, size, centre, size * rng.uniform(0.08, 0.12)) < 1
    return bite & (scene.coverage > 0), scene.background


def _is_dark(scene: Scene, region: np.ndarray, threshold: float) -> bool:
    """Whether the surface under ``region`` is dark, so the defect must be bright to show."""
    return bool(region.any()) and scene.image[region].mean() < threshold


def _line(
    rng: np.random.Generator, scene: Scene, size: int, centre: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """Scratches are bright on darkish surfaces, cracks only on very dark ones; else dark."""
    path = _scratch_path if kind == "scratch" else _crack_path
    width = max(2, round(size * (0.02 if kind == "scratch" else 0.015)))
    region = _stroke(size, path(rng, size, centre), width) & _on_object(scene)
    image = scene.image
    if _is_dark(scene, region, 0.55 if kind == "scratch" else 0.3):
        return region, image + (1 - image) * 0.75
    return region, image * 0.25


def _hole(
    rng: np.random.Generator, scene: Scene, size: int, centre: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A pit, darkest in the middle; light (a hole to a lit surface) on dark materials."""
    distance = _blob(rng, size, centre, size * rng.uniform(0.05, 0.08))
    region = (distance < 1) & _on_object(scene)
    depth = 0.12 * np.clip(distance, 0, 1) ** 2
    pit = 0.9 - depth if _is_dark(scene, region, 0.3) else 0.06 + depth
    return region, pit[..., None]


def _stain(
    rng: np.random.Generator, scene: Scene, size: int, centre: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A translucent colour patch, strong in the middle and still clearly visible at its edge."""
    distance = _blob(rng, size, centre, size * rng.uniform(0.08, 0.12))
    region = (distance < 1) & _on_object(scene)
    mean = scene.image[region].mean(0) if region.any() else scene.image.mean((0, 1))
    colour = np.array(_STAIN_COLOURS[int(np.linalg.norm(mean - _STAIN_COLOURS[0]) < 0.3)])
    alpha = (0.75 - 0.3 * np.clip(distance, 0, 1))[..., None]
    return region, scene.image * (1 - alpha) + colour * alpha


_DEFECTS = {
    "missing": _missing,
    "scratch": partial(_line, kind="scratch"),
    "crack": partial(_line, kind="crack"),
    "hole": _hole,
    "stain": _stain,
}


def _defect_centre(rng: np.random.Generator, scene: Scene, size: int, kind: str) -> np.ndarray:
    """A centre in the middle 70% of the image (survives any center crop); for objects, on the
    object (for "missing": on its edge)."""
    if scene.coverage is None:
        return rng.uniform(-0.35, 0.35, 2) * size
    x, y = grid(size)
    inner = (np.abs(x) < 0.35 * size) & (np.abs(y) < 0.35 * size)
    candidates = inner & (
        (scene.coverage > 0) & (scene.coverage < 1) if kind == "missing" else (scene.coverage >= 1)
    )
    i = rng.choice(np.flatnonzero(candidates))
    return np.array([x.flat[i], y.flat[i]])


def defective(
    rng: np.random.Generator, kind: str, scene: Scene, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image, bool mask of exactly the changed pixels); retries until clearly visible."""
    normal = quantise(scene.image)
    for _ in range(50):
        centre = _defect_centre(rng, scene, size, kind)
        region, changed = _DEFECTS[kind](rng, scene, size, centre)
        image = quantise(np.clip(np.where(region[..., None], changed, scene.image), 0, 1))
        mask = (image != normal).any(-1)
        if mask.mean() >= _MIN_DEFECT_AREA:
            return image, mask
    raise RuntimeError(f"could not place a visible {kind} defect on a {scene.image.shape} image")
