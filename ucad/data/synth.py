"""Synthetic MVTec AD layout dataset: textures and simple objects with exact defect masks.

Lets anyone run the whole pipeline without downloading a dataset. Ten designs (five
textures, five objects on a background); further classes are colour and scale variants
("stripes-2", ...). Normal images vary by offset, rotation, scale, colour and noise.
Each defect image gets one defect, and its mask is exactly the set of pixels the defect
changed. Every random draw comes from a generator seeded by (seed, class, split, image),
so the same arguments give byte-identical files.

This module names the classes and writes the dataset; `ucad.data.synth_scenes` draws the normal
images and `ucad.data.synth_defects` the defects.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ucad import __version__
from ucad.data.synth_defects import OBJECT_DEFECTS, TEXTURE_DEFECTS, defective
from ucad.data.synth_scenes import DESIGNS, OBJECTS, TEXTURES, finish, quantise, render, style_of

__all__ = [
    "LAYOUT",
    "DESIGNS",
    "OBJECTS",
    "OBJECT_DEFECTS",
    "TEXTURES",
    "TEXTURE_DEFECTS",
    "class_name",
    "generate",
]

LAYOUT = "mvtec"  # the dataset format `generate` writes


def class_name(index: int) -> str:
    """Name of the ``index``-th synthetic class: designs first, then numbered variants."""
    design, variant = DESIGNS[index % len(DESIGNS)], index // len(DESIGNS)
    return design if variant == 0 else f"{design}-{variant + 1}"


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_class(out: Path, seed: int, index: int, counts: dict[str, int], size: int) -> list[str]:
    """Write one class; returns its defect types."""
    style = style_of(seed, index)
    folder = out / class_name(index)
    defects = TEXTURE_DEFECTS if style.design in TEXTURES else OBJECT_DEFECTS
    for split_id, split in enumerate(("train", "test_good", "test_defect")):
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, index, split_id, i])
            scene = finish(rng, render(rng, style, size))
            name = f"{i:03d}.png"
            if split == "train":
                _save(quantise(scene.image), folder / "train" / "good" / name)
            elif split == "test_good":
                _save(quantise(scene.image), folder / "test" / "good" / name)
            else:
                kind = defects[i % len(defects)]
                image, mask = defective(rng, kind, scene, size)
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

    ``out`` must be missing or empty, so no stale class from an earlier run can mix in, or hold
    the dataset these arguments make (then nothing is written: a rerun is a no-op). A
    ``dataset.json`` next to the classes, written last, records how the data was made.
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
    names = [class_name(i) for i in range(classes)]
    settings = {
        "generator": "ucad.data.synth",
        "ucad_version": __version__,
        "layout": LAYOUT,
        "seed": seed,
        "size": size,
        "counts": counts,
        "classes": names,
    }
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if _made_with(out, settings):  # the same dataset, complete: nothing to write
            return names
        raise ValueError(
            f"{out}: output folder exists and is not empty (and is not a synthetic dataset "
            "made with these settings by this ucad version)"
        )
    out.mkdir(parents=True, exist_ok=True)
    # Threads: PNG encoding and large numpy operations release the GIL.
    with ThreadPoolExecutor(max_workers=min(classes, os.cpu_count() or 1)) as pool:
        written = pool.map(lambda i: _write_class(out, seed, i, counts, size), range(classes))
        defects = dict(zip(names, written, strict=True))
    # written last: it marks a finished dataset
    (out / "dataset.json").write_text(json.dumps({**settings, "defects": defects}, indent=2) + "\n")
    return names


def _made_with(out: Path, settings: dict) -> bool:
    """Whether `out` holds a finished synthetic dataset made with `settings`."""
    try:
        made = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(made, dict) and {key: made.get(key) for key in settings} == settings
