"""Region label maps, what every structure source (`ucad.structure`) gives: per image an int32
map of the image's height and width whose ids name regions, 0 where no region covers a pixel.

`StructureSource` is what a source is; `paint_masks` turns masks into a map, `patch_labels`
reduces maps to the backbone's patch grid, and `partition_agreement` says how far two sets of
maps agree there.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from tqdm import tqdm


class StructureSource(Protocol):
    """Anything that labels the regions of an image; subclass it to inherit `label_maps`."""

    name: str

    def label_map(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) int32 region ids, 0 = not covered by any region."""
        ...

    def label_maps(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB -> (N, H, W) int32, one `label_map` per image."""
        if images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, 3), got shape {images.shape}")
        maps = np.empty(images.shape[:3], dtype=np.int32)
        for i, image in enumerate(tqdm(images, desc="structure maps", disable=None)):
            maps[i] = self.label_map(image)
        return maps


def check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image must be a uint8 RGB array (H, W, 3), got {image.dtype} {image.shape}"
        )


def paint_masks(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Paint boolean masks largest first with ids 1..n, so smaller masks overwrite larger ones.

    Ties in area keep the given order. Pixels no mask covers stay 0.
    """
    shape = tuple(shape)
    if not masks:
        return np.zeros(shape, dtype=np.int32)
    stack = np.stack(masks).astype(bool)
    if stack.shape[1:] != shape:
        raise ValueError(f"masks have shape {stack.shape[1:]}, expected {shape}")
    order = np.argsort(-stack.sum(axis=(1, 2)), kind="stable")
    ids = np.arange(1, len(masks) + 1, dtype=np.int32)[:, None, None]
    # The last mask painted over a pixel is the covering mask with the highest id.
    return np.where(stack[order], ids, 0).max(axis=0).astype(np.int32)


def patch_labels(label_maps: np.ndarray, patch_size: int) -> np.ndarray:
    """(N, H, W) label maps -> (N, gh*gw) int64: each patch's majority label, row-major.

    Ties go to the smallest id. A vote, not interpolation: every patch label is a real region id.
    """
    if label_maps.ndim != 3 or not np.issubdtype(label_maps.dtype, np.integer):
        raise ValueError(
            f"label_maps must be integer (N, H, W), got {label_maps.dtype} {label_maps.shape}"
        )
    n, height, width = label_maps.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"label maps of size {height}x{width} are not a multiple of {patch_size}")
    gh, gw = height // patch_size, width // patch_size
    patches = label_maps.reshape(n, gh, patch_size, gw, patch_size).transpose(0, 1, 3, 2, 4)
    votes = np.sort(patches.reshape(n * gh * gw, patch_size * patch_size), axis=1)
    # Length of the run of equal ids ending at each position of the sorted row.
    position = np.arange(votes.shape[1])
    starts = np.ones(votes.shape, dtype=bool)
    starts[:, 1:] = votes[:, 1:] != votes[:, :-1]
    run_start = np.maximum.accumulate(np.where(starts, position, 0), axis=1)
    run_length = position - run_start + 1
    # argmax takes the first longest run; rows are sorted, so that is the smallest tied id.
    winner = votes[np.arange(votes.shape[0]), run_length.argmax(axis=1)]
    return winner.astype(np.int64).reshape(n, gh * gw)


def partition_agreement(a: np.ndarray, b: np.ndarray, patch_size: int) -> float:
    """Rand index between two sets of (N, H, W) label maps on the patch grid, averaged over images.

    Each map is reduced with `patch_labels`; for every pair of patches, the two partitions agree
    when both put the pair in one region or both split it. 0 (uncovered) counts as a region like
    any other id. Images with a single patch (no pairs) count as full agreement.
    """
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    patches_a, patches_b = patch_labels(a, patch_size), patch_labels(b, patch_size)
    n_patches = patches_a.shape[1]
    if n_patches < 2:
        return 1.0
    upper = np.triu(np.ones((n_patches, n_patches), dtype=bool), k=1)
    scores = []
    for labels_a, labels_b in zip(patches_a, patches_b, strict=True):
        same_a = labels_a[:, None] == labels_a[None, :]
        same_b = labels_b[:, None] == labels_b[None, :]
        scores.append((same_a == same_b)[upper].mean())
    return float(np.mean(scores))
