"""Synthetic MVTec AD layout dataset: textures and simple objects with exact defect masks.

Lets anyone run the whole pipeline without downloading a dataset. Ten designs (five
textures, five objects on a background); further classes are colour and scale variants
("stripes-2", ...). Normal images vary by offset, rotation, scale, colour and noise.
Each defect image gets one defect, and its mask is exactly the set of pixels the defect
changed. Every random draw comes from a generator seeded by (seed, class, split, image),
so the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ucad import __version__

TEXTURES = ("stripes", "grain", "checker", "weave", "dots")
OBJECTS = ("nut", "disc", "ring", "cross", "tile")
# Textures and objects alternate so that even a 2- or 3-class stream mixes both kinds.
DESIGNS = tuple(d for pair in zip(TEXTURES, OBJECTS, strict=True) for d in pair)
TEXTURE_DEFECTS = ("crack", "hole", "scratch", "stain")
OBJECT_DEFECTS = ("hole", "missing", "scratch", "stain")

_BASE_COLOURS = {  # (background or dark colour, foreground or light colour), RGB in 0..1
    "stripes": ((0.16, 0.2, 0.36), (0.82, 0.76, 0.6)),
    "grain": ((0.42, 0.25, 0.12), (0.72, 0.52, 0.32)),
    "checker": ((0.26, 0.26, 0.3), (0.78, 0.76, 0.72)),
    "weave": ((0.16, 0.2, 0.12), (0.58, 0.62, 0.42)),
    "dots": ((0.08, 0.08, 0.1), (0.64, 0.66, 0.7)),
    "nut": ((0.84, 0.84, 0.8), (0.52, 0.55, 0.6)),
    "disc": ((0.2, 0.21, 0.24), (0.88, 0.46, 0.16)),
    "ring": ((0.7, 0.72, 0.76), (0.14, 0.14, 0.15)),
    "cross": ((0.9, 0.88, 0.8), (0.15, 0.35, 0.72)),
    "tile": ((0.3, 0.3, 0.32), (0.9, 0.88, 0.82)),
}
_STAIN_COLOURS = ((0.55, 0.27, 0.07), (0.1, 0.38, 0.42))  # rust, or teal on rust-like surfaces
_NOISE = 0.015  # sensor noise, std in 0..1 units
_MIN_DEFECT_AREA = 0.004  # fraction of the image a defect must change to count as visible


@dataclass(frozen=True)
class _Style:
    """What all images of one class share."""

    design: str
    dark: np.ndarray  # background / dark colour, (3,)
    light: np.ndarray  # object / light colour, (3,)
    scale: float  # geometric scale of the class (variants differ)


@dataclass(frozen=True)
class _Scene:
    """A rendered normal image; objects also keep their background and coverage."""

    image: np.ndarray  # float (H, W, 3) in 0..1
    background: np.ndarray | None = None  # objects: the image without the object
    coverage: np.ndarray | None = None  # objects: fraction of each pixel the object covers


def class_name(index: int) -> str:
    """Name of the ``index``-th synthetic class: designs first, then numbered variants."""
    design, variant = DESIGNS[index % len(DESIGNS)], index // len(DESIGNS)
    return design if variant == 0 else f"{design}-{variant + 1}"


def _hue_rotation(degrees: float) -> np.ndarray:
    """RGB rotation about the grey axis: changes hue, keeps grey and brightness."""
    axis = np.ones(3) / np.sqrt(3)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.deg2rad(degrees)
    return (
        np.cos(angle) * np.eye(3)
        + np.sin(angle) * cross
        + (1 - np.cos(angle)) * np.outer(axis, axis)
    )


def _style(seed: int, index: int) -> _Style:
    rng = np.random.default_rng([seed, index])
    design, variant = DESIGNS[index % len(DESIGNS)], index // len(DESIGNS)
    rotation = _hue_rotation(137.5 * variant)  # the golden angle keeps variants apart
    dark, light = (
        np.clip(rotation @ np.array(c) * rng.uniform(0.92, 1.08, 3), 0.03, 0.97)
        for c in _BASE_COLOURS[design]
    )
    scale = rng.uniform(0.95, 1.05) if variant == 0 else rng.uniform(0.75, 1.3)
    return _Style(design, dark, light, scale)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) relative to the image centre."""
    axis = np.arange(size) - size / 2 + 0.5
    return np.meshgrid(axis, axis)


def _rotate(x: np.ndarray, y: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    return c * x + s * y, -s * x + c * y


def _smooth_noise(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> np.ndarray:
    """Smooth noise in about -1..1: a (rows, cols) random grid upsampled bicubically."""
    grid = rng.uniform(-1, 1, cells).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))


def _blend(t: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel blend from colour ``a`` (t=0) to colour ``b`` (t=1)."""
    return a + t[..., None] * (b - a)


def _soft(x: np.ndarray, sharpness: float = 3.0) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(sharpness * x)


def _texture_frame(rng: np.random.Generator, style: _Style, size: int, period: float):
    """Rotated, shifted coordinates and a jittered period, in pixels."""
    x, y = _grid(size)
    u, v = _rotate(x, y, rng.uniform(-4, 4))
    period = period * size * style.scale * rng.uniform(0.96, 1.04)
    return u + rng.uniform(0, 2 * period), v + rng.uniform(0, 2 * period), period


def _stripes(rng: np.random.Generator, style: _Style, size: int) -> _Scene:
    u, _, period = _texture_frame(rng, style, size, 0.09)
    t = _soft(np.sin(2 * np.pi * u / period)) * (1 + 0.08 * _smooth_noise(rng, size, (6, 6)))
    return _Scene(_blend(t, style.dark, style.light))


def _grain(rng: np.random.Generator, style: _Style, size: int) -> _Scene:
    u, _, period = _texture_frame(rng, style, size, 0.04)
    warp = 2.5 * period * _smooth_noise(rng, size, (4, 4))
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (u + warp) / period) ** 3
    streaks = _smooth_noise(rng, size, (48, 6)).T  # long fibres along the grain
    return _Scene(
        _blend(np.clip(0.65 * rings + 0.25 * streaks + 0.2, 0, 1), style.dark, style.light)
    )


def _checker(rng: np.random.Generator, style: _Style, size: int) -> _Scene:
    u, v, period = _texture_frame(rng, style, size, 0.12)
    t = _soft(np.sin(np.pi * u / period) * np.sin(np.pi * v / period), 6)
    return _Scene(
        _blend(t * (1 + 0.06 * _smooth_noise(rng, size, (5, 5))), style.dark, style.light)
    )


def _weave(rng: np.random.Generator, style: _Style, size: int) -> _Scene:
    u, v, period = _texture_frame(rng, style, size, 0.1)
    horizontal = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    across = np.where(horizontal, v, u)  # coordinate across the threads of each cell
    along = np.where(horizontal, u, v)
    threads = np.abs(np.sin(np.pi * 4 * across / period)) ** 0.6
    bulge = np.sin(np.pi * (along / period % 1)) ** 0.5  # threads dip at cell borders
    return _Scene(_blend(threads * bulge, style.dark, style.light))


def _dots(rng: np.random.Generator, style: _Style, size: int) -> _Scene:
    u, v, period = _texture_frame(rng, style, size, 0.085)
    # Hexagonal lattice = a rectangular lattice and its copy shifted by half a cell.
    height = period * np.sqrt(3)
    dist = np.minimum(
        np.hypot((u + period / 2) % period - period / 2, (v + height / 2) % height - height / 2),
        np.hypot(u % period - period / 2, v % height - height / 2),
    )
    hole = np.clip(0.3 * period - dist + 0.5, 0, 1)
    plate = 1 + 0.1 * _smooth_noise(rng, size, (3, 3))
    return _Scene(_blend(plate * (1 - hole), style.dark, style.light))


def _box(x: np.ndarray, y: np.ndarray, half_w: float, half_h: float) -> np.ndarray:
    return np.maximum(np.abs(x) - half_w, np.abs(y) - half_h)


def _nut(x: np.ndarray, y: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    hexagon = np.max([np.abs(x * np.cos(a) + y * np.sin(a)) for a in np.deg2rad([0, 60, 120])], 0)
    radius = np.hypot(x, y)
    sdf = np.maximum(hexagon - 0.27 * r, 0.12 * r - radius)
    bevel = np.clip(1 + sdf / (0.035 * r), 0, 1)
    thread = (radius < 0.16 * r) * (0.5 + 0.5 * np.sin(2 * np.pi * radius / (0.012 * r)))
    return sdf, 1 - 0.3 * bevel - 0.15 * thread


def _disc(x: np.ndarray, y: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    a, b = 0.27 * r, 0.2 * r
    sdf = (np.hypot(x / a, y / b) - 1) * b
    groove = np.exp(-((x / (0.008 * r)) ** 2))
    return sdf, 1 - 0.35 * groove - 0.2 * np.clip(1 + sdf / (0.05 * r), 0, 1)


def _ring(x: np.ndarray, y: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    offset = np.hypot(x, y) - 0.24 * r
    sdf = np.abs(offset) - 0.07 * r
    return sdf, 1 + 1.2 * np.exp(-((offset / (0.025 * r)) ** 2))


def _cross(x: np.ndarray, y: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    sdf = np.minimum(_box(x, y, 0.3 * r, 0.085 * r), _box(x, y, 0.085 * r, 0.3 * r))
    return sdf, 1 - 0.3 * np.clip(1 + sdf / (0.03 * r), 0, 1)


def _tile(x: np.ndarray, y: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    corner = 0.05 * r
    q = np.stack([np.abs(x), np.abs(y)]) - (0.3 * r - corner)
    plate = np.hypot(*np.maximum(q, 0)) + np.minimum(q.max(0), 0) - corner
    holes = np.hypot(np.abs(x) - 0.21 * r, np.abs(y) - 0.21 * r) - 0.035 * r
    sdf = np.maximum(plate, -holes)
    emboss = np.exp(-(((np.maximum(np.abs(x), np.abs(y)) - 0.13 * r) / (0.01 * r)) ** 2))
    return sdf, 1 - 0.25 * emboss


_SHAPES: dict[str, Callable] = {
    "nut": _nut,
    "disc": _disc,
    "ring": _ring,
    "cross": _cross,
    "tile": _tile,
}


def _object(rng: np.random.Generator, style: _Style, size: int) -> _Scene:
    """An object with shading and a soft shadow, placed with random pose on a background."""
    shape = _SHAPES[style.design]
    r = size * style.scale * rng.uniform(0.95, 1.05)
    centre = rng.uniform(-0.05, 0.05, 2) * size
    angle = rng.uniform(-8, 8) if style.design == "tile" else rng.uniform(0, 360)
    x, y = _grid(size)

    def local(shift: float) -> tuple[np.ndarray, np.ndarray]:
        return _rotate(x - centre[0] - shift, y - centre[1] - shift, angle)

    sdf, shade = shape(*local(0.0), r)
    shadow_sdf, _ = shape(*local(0.02 * size), r)
    shadow = 0.35 * np.clip(0.5 - shadow_sdf / (0.03 * size), 0, 1)
    background = style.dark * (1 + 0.06 * _smooth_noise(rng, size, (4, 4)))[..., None]
    background = background * (1 - shadow)[..., None]
    light = 1 + 0.15 * np.clip(-(x + y) / (0.4 * size), -1, 1)  # lit from the top left
    surface = (
        style.light * (light * shade * (1 + 0.04 * _smooth_noise(rng, size, (16, 16))))[..., None]
    )
    coverage = np.clip(0.5 - sdf, 0, 1)
    return _Scene(_blend(coverage, background, surface), background, coverage)


_RENDER: dict[str, Callable[[np.random.Generator, _Style, int], _Scene]] = {
    "stripes": _stripes,
    "grain": _grain,
    "checker": _checker,
    "weave": _weave,
    "dots": _dots,
    **{name: _object for name in OBJECTS},
}


def _finish(rng: np.random.Generator, scene: _Scene) -> _Scene:
    """Per-image brightness/colour jitter and sensor noise, applied alike to every layer."""
    gain = rng.uniform(0.95, 1.05) * rng.uniform(0.98, 1.02, 3)
    noise = rng.normal(0, _NOISE, scene.image.shape)
    image = np.clip(scene.image * gain + noise, 0, 1)
    if scene.background is None:
        return _Scene(image)
    return _Scene(image, np.clip(scene.background * gain + noise, 0, 1), scene.coverage)


def _quantise(image: np.ndarray) -> np.ndarray:
    return np.round(image * 255).astype(np.uint8)


def _blob(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float) -> np.ndarray:
    """Irregular round region: radius modulated by a few low harmonics of the angle. Returns
    the normalised distance from the centre (< 1 inside)."""
    x, y = _grid(size)
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


def _on_object(scene: _Scene) -> np.ndarray | bool:
    return True if scene.coverage is None else scene.coverage > 0.5


def _missing(
    rng: np.random.Generator, scene: _Scene, size: int, centre: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A bite out of the object's edge that shows the background."""
    bite = _blob(rng, size, centre, size * rng.uniform(0.08, 0.12)) < 1
    return bite & (scene.coverage > 0), scene.background


def _is_dark(scene: _Scene, region: np.ndarray, threshold: float) -> bool:
    """Whether the surface under ``region`` is dark, so the defect must be bright to show."""
    return bool(region.any()) and scene.image[region].mean() < threshold


def _line(
    rng: np.random.Generator, scene: _Scene, size: int, centre: np.ndarray, kind: str
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
    rng: np.random.Generator, scene: _Scene, size: int, centre: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A pit, darkest in the middle; light (a hole to a lit surface) on dark materials."""
    distance = _blob(rng, size, centre, size * rng.uniform(0.05, 0.08))
    region = (distance < 1) & _on_object(scene)
    depth = 0.12 * np.clip(distance, 0, 1) ** 2
    pit = 0.9 - depth if _is_dark(scene, region, 0.3) else 0.06 + depth
    return region, pit[..., None]


def _stain(
    rng: np.random.Generator, scene: _Scene, size: int, centre: np.ndarray
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


def _defect_centre(rng: np.random.Generator, scene: _Scene, size: int, kind: str) -> np.ndarray:
    """A centre in the middle 70% of the image (survives any center crop); for objects, on the
    object (for "missing": on its edge)."""
    if scene.coverage is None:
        return rng.uniform(-0.35, 0.35, 2) * size
    x, y = _grid(size)
    inner = (np.abs(x) < 0.35 * size) & (np.abs(y) < 0.35 * size)
    candidates = inner & (
        (scene.coverage > 0) & (scene.coverage < 1) if kind == "missing" else (scene.coverage >= 1)
    )
    i = rng.choice(np.flatnonzero(candidates))
    return np.array([x.flat[i], y.flat[i]])


def _defective(
    rng: np.random.Generator, kind: str, scene: _Scene, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image, bool mask of exactly the changed pixels); retries until clearly visible."""
    normal = _quantise(scene.image)
    for _ in range(50):
        centre = _defect_centre(rng, scene, size, kind)
        region, changed = _DEFECTS[kind](rng, scene, size, centre)
        image = _quantise(np.clip(np.where(region[..., None], changed, scene.image), 0, 1))
        mask = (image != normal).any(-1)
        if mask.mean() >= _MIN_DEFECT_AREA:
            return image, mask
    raise RuntimeError(f"could not place a visible {kind} defect on a {scene.image.shape} image")


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_class(out: Path, seed: int, index: int, counts: dict[str, int], size: int) -> list[str]:
    """Write one class; returns its defect types."""
    style = _style(seed, index)
    folder = out / class_name(index)
    defects = TEXTURE_DEFECTS if style.design in TEXTURES else OBJECT_DEFECTS
    for split_id, split in enumerate(("train", "test_good", "test_defect")):
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, index, split_id, i])
            scene = _finish(rng, _RENDER[style.design](rng, style, size))
            name = f"{i:03d}.png"
            if split == "train":
                _save(_quantise(scene.image), folder / "train" / "good" / name)
            elif split == "test_good":
                _save(_quantise(scene.image), folder / "test" / "good" / name)
            else:
                kind = defects[i % len(defects)]
                image, mask = _defective(rng, kind, scene, size)
                _save(image, folder / "test" / kind / name)
                _save(
                    mask.astype(np.uint8) * 255,
                    folder / "ground_truth" / kind / f"{i:03d}_mask.png",
                )
    return list(defects)


def generate(
    out: str | Path,
    classes: int = 3,
    seed: int = 0,
    train: int = 16,
    test_good: int = 8,
    test_defect: int = 12,
    size: int = 256,
) -> list[str]:
    """Write a synthetic MVTec AD layout dataset under ``out``; returns the class names.

    ``out`` must be missing or empty, so no stale class from an earlier run can mix in.
    A ``dataset.json`` next to the classes records how the data was made.
    """
    out = Path(out)
    counts = {"train": train, "test_good": test_good, "test_defect": test_defect}
    for name, value in {"classes": classes, **counts}.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if size < 64:
        raise ValueError(f"size must be at least 64 px, got {size}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: output folder exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    names = [class_name(i) for i in range(classes)]
    # Threads: PNG encoding and large numpy operations release the GIL.
    with ThreadPoolExecutor(max_workers=min(classes, os.cpu_count() or 1)) as pool:
        written = pool.map(lambda i: _write_class(out, seed, i, counts, size), range(classes))
        defects = dict(zip(names, written, strict=True))
    provenance = {
        "generator": "ucad.data.synth",
        "ucad_version": __version__,
        "layout": "mvtec",
        "seed": seed,
        "size": size,
        "counts": counts,
        "classes": names,
        "defects": defects,
    }
    (out / "dataset.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return names
