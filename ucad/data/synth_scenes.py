"""Normal images of the synthetic dataset (`ucad.data.synth`): five textures and five objects on
a background, each class a colour and scale `Style`, each image a random pose, colour and noise.

`render(rng, style, size)` draws one image as a `Scene`, which keeps what the defects of
`ucad.data.synth_defects` need besides the image (an object's background and coverage);
`finish` adds the per-image jitter and sensor noise, `quantise` makes it uint8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

TEXTURES = ("stripes", "grain", "checker", "weave", "dots")
OBJECTS = ("nut", "disc", "ring", "cross", "tile")
# Textures and objects alternate so that even a 2- or 3-class stream mixes both kinds.
DESIGNS = tuple(d for pair in zip(TEXTURES, OBJECTS, strict=True) for d in pair)

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
_NOISE = 0.015  # sensor noise, std in 0..1 units


@dataclass(frozen=True)
class Style:
    """What all images of one class share."""

    design: str
    dark: np.ndarray  # background / dark colour, (3,)
    light: np.ndarray  # object / light colour, (3,)
    scale: float  # geometric scale of the class (variants differ)


@dataclass(frozen=True)
class Scene:
    """A rendered normal image; objects also keep their background and coverage."""

    image: np.ndarray  # float (H, W, 3) in 0..1
    background: np.ndarray | None = None  # objects: the image without the object
    coverage: np.ndarray | None = None  # objects: fraction of each pixel the object covers


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


def style_of(seed: int, index: int) -> Style:
    """Class `index`'s design, colours and scale, drawn from (seed, index) alone."""
    rng = np.random.default_rng([seed, index])
    design, variant = DESIGNS[index % len(DESIGNS)], index // len(DESIGNS)
    rotation = _hue_rotation(137.5 * variant)  # the golden angle keeps variants apart
    dark, light = (
        np.clip(rotation @ np.array(c) * rng.uniform(0.92, 1.08, 3), 0.03, 0.97)
        for c in _BASE_COLOURS[design]
    )
    scale = rng.uniform(0.95, 1.05) if variant == 0 else rng.uniform(0.75, 1.3)
    return Style(design, dark, light, scale)


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
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


def _texture_frame(rng: np.random.Generator, style: Style, size: int, period: float):
    """Rotated, shifted coordinates and a jittered period, in pixels."""
    x, y = grid(size)
    u, v = _rotate(x, y, rng.uniform(-4, 4))
    period = period * size * style.scale * rng.uniform(0.96, 1.04)
    return u + rng.uniform(0, 2 * period), v + rng.uniform(0, 2 * period), period


def _stripes(rng: np.random.Generator, style: Style, size: int) -> Scene:
    u, _, period = _texture_frame(rng, style, size, 0.09)
    t = _soft(np.sin(2 * np.pi * u / period)) * (1 + 0.08 * _smooth_noise(rng, size, (6, 6)))
    return Scene(_blend(t, style.dark, style.light))


def _grain(rng: np.random.Generator, style: Style, size: int) -> Scene:
    u, _, period = _texture_frame(rng, style, size, 0.04)
    warp = 2.5 * period * _smooth_noise(rng, size, (4, 4))
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (u + warp) / period) ** 3
    streaks = _smooth_noise(rng, size, (48, 6)).T  # long fibres along the grain
    return Scene(
        _blend(np.clip(0.65 * rings + 0.25 * streaks + 0.2, 0, 1), style.dark, style.light)
    )


def _checker(rng: np.random.Generator, style: Style, size: int) -> Scene:
    u, v, period = _texture_frame(rng, style, size, 0.12)
    t = _soft(np.sin(np.pi * u / period) * np.sin(np.pi * v / period), 6)
    return Scene(_blend(t * (1 + 0.06 * _smooth_noise(rng, size, (5, 5))), style.dark, style.light))


def _weave(rng: np.random.Generator, style: Style, size: int) -> Scene:
    u, v, period = _texture_frame(rng, style, size, 0.1)
    horizontal = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    across = np.where(horizontal, v, u)  # coordinate across the threads of each cell
    along = np.where(horizontal, u, v)
    threads = np.abs(np.sin(np.pi * 4 * across / period)) ** 0.6
    bulge = np.sin(np.pi * (along / period % 1)) ** 0.5  # threads dip at cell borders
    return Scene(_blend(threads * bulge, style.dark, style.light))


def _dots(rng: np.random.Generator, style: Style, size: int) -> Scene:
    u, v, period = _texture_frame(rng, style, size, 0.085)
    # Hexagonal lattice = a rectangular lattice and its copy shifted by half a cell.
    height = period * np.sqrt(3)
    dist = np.minimum(
        np.hypot((u + period / 2) % period - period / 2, (v + height / 2) % height - height / 2),
        np.hypot(u % period - period / 2, v % height - height / 2),
    )
    hole = np.clip(0.3 * period - dist + 0.5, 0, 1)
    plate = 1 + 0.1 * _smooth_noise(rng, size, (3, 3))
    return Scene(_blend(plate * (1 - hole), style.dark, style.light))


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


def _object(rng: np.random.Generator, style: Style, size: int) -> Scene:
    """An object with shading and a soft shadow, placed with random pose on a background."""
    shape = _SHAPES[style.design]
    r = size * style.scale * rng.uniform(0.95, 1.05)
    centre = rng.uniform(-0.05, 0.05, 2) * size
    angle = rng.uniform(-8, 8) if style.design == "tile" else rng.uniform(0, 360)
    x, y = grid(size)

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
    return Scene(_blend(coverage, background, surface), background, coverage)


_RENDER: dict[str, Callable[[np.random.Generator, Style, int], Scene]] = {
    "stripes": _stripes,
    "grain": _grain,
    "checker": _checker,
    "weave": _weave,
    "dots": _dots,
    **{name: _object for name in OBJECTS},
}


def render(rng: np.random.Generator, style: Style, size: int) -> Scene:
    """One normal image of the class `style` describes, before `finish`."""
    return _RENDER[style.design](rng, style, size)


def finish(rng: np.random.Generator, scene: Scene) -> Scene:
    """Per-image brightness/colour jitter and sensor noise, applied alike to every layer."""
    gain = rng.uniform(0.95, 1.05) * rng.uniform(0.98, 1.02, 3)
    noise = rng.normal(0, _NOISE, scene.image.shape)
    image = np.clip(scene.image * gain + noise, 0, 1)
    if scene.background is None:
        return Scene(image)
    return Scene(image, np.clip(scene.background * gain + noise, 0, 1), scene.coverage)


def quantise(image: np.ndarray) -> np.ndarray:
    return np.round(image * 255).astype(np.uint8)
