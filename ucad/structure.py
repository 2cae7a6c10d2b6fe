"""Structure maps: per-image region labels whose shared ids make positive pairs in the SCL loss.

A structure source turns one uint8 RGB image (the resized+cropped image the backbone sees) into an
int32 label map of the same height and width; 0 marks pixels no region covers. `patch_labels`
reduces label maps to the backbone's patch grid. Segment Anything is the method's source: `sam`
(`BatchedSamStructure`, batched and computed at the map's size) paints the masks of `sam_reference`
(`SamStructure`, segment-anything's own generator, kept to check it against; see
`partition_agreement` and `compare_with_reference`). The superpixel source needs no weights (smoke
runs, machines without the SAM checkpoint).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from segment_anything.modeling import Sam
from skimage.segmentation import felzenszwalb
from tqdm import tqdm

from ucad.backbone import WeightsUnavailableError
from ucad.sam_masks import SamMaskGenerator, autocast_to


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


def _check_image(image: np.ndarray) -> None:
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


class SuperpixelStructure(StructureSource):
    """Felzenszwalb's graph segmentation: weight-free, deterministic regions.

    Chosen over SLIC after comparing both on natural and texture images at 224x224: SLIC's
    compactness term cuts uniform backgrounds into grid cells and, on grey textures, collapsed to a
    single region, while Felzenszwalb follows object boundaries (a cup, its saucer, a cat's eyes,
    single bricks), closer to what SAM's masks give the contrastive loss.
    Felzenszwalb has no region count, so `n_segments` sets the smallest region to half of the
    mean size of `n_segments` equal regions (so about 2 * n_segments regions at most).
    """

    name = "superpixel"

    def __init__(self, n_segments: int = 32, scale: float = 300.0, sigma: float = 0.8) -> None:
        if n_segments < 1:
            raise ValueError(f"n_segments must be >= 1, got {n_segments}")
        self.n_segments = n_segments
        self.scale = scale
        self.sigma = sigma

    def label_map(self, image: np.ndarray) -> np.ndarray:
        _check_image(image)
        min_size = image.shape[0] * image.shape[1] // (2 * self.n_segments)
        regions = felzenszwalb(image, scale=self.scale, sigma=self.sigma, min_size=min_size)
        return (regions + 1).astype(np.int32)  # every pixel is covered: ids start at 1


@dataclass(frozen=True)
class SamCheckpoint:
    """Where an official SAM checkpoint lives and the SHA-256 of its bytes."""

    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# SHA-256 of Meta's released files (the name's hex suffix is not a SHA-256 prefix).
SAM_CHECKPOINTS: dict[str, SamCheckpoint] = {
    "vit_b": SamCheckpoint(
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    "vit_l": SamCheckpoint(
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "vit_h": SamCheckpoint(
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
}


def default_cache_dir() -> Path:
    """`$UCAD_CACHE`, else ~/.cache/ucad."""
    return Path(os.environ.get("UCAD_CACHE", Path.home() / ".cache" / "ucad")).expanduser()


def resolve_sam_checkpoint(
    model_type: str, checkpoint: str | Path | None, cache_dir: Path | None = None
) -> Path:
    """The SAM checkpoint file to load: `checkpoint` as given, else the cached official file.

    The official file is downloaded once into `<cache_dir>/sam/` (cache_dir defaults to
    `default_cache_dir()`) and its SHA-256 checked before it is moved into place.
    """
    if model_type not in SAM_CHECKPOINTS:
        raise ValueError(
            f"unknown SAM model_type {model_type!r}; choose from {list(SAM_CHECKPOINTS)}"
        )
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: SAM checkpoint not found (sam_checkpoint)")
        return path
    official = SAM_CHECKPOINTS[model_type]
    path = (cache_dir or default_cache_dir()) / "sam" / official.filename
    if not path.is_file():
        _download_checked(official, path)
    return path


def _download_checked(official: SamCheckpoint, path: Path) -> None:
    """Stream the file to a temp file next to `path`, check its SHA-256, then rename into place.

    Nothing but the verified file is ever left in the cache.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".part")
    part = Path(name)
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                digest = _fetch(official.url, out)
        except (urllib.error.URLError, OSError) as err:
            raise WeightsUnavailableError(
                f"could not download the SAM checkpoint from {official.url}: {err}\n"
                f"Download it yourself and either set `sam_checkpoint: /path/to/{path.name}` in a "
                f"config file (--config), or put it at {path}."
            ) from err
        if digest != official.sha256:
            raise WeightsUnavailableError(
                f"{official.url}: downloaded file has SHA-256 {digest}, expected "
                f"{official.sha256}; it was deleted. Try again, or provide the file yourself "
                f"(`sam_checkpoint: /path/to/{path.name}` in a config file, or put it at {path})."
            )
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def _fetch(url: str, out: BinaryIO) -> str:
    """Copy `url` into `out`; returns the SHA-256 of the bytes written."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=url, disable=None) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


def load_sam_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Load a state-dict file into `model`: tensors only (weights_only), every key must match."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle refusals and corrupt archives raise several types
        raise ValueError(f"{checkpoint}: not a loadable tensor-only state dict ({err})") from err
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(
            f"{checkpoint}: weights do not fit this SAM model "
            f"(wrong model_type for the file?)\n{err}"
        ) from err


def load_sam(model_type: str, checkpoint: Path) -> Sam:
    """The SAM `model_type` with the weights in `checkpoint`, loaded tensors-only."""
    # The registry's builders call torch.load without weights_only: build empty, load safely.
    model = sam_model_registry[model_type](checkpoint=None)
    load_sam_weights(model, checkpoint)
    return model


_Source = TypeVar("_Source", bound="_SamSource")


class _SamSource(StructureSource):
    """What both SAM sources share: building from a checkpoint name or file."""

    @classmethod
    def from_checkpoint(
        cls: type[_Source],
        model_type: str = "vit_b",
        checkpoint: str | Path | None = None,
        cache_dir: Path | None = None,
        **params,
    ) -> _Source:
        """SAM `model_type` with its weights from `checkpoint`, or the verified download cache."""
        path = resolve_sam_checkpoint(model_type, checkpoint, cache_dir)
        return cls(load_sam(model_type, path), **params)


class _AutocastEncoderPredictor(SamPredictor):
    """A SamPredictor whose image encoder runs under autocast; features come back float32."""

    def __init__(self, model: Sam, dtype: torch.dtype) -> None:
        super().__init__(model)
        self.dtype = dtype

    def set_torch_image(
        self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]
    ) -> None:
        with autocast_to(self.device, self.dtype):
            super().set_torch_image(transformed_image, original_image_size)
        self.features = self.features.float()


class SamStructure(_SamSource):
    """Segment Anything's automatic mask generator, its masks painted by `paint_masks`.

    The reference for `BatchedSamStructure`: one image at a time, as segment-anything runs it.
    `autocast_dtype` applies to the image encoder only: the generator's post-processing cannot
    take bfloat16 tensors (`MaskData.to_numpy`).
    """

    name = "sam_reference"

    def __init__(
        self,
        model: Sam,
        device: torch.device | str | None = None,
        points_per_side: int = 32,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
        points_per_batch: int = 64,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.autocast_dtype = autocast_dtype
        self.model = model.to(device).eval()
        self.generator = SamAutomaticMaskGenerator(
            self.model,
            points_per_side=points_per_side,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            box_nms_thresh=box_nms_thresh,
            points_per_batch=points_per_batch,
        )
        if autocast_dtype is not None:
            self.generator.predictor = _AutocastEncoderPredictor(self.model, autocast_dtype)
        # The generator keeps the current image's embedding between calls: one image at a time.
        self._lock = threading.Lock()

    def label_map(self, image: np.ndarray) -> np.ndarray:
        _check_image(image)
        with self._lock:
            masks = [mask["segmentation"] for mask in self.generator.generate(image)]
        return paint_masks(masks, image.shape[:2])


class BatchedSamStructure(_SamSource):
    """SAM's automatic masks from `SamMaskGenerator`: images batched, maps at the image's size.

    Paints the same masks in the same order as `SamStructure` (see `ucad.sam_masks` for the
    differences in how they are computed). `batch_size` images go through the encoder at once.
    """

    name = "sam"

    def __init__(
        self,
        model: Sam,
        device: torch.device | str | None = None,
        points_per_side: int = 32,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
        points_per_batch: int = 64,
        autocast_dtype: torch.dtype | None = None,
        batch_size: int = 4,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.generator = SamMaskGenerator(
            model,
            device=device,
            points_per_side=points_per_side,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            box_nms_thresh=box_nms_thresh,
            points_per_batch=points_per_batch,
            autocast_dtype=autocast_dtype,
        )
        self.model = self.generator.model

    def label_map(self, image: np.ndarray) -> np.ndarray:
        return self.label_maps(image[None])[0]

    def label_maps(self, images: np.ndarray) -> np.ndarray:
        if images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, 3), got shape {images.shape}")
        for image in images[:1]:
            _check_image(image)  # one array: one dtype and shape for all
        maps = np.empty(images.shape[:3], dtype=np.int32)
        batches = range(0, len(images), self.batch_size)
        for start in tqdm(batches, desc="structure maps", disable=None):
            batch = images[start : start + self.batch_size]
            for i, masks in enumerate(self.generator.generate(batch, len(batch))):
                maps[start + i] = paint_masks(list(masks.cpu().numpy()), images.shape[1:3])
        return maps


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


def compare_with_reference(
    fast: StructureSource, reference: StructureSource, images: np.ndarray, patch_size: int
) -> dict[str, float]:
    """Time both sources on the same images and measure how far their partitions agree.

    `regions_per_image` is the mean count of distinct non-zero ids in the fast maps: an agreement
    of 1.0 on maps without regions says nothing. The reference runs first, so one-time start-up
    costs (CUDA context, kernel selection) fall on it: warm the device up first for fair numbers.
    """
    start = time.perf_counter()
    reference_maps = reference.label_maps(images)
    reference_s = time.perf_counter() - start
    start = time.perf_counter()
    fast_maps = fast.label_maps(images)
    fast_s = time.perf_counter() - start
    regions = [np.count_nonzero(np.unique(labels)) for labels in fast_maps]
    return {
        "reference_s_per_image": reference_s / len(images),
        "s_per_image": fast_s / len(images),
        "speedup": reference_s / fast_s if fast_s > 0 else float("inf"),
        "agreement": partition_agreement(fast_maps, reference_maps, patch_size),
        "regions_per_image": float(np.mean(regions)),
    }


STRUCTURE_SOURCES: dict[str, Callable[..., StructureSource]] = {
    "sam": BatchedSamStructure.from_checkpoint,
    "sam_reference": SamStructure.from_checkpoint,
    "superpixel": SuperpixelStructure,
}


def make_structure_source(kind: str, **params) -> StructureSource:
    """Build the structure source named `kind` with its builder's keyword `params`."""
    if kind not in STRUCTURE_SOURCES:
        raise ValueError(
            f"unknown structure source {kind!r}; choose from {list(STRUCTURE_SOURCES)}"
        )
    return STRUCTURE_SOURCES[kind](**params)
