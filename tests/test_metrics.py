import json
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from ucad.metrics import (
    METRICS,
    ResultsMatrix,
    aupro,
    f1_max,
    final,
    forgetting,
    image_ap,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    routing_accuracy,
    task_metrics,
)

# --- image metrics -----------------------------------------------------------------------------


def test_image_metrics_by_hand():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    # AUROC = fraction of (positive, negative) pairs ranked correctly:
    # 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4.
    assert image_auroc(scores, labels) == pytest.approx(0.75)
    # Descending: 0.8(+) 0.4(-) 0.35(+) 0.1(-). Precision at each positive: 1/1, 2/3.
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert image_ap(scores, labels) == pytest.approx(5 / 6)
    # F1 = 2TP / (TP + FP + P): t=0.8: 2/3, t=0.4: 2/4, t=0.35: 4/5, t=0.1: 4/6 -> max 0.8.
    assert f1_max(scores, labels) == pytest.approx(0.8)


def test_image_metrics_with_ties_by_hand():
    scores = np.array([0.5, 0.5, 0.2, 0.9])
    labels = np.array([True, False, False, True])
    # Pairs: 0.5 vs 0.5 tie -> 1/2; 0.5>0.2; 0.9>0.5; 0.9>0.2 -> 3.5/4.
    assert image_auroc(scores, labels) == pytest.approx(0.875)
    # Tie groups enter together: t=0.9: TP1 of 1; t=0.5: TP2 of 3.
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6; F1: 2/3, 4/5, 4/6 -> 0.8.
    assert image_ap(scores, labels) == pytest.approx(5 / 6)
    assert f1_max(scores, labels) == pytest.approx(0.8)


def test_image_metrics_match_sklearn_on_random_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, 500).astype(np.float32)  # many ties
    labels = rng.random(500) < 0.3
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert image_ap(scores, labels) == pytest.approx(average_precision_score(labels, scores))


def test_single_class_is_nan():
    scores = np.array([0.2, 0.7, 0.4])
    assert math.isnan(image_auroc(scores, np.zeros(3, bool)))
    assert math.isnan(image_auroc(scores, np.ones(3, bool)))
    assert math.isnan(image_ap(scores, np.zeros(3, bool)))
    assert math.isnan(f1_max(scores, np.zeros(3, bool)))
    # With only positives precision is 1 at every threshold: AP and F1-max are defined and 1.
    assert image_ap(scores, np.ones(3, bool)) == 1.0
    assert f1_max(scores, np.ones(3, bool)) == 1.0
    assert math.isnan(image_auroc(np.array([]), np.array([], bool)))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        image_auroc(np.zeros(3), np.zeros(4, bool))
    with pytest.raises(ValueError, match="0/1"):
        image_auroc(np.zeros(3), np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="NaN"):
        image_auroc(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        pixel_auroc(np.zeros((4, 4)), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.zeros((1, 2, 2)), np.ones((1, 2, 2), bool), fpr_limit=0)


# --- pixel metrics -----------------------------------------------------------------------------

# Positives: 0.9, 0.8, 0.1; negatives: 0.1, 0.2, 0.3, 0.4, 0.7.
MAPS = np.array([[[0.9, 0.1], [0.2, 0.3]], [[0.8, 0.4], [0.1, 0.7]]], dtype=np.float32)
MASKS = np.array([[[1, 0], [0, 0]], [[1, 0], [1, 0]]], dtype=bool)


def test_pixel_metrics_by_hand():
    # Pairs: 0.9 and 0.8 beat all 5 negatives; positive 0.1 ties negative 0.1 (1/2), loses 4.
    # AUROC = (5 + 5 + 0.5) / 15 = 0.7.
    assert pixel_auroc(MAPS, MASKS) == pytest.approx(0.7)
    # Descending: 0.9+ 0.8+ 0.7- 0.4- 0.3- 0.2- {0.1+, 0.1-}. Precision when each positive
    # enters: 1, 1, 3/8 (the tie group ends at 8 pixels). AP = (1 + 1 + 3/8) / 3.
    assert pixel_ap(MAPS, MASKS) == pytest.approx((2 + 3 / 8) / 3)


def test_pixel_metrics_match_sklearn_on_random_ties():
    rng = np.random.default_rng(1)
    maps = np.round(rng.random((3, 16, 16)), 2).astype(np.float32)
    masks = rng.random((3, 16, 16)) < 0.2
    flat_masks, flat_maps = masks.ravel(), maps.ravel()
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(flat_masks, flat_maps))
    assert pixel_ap(maps, masks) == pytest.approx(average_precision_score(flat_masks, flat_maps))


def test_pixel_metrics_accept_float64_and_0_1_masks():
    assert pixel_auroc(MAPS.astype(np.float64), MASKS.astype(np.uint8)) == pytest.approx(0.7)


# --- AUPRO -------------------------------------------------------------------------------------

# Region A = {(0,0)} (size 1); region B = {(1,2), (2,3)} (size 2, joined only diagonally, so one
# region under 8-connectivity). 9 normal pixels.
PRO_MASK = np.array([[[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]], dtype=bool)
# A scores 0.5; B scores 0.9 and 0.4; normals: one 0.9 (ties B), one 0.6, one 0.4 (ties B), six 0.1.
PRO_MAP = np.array(
    [[[0.5, 0.1, 0.1, 0.6], [0.9, 0.1, 0.9, 0.1], [0.1, 0.4, 0.1, 0.4]]], dtype=np.float32
)
# Thresholds (PRO = mean over regions of covered fraction, FPR = normals above / 9):
#   t=0.9: B half, 1 normal  -> (1/9, (0 + 1/2)/2 = 1/4)
#   t=0.6: 2 normals         -> (2/9, 1/4)
#   t=0.5: A covered         -> (2/9, (1 + 1/2)/2 = 3/4)
#   t=0.4: B full, 3 normals -> (3/9, 1)
#   t=0.1: all normals       -> (1, 1)
# Up to 0.3: [0,1/9]: 1/9 * 1/8 = 1/72; [1/9,2/9]: 1/9 * 1/4 = 2/72; vertical step: 0;
# [2/9,0.3]: PRO(0.3) = 3/4 + (0.3 - 2/9) / (1/9) * 1/4 = 0.925, area = 7/90 * (0.75 + 0.925)/2
# = 469/7200. Total = (300 + 469)/7200; AUPRO = 769/7200 / 0.3 = 769/2160.
# Up to 1: 1/72 + 2/72 + 1/9 * 7/8 (= 7/72) + 6/9 * 1 (= 48/72) = 58/72.


def test_aupro_by_hand_with_ties_and_interpolation():
    assert aupro(PRO_MAP, PRO_MASK) == pytest.approx(769 / 2160)
    assert aupro(PRO_MAP, PRO_MASK, fpr_limit=1.0) == pytest.approx(58 / 72)


def test_aupro_limit_on_a_curve_point_needs_no_interpolation():
    # Up to FPR 2/9: 1/72 + 2/72 (the vertical step adds nothing) = 3/72, divided by 2/9.
    assert aupro(PRO_MAP, PRO_MASK, fpr_limit=2 / 9) == pytest.approx(3 / 72 / (2 / 9))


def test_aupro_regions_do_not_connect_across_images():
    # Image 0: a 1-pixel defect at (0,0) scoring above every normal pixel. Image 1: a 3-pixel
    # defect at (0,0),(0,1),(1,0) scoring below every normal pixel. As two regions, PRO is
    # (1 + 0)/2 = 1/2 from FPR 0 to 1, so AUPRO = 1/2; had the images been joined into one
    # 4-pixel region, PRO would be 1/4.
    maps = np.zeros((2, 3, 3), np.float32)
    masks = np.zeros((2, 3, 3), bool)
    masks[0, 0, 0] = masks[1, 0, :2] = masks[1, 1, 0] = True
    maps[0, 0, 0], maps[1][masks[1]] = 1.0, -1.0
    assert aupro(maps, masks) == pytest.approx(0.5)


def test_aupro_undefined_is_nan():
    maps = np.random.default_rng(0).random((1, 3, 3))
    assert math.isnan(aupro(maps, np.zeros((1, 3, 3), bool)))
    assert math.isnan(aupro(maps, np.ones((1, 3, 3), bool)))


def _reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Loop over thresholds and regions; clip each trapezoid segment at the limit."""
    regions = []
    for image_map, mask in zip(maps, masks, strict=True):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [image_map[labelled == r] for r in range(1, n + 1)]
    normal = maps[~masks]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pro = np.mean([np.mean(region >= t) for region in regions])
        points.append((np.mean(normal >= t), pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (fpr_limit - x0) / (x1 - x0) * (y1 - y0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    masks = ndimage.binary_dilation(rng.random((3, 12, 12)) < 0.04, iterations=1)
    maps = np.round(rng.random((3, 12, 12)) + 0.5 * masks, 1).astype(np.float32)  # with ties
    for limit in (0.05, 0.3, 1.0):
        assert aupro(maps, masks, limit) == pytest.approx(_reference_aupro(maps, masks, limit))


# --- routing and per-task bundle ---------------------------------------------------------------


def test_routing_accuracy():
    assert routing_accuracy(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2])) == 0.75
    assert math.isnan(routing_accuracy(np.array([], int), np.array([], int)))


def test_task_metrics_equals_the_single_metrics():
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    result = task_metrics(scores, labels, PRO_MAP, PRO_MASK, np.array([1, 1, 0, 1]), 1)
    assert tuple(result) == METRICS
    assert result["image_auroc"] == pytest.approx(0.75)
    assert result["image_ap"] == pytest.approx(5 / 6)
    assert result["image_f1max"] == pytest.approx(0.8)
    assert result["pixel_auroc"] == pytest.approx(pixel_auroc(PRO_MAP, PRO_MASK))
    assert result["pixel_ap"] == pytest.approx(pixel_ap(PRO_MAP, PRO_MASK))
    assert result["aupro"] == pytest.approx(769 / 2160)
    assert result["routing_accuracy"] == 0.75
    assert all(isinstance(v, float) for v in result.values())


def test_task_metrics_without_pixel_ground_truth():
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    result = task_metrics(scores, labels, PRO_MAP, None, np.array([1, 1, 0, 1]), 1)
    assert result["image_auroc"] == pytest.approx(0.75)
    assert all(math.isnan(result[m]) for m in ("pixel_auroc", "pixel_ap", "aupro"))


# --- results matrix and forgetting -------------------------------------------------------------

RESULTS = [[0.9, None, None], [0.8, 0.95, None], [0.7, 0.9, 0.85]]


def test_forgetting_and_final_by_hand():
    # k = 2: task 0 best before = max(0.9, 0.8) = 0.9, drop 0.2; task 1: 0.95 - 0.9 = 0.05.
    # FM = (0.2 + 0.05) / 2 = 0.125. Final = (0.7 + 0.9 + 0.85) / 3.
    assert forgetting(RESULTS) == pytest.approx(0.125)
    assert final(RESULTS) == pytest.approx(2.45 / 3)
    # The best earlier value need not be on the diagonal: task 0 drops 0.95 - 0.7 = 0.25.
    assert forgetting([[0.9], [0.95, 0.95], [0.7, 0.9, 0.85]]) == pytest.approx(0.15)
    # After two tasks: k = 1, FM = 0.9 - 0.8.
    assert forgetting(RESULTS[:2]) == pytest.approx(0.1)
    assert forgetting(RESULTS[:1]) is None


def test_forgetting_and_final_skip_undefined_entries():
    # R[2][1] undefined: only task 0's drop (0.2) counts; final = mean(0.7, 0.85).
    results = [[0.9, None, None], [0.8, 0.95, None], [0.7, math.nan, 0.85]]
    assert forgetting(results) == pytest.approx(0.2)
    assert final(results) == pytest.approx(0.775)
    # R[0][0] undefined: task 0's best earlier value is R[1][0] = 0.8, drop 0.1; FM = 0.075.
    results = [[None, None, None], [0.8, 0.95, None], [0.7, 0.9, 0.85]]
    assert forgetting(results) == pytest.approx(0.075)
    # Nothing defined -> NaN.
    assert math.isnan(forgetting([[None], [math.nan, math.nan]]))


def test_results_matrix_json():
    matrix = ResultsMatrix(3, metrics=("image_auroc", "aupro"))
    for t, row in enumerate(RESULTS):
        for j, value in enumerate(row[: t + 1]):
            matrix.set(t, j, {"image_auroc": value, "aupro": math.nan})
    assert matrix.row(1)["image_auroc"] == [0.8, 0.95]
    out = matrix.as_json()
    assert out["matrix"]["image_auroc"] == RESULTS
    assert out["matrix"]["aupro"] == [[None] * 3] * 3
    assert out["final"]["image_auroc"] == pytest.approx(2.45 / 3)
    assert out["forgetting"] == {"image_auroc": pytest.approx(0.125), "aupro": None}
    assert out["final"]["aupro"] is None
    json.dumps(out, allow_nan=False)


def test_results_matrix_partial_run_and_errors():
    matrix = ResultsMatrix(3)
    matrix.set(0, 0, {"image_auroc": 0.9})
    out = matrix.as_json()
    assert out["matrix"]["image_auroc"] == [[0.9, None, None]]
    assert out["final"]["image_auroc"] == 0.9
    assert out["forgetting"]["image_auroc"] is None
    with pytest.raises(ValueError, match="j <= t"):
        matrix.set(0, 1, {"image_auroc": 0.9})
    with pytest.raises(ValueError, match="unknown metrics"):
        matrix.set(1, 0, {"image_aurc": 0.9})
    with pytest.raises(ValueError, match="no results"):
        ResultsMatrix(2).as_json()


# --- F1-max against scikit-learn, and test sets without defect pixels ------------------------


def sklearn_f1max(scores: np.ndarray, labels: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1))


@pytest.mark.parametrize("seed", range(6))
def test_f1max_matches_sklearn_precision_recall_curve(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    levels = int(rng.integers(2, 30))  # few distinct values: many ties, across both classes
    scores = rng.integers(0, levels, n).astype(np.float32) / levels
    labels = rng.random(n) < rng.uniform(0.05, 0.6)
    labels[0] = True  # at least one positive
    expected = sklearn_f1max(scores, labels)
    assert f1_max(scores, labels) == pytest.approx(expected, rel=1e-12)
    # continuous scores (no ties) as well
    smooth = rng.normal(size=n) + labels
    assert f1_max(smooth, labels) == pytest.approx(sklearn_f1max(smooth, labels), rel=1e-12)
    result = task_metrics(scores, labels, MAPS, MASKS, np.zeros(n, int), 0)
    assert result["image_f1max"] == pytest.approx(expected, rel=1e-12)


def test_f1max_ties_enter_together():
    # One tie group holding one positive and three negatives: F1 at t=0.5 is 2*1/(4+1) = 0.4.
    # A curve splitting the tie (positive first) would reach 2*1/(1+1) = 1.0.
    scores = np.array([0.5, 0.5, 0.5, 0.5, 0.1])
    labels = np.array([1, 0, 0, 0, 0])
    assert f1_max(scores, labels) == pytest.approx(0.4)
    assert sklearn_f1max(scores, labels) == pytest.approx(0.4)


def test_pixel_metrics_without_defect_pixels_are_nan():
    maps = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    clean = np.zeros((3, 8, 8), bool)
    assert math.isnan(pixel_auroc(maps, clean))
    assert math.isnan(pixel_ap(maps, clean))
    assert math.isnan(aupro(maps, clean))
    # in the per-task bundle: image metrics defined, pixel metrics NaN (not 0, not an error)
    scores, labels = np.array([0.1, 0.4, 0.35]), np.array([0, 1, 0])
    result = task_metrics(scores, labels, maps, clean, np.array([2, 2, 2]), 2)
    assert result["image_auroc"] == pytest.approx(1.0)
    assert result["routing_accuracy"] == 1.0
    for metric in ("pixel_auroc", "pixel_ap", "aupro"):
        assert isinstance(result[metric], float) and math.isnan(result[metric])
    # and in the results matrix they become null, with final and forgetting null too
    matrix = ResultsMatrix(2, metrics=("pixel_ap", "image_auroc"))
    for t, j in ((0, 0), (1, 0), (1, 1)):
        matrix.set(t, j, {"pixel_ap": result["pixel_ap"], "image_auroc": 0.5 + 0.1 * t})
    out = matrix.as_json()
    assert out["matrix"]["pixel_ap"] == [[None, None], [None, None]]
    assert out["final"]["pixel_ap"] is None and out["forgetting"]["pixel_ap"] is None
    assert out["final"]["image_auroc"] == pytest.approx(0.6)
    json.dumps(out, allow_nan=False)
