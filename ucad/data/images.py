"""The one image/mask loading path of ucad and the one geometry (resize + center crop).

Every pixel the model sees and every ground-truth mask it is scored against goes through
:func:`load_image` / :func:`load_mask` and one :class:`Geometry`, so an image and its mask
can never disagree about which pixels they cover.

Sizes are ``(width, height)`` as in PIL; arrays are ``(height, width[, channels])``.
EXIF orientation tags are deliberately ignored: masks are drawn on the stored pixel grid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from ucad.data.datasets import TestSample

log = logging.getLogger(__name__)

MIN_SIZE = 32
# PIL reports broken files as OSError (truncated data, unknown format), SyntaxError (broken
# PNG chunks), ValueError or DecompressionBombError (absurd sizes).
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_HIGH_DEPTH_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _read(path: Path) -> Image.Image:
    """Open and fully decode ``path``, so broken files fail here and not deep in a model."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()  # decoded pixels stay usable after the file is closed
    except _READ_ERRORS as err:
        raise ValueError(f"{path}: cannot read image: {err}") from err
    return img


def _check_size(img: Image.Image, name: str | Path, min_size: int) -> Image.Image:
    if min(img.size) < min_size:
        raise ValueError(
            f"{name}: image is {img.width}x{img.height} px, "
            f"smaller than the minimum of {min_size} px per side"
        )
    return img


def _gray16_to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16-bit gray to 8 bit (65535 -> 255, 257*k -> k) instead of clipping it."""
    values = np.asarray(img).astype(np.int64)
    return Image.fromarray(np.clip((values + 128) // 257, 0, 255).astype(np.uint8))


def load_image(path: str | Path, min_size: int = MIN_SIZE) -> Image.Image:
    """Read one image as an 8-bit RGB PIL image, converted and checked as :func:`to_rgb` does.

    Unreadable files raise ``ValueError``.
    """
    path = Path(path)
    return to_rgb(_read(path), path, min_size)


def to_rgb(img: Image.Image, name: str | Path = "image", min_size: int = MIN_SIZE) -> Image.Image:
    """A decoded image as 8-bit RGB; ``name`` says which image in messages and logs.

    Gray, palette, 1-bit, CMYK and alpha images are converted (alpha is dropped, not
    composited); 16-bit gray is scaled to 8 bit. Images smaller than ``min_size`` on either
    side and float images raise ``ValueError``.
    """
    _check_size(img, name, min_size)
    if img.mode == "RGB":
        return img
    if img.mode == "F":
        raise ValueError(f"{name}: cannot read image: floating-point images are not supported")
    log.info("%s: converting %s image to RGB", name, img.mode)
    if img.mode in _HIGH_DEPTH_GRAY:
        img = _gray16_to_8bit(img)
    elif img.mode in ("P", "PA", "LA"):
        # Via RGBA so palette transparency is read, not warned about.
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_mask(path: str | Path, min_size: int = MIN_SIZE) -> np.ndarray:
    """Read a ground-truth mask as bool ``(H, W)``: any nonzero pixel (any channel) is defect."""
    path = Path(path)
    img = _check_size(_read(path), path, min_size)
    if img.mode == "LA":
        return np.asarray(img)[..., 0] != 0
    if len(img.getbands()) == 1 and img.mode != "P":
        return np.asarray(img) != 0
    # Palette and colour masks: a pixel is defect when its colour is not black (alpha ignored).
    return np.asarray(img.convert("RGB")).any(axis=-1)


@dataclass(frozen=True)
class Geometry:
    """Resize the shorter side to ``resize`` px, then center crop ``crop`` x ``crop``.

    Rounding follows torchvision (longer side truncated, crop offset rounded), the transform
    timm's pretrained configs are defined with.
    """

    resize: int
    crop: int
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"

    def __post_init__(self) -> None:
        if not 0 < self.crop <= self.resize:
            raise ValueError(
                f"geometry needs 0 < crop <= resize, got crop={self.crop}, resize={self.resize}"
            )
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; use one of {sorted(_INTERPOLATION)}"
            )

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """``(width, height)`` after resizing the shorter side of ``size`` to ``resize``."""
        width, height = size
        if width <= height:
            return self.resize, int(self.resize * height / width)
        return int(self.resize * width / height), self.resize

    def crop_box(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of the crop, in resized coordinates."""
        width, height = self.resized_size(size)
        left = int(round((width - self.crop) / 2))
        top = int(round((height - self.crop) / 2))
        return left, top, left + self.crop, top + self.crop

    def image(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 ``(crop, crop, 3)``."""
        if img.mode != "RGB":
            raise ValueError(f"geometry expects an RGB image, got mode {img.mode}")
        resized = img.resize(self.resized_size(img.size), _INTERPOLATION[self.interpolation])
        return np.asarray(resized.crop(self.crop_box(img.size)))

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """Bool ``(H, W)`` mask -> bool ``(crop, crop)``; nearest neighbour, same crop as images."""
        if mask.ndim != 2:
            raise ValueError(f"geometry expects a 2-D mask, got shape {mask.shape}")
        img = Image.fromarray(mask.astype(np.uint8) * 255)
        resized = img.resize(self.resized_size(img.size), Image.Resampling.NEAREST)
        return np.asarray(resized.crop(self.crop_box(img.size))) > 0


@dataclass(frozen=True, eq=False)
class TestSet:
    """A task's test images as arrays, in the order of its samples."""

    __test__ = False  # not a pytest test class

    images: np.ndarray  # uint8 (N, crop, crop, 3)
    masks: np.ndarray | None  # bool (N, crop, crop); None: the dataset has no pixel ground truth
    labels: np.ndarray  # int64 (N,), 1 = anomalous


def _parallel(function, items: Sequence, workers: int) -> list:
    """``[function(item) ...]`` in order; threads, because PIL decoding releases the GIL."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(function, items))


def load_images(paths: Sequence[str | Path], geometry: Geometry, workers: int = 4) -> np.ndarray:
    """Load, convert and crop images: uint8 ``(N, crop, crop, 3)``, in the order of ``paths``."""
    out = np.empty((len(paths), geometry.crop, geometry.crop, 3), dtype=np.uint8)
    for i, image in enumerate(_parallel(lambda p: geometry.image(load_image(p)), paths, workers)):
        out[i] = image
    return out


def _load_pair(sample: TestSample, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    img = load_image(sample.image)
    if sample.mask is None:
        return geometry.image(img), np.zeros((geometry.crop, geometry.crop), dtype=bool)
    mask = load_mask(sample.mask)
    if mask.shape != (img.height, img.width):
        raise ValueError(
            f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} px but its image "
            f"{sample.image} is {img.width}x{img.height} px"
        )
    return geometry.image(img), geometry.mask(mask)


def load_test_set(samples: Sequence[TestSample], geometry: Geometry, workers: int = 4) -> TestSet:
    """Load test images with their masks (all-False for normal images) and labels.

    Pixel ground truth is all or nothing: if no anomalous sample has a mask, ``masks`` is None
    (image metrics only); if only some have one, that is a ``ValueError``.
    """
    missing = [s.image for s in samples if s.label == 1 and s.mask is None]
    anomalous = sum(s.label == 1 for s in samples)
    if missing and len(missing) < anomalous:
        raise ValueError(
            f"{len(missing)} of {anomalous} anomalous images have no mask, e.g. {missing[0]}; "
            "provide masks for all anomalous images or for none"
        )
    images = np.empty((len(samples), geometry.crop, geometry.crop, 3), dtype=np.uint8)
    masks = np.empty((len(samples), geometry.crop, geometry.crop), dtype=bool)
    for i, (image, mask) in enumerate(
        _parallel(lambda s: _load_pair(s, geometry), samples, workers)
    ):
        images[i], masks[i] = image, mask
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return TestSet(images=images, masks=None if missing else masks, labels=labels)
