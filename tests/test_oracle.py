"""An end-to-end oracle: every entry of every results matrix of a stream, recomputed from the
stored artifacts and the dataset files by code that shares nothing with ucad's evaluation.

The reference below reads the dataset files itself (labels from the folder names, masks with
PIL), routes each image from its frozen features and every class's stored keys (exact
distances), scores it under the class it chose (prompted features, nearest knowledge vector,
PatchCore's re-weighting, written from its definition), rebuilds the anomaly maps from the
stored patch scores (bilinear upsampling, then scipy's Gaussian filter) and computes the metrics
with scikit-learn and an AUPRO written from MVTec AD's definition. Only the backbone's forward
pass is ucad's.

The stream has a class, `mixed`, whose test set holds another class's test images as well:
routing is then imperfect, so one evaluation assembles the scores of two classes.

Other test files import the reference helpers (names not starting with `test`).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from ucad.cli import main
from ucad.config import load_config
from ucad.metrics import METRICS
from ucad.pipeline import Runtime
from ucad.stages.features import extract_features
from ucad.stages.routing import rows_of
from ucad.store import ArtifactStore

SMOKE = {"epochs": 1, "key_size": 32, "knowledge_size": 64}
IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "aupro")


# Ground truth, read from the dataset files -------------------------------------------------------


@dataclass(frozen=True)
class Truth:
    """One class's test set as the files say, sorted by image path (ucad's order)."""

    images: list[Path]
    labels: np.ndarray  # 1: anomalous (any folder but test/good)
    masks: np.ndarray | None  # bool (N, size, size); None: no pixel ground truth


def read_truth(class_dir: Path, size: int) -> Truth:
    """Test images of an MVTec-layout class, their labels and their masks at `size` px."""
    images = sorted(p for p in (class_dir / "test").glob("*/*.png"))
    labels = np.array([p.parent.name != "good" for p in images], dtype=np.int64)
    masks = np.zeros((len(images), size, size), dtype=bool)
    for i, image in enumerate(images):
        if labels[i]:
            path = class_dir / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
            with Image.open(path) as mask:  # square images: the centre crop is the whole image
                masks[i] = np.asarray(mask.convert("L").resize((size, size), Image.NEAREST)) > 0
    return Truth(images, labels, masks)


def load_pixels(paths: list[Path], size: int) -> np.ndarray:
    """uint8 (N, size, size, 3): each square image resized bicubically, as the model sees it."""
    out = []
    for path in paths:
        with Image.open(path) as image:
            out.append(np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC)))
    return np.stack(out)


# Scores, routing and maps from their definitions -------------------------------------------------


def exact_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (A, B), computed by differences in float64 (no norm expansion)."""
    return torch.cdist(a.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist")


def routing_distances(frozen: torch.Tensor, keys: list[torch.Tensor]) -> np.ndarray:
    """(N, T): per image, the sum over its patches of the distance to class t's nearest key."""
    return np.stack(
        [
            np.array([exact_distances(f, k).min(dim=1).values.sum().item() for f in frozen])
            for k in keys
        ],
        axis=1,
    )


def reference_scores(
    prompted: torch.Tensor, knowledge: torch.Tensor, neighbours: int
) -> tuple[np.ndarray, np.ndarray]:
    """Patch scores (N, P) and re-weighted image scores (N,) (PatchCore, Roth et al. eq. 7).

    Image score: s* = the largest patch distance to the knowledge, of patch m_test, whose nearest
    knowledge vector is m*; w = 1 - exp(|m_test - m*|) / sum over the `neighbours` knowledge
    vectors nearest m* (m* among them) of exp(|m_test - m|); score = w * s*.
    """
    patch, image = [], []
    bank = knowledge.double()
    for features in prompted:
        distances = exact_distances(features, bank)  # (P, K)
        nearest = distances.min(dim=1)
        patch.append(nearest.values.numpy())
        top = int(nearest.values.argmax())
        star = int(nearest.indices[top])
        support = exact_distances(bank[star : star + 1], bank)[0].argsort()[:neighbours]
        # exp(d*) / sum exp(d) as 1 / sum exp(d - d*): no overflow for large raw distances
        excess = distances[top, support] - distances[top, star]
        weight = 1 - 1 / torch.exp(excess).sum().item()
        image.append(weight * nearest.values[top].item())
    return np.stack(patch), np.array(image)


def bilinear_matrix(size: int, cells: int) -> np.ndarray:
    """(size, cells) weights of bilinear upsampling with half-pixel centres (align_corners off):
    output pixel o samples the grid at (o + 0.5) * cells / size - 0.5, clamped to the edges."""
    weights = np.zeros((size, cells))
    source = np.clip((np.arange(size) + 0.5) * cells / size - 0.5, 0, cells - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, cells - 1)
    share = source - low
    np.add.at(weights, (np.arange(size), low), 1 - share)
    np.add.at(weights, (np.arange(size), high), share)
    return weights


def reference_maps(patch: np.ndarray, grid: tuple[int, int], size: int, sigma: float) -> np.ndarray:
    """README: the patch grid upsampled bilinearly to the image size, then a Gaussian blur of
    `sigma` with kernel radius ceil(4 sigma) and mirrored borders."""
    rows, columns = bilinear_matrix(size, grid[0]), bilinear_matrix(size, grid[1])
    radius = min(math.ceil(4 * sigma), size - 1)
    maps = []
    for scores in patch.astype(np.float64):
        upsampled = rows @ scores.reshape(grid) @ columns.T
        maps.append(ndimage.gaussian_filter(upsampled, sigma, mode="mirror", radius=radius))
    return np.stack(maps)


# Metrics ------------------------------------------------------------------------------------------


def f1_max_reference(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0)
    return float(f1.max())


def aupro_reference(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """MVTec AD's AUPRO: regions are the 8-connected components of each image's mask; at each
    threshold t (every distinct map value), PRO is the mean over all regions of the share of the
    region's pixels scoring >= t and FPR the share of normal pixels scoring >= t. The curve from
    (0, 0) is integrated (trapezoids) up to FPR `limit`, interpolated there, divided by `limit`."""
    regions = []
    for image_map, mask in zip(maps, masks, strict=True):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [np.sort(image_map[labelled == r]) for r in range(1, count + 1)]
    thresholds = np.unique(maps)[::-1]
    normal = np.sort(maps[~masks])

    def share_at_least(sorted_values: np.ndarray) -> np.ndarray:
        return 1 - np.searchsorted(sorted_values, thresholds, side="left") / sorted_values.size

    fpr = np.concatenate([[0.0], share_at_least(normal)])
    pro = np.concatenate([[0.0], np.mean([share_at_least(r) for r in regions], axis=0)])
    after = int(np.searchsorted(fpr, limit, side="right"))
    x, y = fpr[:after], pro[:after]
    if after < fpr.size and x[-1] < limit:
        y_limit = y[-1] + (pro[after] - y[-1]) * (limit - x[-1]) / (fpr[after] - x[-1])
        x, y = np.append(x, limit), np.append(y, y_limit)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / limit)


def reference_metrics(
    image_scores: np.ndarray,
    maps: np.ndarray,
    truth: Truth,
    selected: np.ndarray,
    j: int,
) -> dict[str, float | None]:
    """Every figure of one results-matrix entry; None where the README says null."""
    labels = truth.labels
    figures: dict[str, float | None] = {
        "image_auroc": float(roc_auc_score(labels, image_scores)),
        "image_ap": float(average_precision_score(labels, image_scores)),
        "image_f1max": f1_max_reference(labels, image_scores),
        "routing_accuracy": float(np.mean(selected == j)),
        **dict.fromkeys(PIXEL_METRICS),
    }
    if truth.masks is not None:
        pixels, flat_maps = truth.masks.ravel(), maps.ravel()
        figures["pixel_auroc"] = float(roc_auc_score(pixels, flat_maps))
        figures["pixel_ap"] = float(average_precision_score(pixels, flat_maps))
        figures["aupro"] = aupro_reference(maps, truth.masks)
    return figures


def forgetting_reference(matrix: list[list[float | None]]) -> float | None:
    """Chaudhry et al.: mean over earlier classes of (best earlier figure - last figure)."""
    k = len(matrix) - 1
    if k < 1:
        return None
    drops = [max(matrix[row][j] for row in range(j, k)) - matrix[k][j] for j in range(k)]
    return float(np.mean(drops))


# Stored artifacts, found by what they are made of -----------------------------------------------


def find(store: ArtifactStore, stage: str, **inputs) -> list:
    """The artifacts of `stage` whose recorded inputs include `inputs`."""
    found = []
    for _, digest in store.artifacts(stage):
        artifact = store.get(stage, digest)
        recorded = artifact.attrs["inputs"]
        if all(recorded.get(k) == v for k, v in inputs.items()):
            found.append(artifact)
    return found


def stored_patches(store, entry: dict, scored_as: dict, rows: np.ndarray, patches: int) -> tuple:
    """Patch and image scores of test images `rows` of class `entry` under class `scored_as`,
    from the agnostic `scores` artifacts that hold them (each that does must agree)."""
    patch = np.full((len(rows), patches), np.nan, dtype=np.float32)
    image = np.full(len(rows), np.nan, dtype=np.float32)
    candidates = find(
        store,
        "scores",
        test=entry["data"]["test"],
        prompts=scored_as["prompts"],
        knowledge=scored_as["knowledge"],
        routing="agnostic",
    )
    for artifact in candidates:
        index = artifact.array("index")
        held = np.isin(rows, index)
        at = np.searchsorted(index, rows[held])
        seen = held & ~np.isnan(image)
        if seen.any():
            again = np.searchsorted(index, rows[seen])
            np.testing.assert_array_equal(image[seen], artifact.array("image")[again])
        patch[held] = artifact.array("patch")[at]
        image[held] = artifact.array("image")[at]
    assert not np.isnan(image).any(), (
        f"no scores artifact of {entry['name']} under {scored_as['name']} holds every image "
        f"that chose it: {rows[np.isnan(image)]}"
    )
    return patch, image


def stored_routing(store: ArtifactStore, tasks: list[dict], j: int):
    """The stored frozen features of class j's test set, and its rows of the version's stored
    routing (every class of `tasks`): per image the least distance total, and the class chosen."""
    (features,) = find(store, "features", test=tasks[j]["data"]["test"])
    (routed,) = find(store, "routing", keys=[t["keys"] for t in tasks])
    assert routed.attrs["inputs"]["features"][j] == features.digest
    rows = rows_of(routed.array("offsets"), j)
    return features, routed.array("best")[rows], routed.array("selected")[rows]


def stored_evaluation(store: ArtifactStore, tasks: list[dict], j: int, selected: np.ndarray):
    """The agnostic evaluation of class j that says it was made of exactly this choice."""
    evaluations = [
        e
        for e in find(store, "evaluate", test=tasks[j]["data"]["test"], j=j, routing="agnostic")
        if np.array_equal(e.array("selected"), selected)
    ]
    assert len(evaluations) == 1, (
        f"{tasks[j]['name']} in a {len(tasks)}-class version: no evaluation made of the choice "
        f"{selected.tolist()}"
    )
    return evaluations[0]


def stored_scores(store, tasks: list[dict], j: int, selected: np.ndarray, patches: int):
    """Patch (N, P) and image (N,) scores of class j's test images, each under the class it
    chose, from the stored `scores` artifacts."""
    patch = np.empty((len(selected), patches), dtype=np.float32)
    image = np.empty(len(selected), dtype=np.float32)
    for t in np.unique(selected):
        rows = np.flatnonzero(selected == t)
        patch[rows], image[rows] = stored_patches(store, tasks[j], tasks[t], rows, patches)
    return patch, image


@dataclass
class Entry:
    """One results-matrix entry, recomputed."""

    selected: np.ndarray
    image_scores: np.ndarray  # from the stored evaluation, checked against the reference
    maps: np.ndarray
    truth: Truth
    figures: dict[str, float | None]


def recompute_entry(
    store: ArtifactStore,
    rt: Runtime,
    tasks: list[dict],
    j: int,
    truth: Truth,
    rescore: bool,
    memo: dict | None = None,
) -> Entry:
    """Entry (version of `tasks`, class j) from the stored artifacts and the files.

    `rescore`: also route and score every image from its definition (backbone passes) and check
    the stored features, routing distances and scores against that; else the class each image
    chose comes from the stored routing distances. `memo` keeps backbone passes between the
    entries of one stream.
    """
    memo = {} if memo is None else memo
    features, stored_best, selected = stored_routing(store, tasks, j)
    if rescore:
        distances, pixels = reference_routing(store, rt, tasks, truth, features, memo)
        np.testing.assert_allclose(stored_best, distances.min(axis=1), rtol=1e-4)
        selected = distances.argmin(axis=1)
    stored_image = stored_evaluation(store, tasks, j, selected).array("image_scores")
    patch, image = stored_scores(store, tasks, j, selected, rt.backbone.num_patches)
    np.testing.assert_array_equal(stored_image, image)
    for t in np.unique(selected) if rescore else []:
        rows = np.flatnonzero(selected == t)
        want_patch, want_image = reference_class_scores(store, rt, tasks[t], pixels[rows], memo)
        np.testing.assert_allclose(patch[rows], want_patch, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(stored_image[rows], want_image, rtol=1e-4, atol=1e-4)
    maps = reference_maps(patch, rt.backbone.grid, rt.config.image_size, rt.config.blur_sigma)
    figures = reference_metrics(stored_image, maps, truth, selected, j)
    return Entry(selected, stored_image, maps, truth, figures)


def reference_routing(store, rt: Runtime, tasks: list[dict], truth: Truth, features, memo: dict):
    """(N, T) routing distances of the files' images to each class's stored keys, and the images;
    checks on the way that the stored frozen features are the backbone's features of the files."""
    if features.digest not in memo:
        pixels = load_pixels(truth.images, rt.config.image_size)
        frozen = extract_features(rt.backbone, pixels, None, rt.config.inference_batch_size)
        stored = torch.from_numpy(features.array("features"))
        torch.testing.assert_close(frozen, stored, rtol=1e-4, atol=1e-4)
        memo[features.digest] = pixels, frozen
    pixels, frozen = memo[features.digest]
    keys = [torch.from_numpy(store.get("keys", t["keys"]).array("keys")) for t in tasks]
    return routing_distances(frozen, keys), pixels


def reference_class_scores(store, rt: Runtime, task: dict, pixels: np.ndarray, memo: dict):
    """Patch and image scores of `pixels` under `task`'s stored prompts and knowledge."""
    key = (task["prompts"], task["knowledge"], pixels.tobytes())
    if key not in memo:
        prompts = torch.from_numpy(store.get("prompts", task["prompts"]).array("prompts"))
        knowledge = store.get("knowledge", task["knowledge"]).array("knowledge")
        prompted = extract_features(rt.backbone, pixels, prompts, 32)
        memo[key] = reference_scores(
            prompted, torch.from_numpy(knowledge), rt.config.reweight_neighbours
        )
    return memo[key]


def reference_matrix(
    store: ArtifactStore,
    model: str,
    config,
    truths: dict[str, Truth],
    rescore: bool = False,
) -> dict[str, list[list[float | None]]]:
    """Each metric's results matrix of `model`, every entry recomputed (`recompute_entry`)."""
    rt = Runtime(config, store)
    versions = store.model_versions(model)
    matrix = {m: [[None] * len(versions) for _ in versions] for m in METRICS}
    entries: dict[tuple, Entry] = {}
    passes: dict = {}
    for row, v in enumerate(versions):
        tasks = store.read_model(model, v)["tasks"]
        for j, entry in enumerate(tasks):
            key = (j, tuple(t["keys"] for t in tasks))
            if key not in entries:
                truth = truths[entry["name"]]
                entries[key] = recompute_entry(store, rt, tasks, j, truth, rescore, passes)
            for metric, value in entries[key].figures.items():
                matrix[metric][row][j] = value
    return matrix


def assert_same_figures(reported: dict, expected: dict) -> None:
    """Every entry, final and forgetting of the reported JSON against the recomputed matrices.

    Image figures and routing come from the same float32 scores: equal up to rounding. Pixel
    figures are within 1e-6: the reference blurs in float64, ucad in float32, which can swap
    the order of pixels whose scores differ in the last bits.
    """
    for metric in METRICS:
        tol = 1e-6 if metric in PIXEL_METRICS else 1e-12
        got, want = reported["matrix"][metric], expected[metric]
        assert len(got) == len(want), metric
        for t, (got_row, want_row) in enumerate(zip(got, want, strict=True)):
            for j, (g, w) in enumerate(zip(got_row, want_row, strict=True)):
                where = f"{metric}[{t}][{j}]"
                if w is None:
                    assert g is None, f"{where}: reported {g}, expected null"
                else:
                    assert g == pytest.approx(w, abs=tol), f"{where}: reported {g}, expected {w}"
        last = [v for v in want[-1] if v is not None]
        final = float(np.mean(last)) if last else None
        assert reported["final"][metric] == (
            None if final is None else pytest.approx(final, abs=tol)
        ), metric
        drop = forgetting_reference(want) if all(v is not None for v in want[-1]) else None
        if drop is not None:
            assert reported["forgetting"][metric] == pytest.approx(drop, abs=tol), metric


# The stream ---------------------------------------------------------------------------------------


def build_stream(synth_root: Path, out: Path) -> Path:
    """grain and nut as generated, and `mixed`: stripes' training images, and as test set
    stripes' test images plus grain's (renamed g000.png..., with their masks)."""
    for name in ("grain", "nut"):
        shutil.copytree(synth_root / name, out / name)
    shutil.copytree(synth_root / "stripes", out / "mixed")
    for image in sorted((synth_root / "grain" / "test").glob("*/*.png")):
        defect = image.parent.name
        shutil.copy(image, out / "mixed" / "test" / defect / f"g{image.name}")
        if defect != "good":
            mask = synth_root / "grain" / "ground_truth" / defect / f"{image.stem}_mask.png"
            target = out / "mixed" / "ground_truth" / defect / f"g{image.stem}_mask.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(mask, target)
    return out


@pytest.fixture(scope="module")
def stream(synth_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    data = build_stream(synth_root, root / "data")
    out = root / "result.json"
    args = ["benchmark", "--data", str(data), "--model", "oracle", "--json", str(out)]
    args += ["--preset", "smoke", "--store", str(root / "store"), "--no-tracking"]
    args += [f"--set={k}={v}" for k, v in SMOKE.items()]
    assert main(["-q", *args]) == 0
    config = load_config("smoke", overrides=SMOKE)
    truths = {
        name: read_truth(data / name, config.image_size) for name in ("grain", "mixed", "nut")
    }
    return json.loads(out.read_text()), ArtifactStore(root / "store"), config, truths


def test_every_figure_of_the_stream_is_recomputed_from_the_artifacts_and_files(stream):
    reported, store, config, truths = stream
    assert reported["tasks"] == ["grain", "mixed", "nut"]
    expected = reference_matrix(store, "oracle", config, truths, rescore=True)
    assert_same_figures(reported, expected)
    # the stream is not a trivial one: half of mixed's images (grain's) choose grain
    routing = reported["matrix"]["routing_accuracy"]
    assert routing[1][1] == routing[2][1] == 0.5
    assert routing[2][0] == routing[2][2] == 1.0


def test_the_reference_itself_is_not_blind(stream):
    """The oracle's checks fail on a wrong class choice, wrong scores or a wrong mask."""
    reported, store, config, truths = stream
    mixed = truths["mixed"]
    rt = Runtime(config, store)
    tasks = store.read_model("oracle", 2)["tasks"]
    entry = recompute_entry(store, rt, tasks, 1, mixed, rescore=False)
    # grain's copies (g*.png) choose grain, stripes' own images choose mixed
    chose_grain = np.array([p.name.startswith("g") for p in mixed.images])
    assert (entry.selected == np.where(chose_grain, 0, 1)).all()
    figures = entry.figures
    one_wrong = entry.selected.copy()
    one_wrong[0] = 1 - one_wrong[0]
    wrong_choice = reference_metrics(entry.image_scores, entry.maps, mixed, one_wrong, 1)
    assert wrong_choice["routing_accuracy"] == figures["routing_accuracy"] - 1 / 20 or (
        wrong_choice["routing_accuracy"] == figures["routing_accuracy"] + 1 / 20
    )
    shuffled = reference_metrics(entry.image_scores[::-1], entry.maps, mixed, entry.selected, 1)
    assert any(shuffled[m] != pytest.approx(figures[m], abs=1e-5) for m in IMAGE_METRICS)
    shifted = Truth(mixed.images, mixed.labels, np.roll(mixed.masks, 40, axis=2))
    moved = reference_metrics(entry.image_scores, entry.maps, shifted, entry.selected, 1)
    assert all(moved[m] != pytest.approx(figures[m], abs=1e-3) for m in PIXEL_METRICS)
