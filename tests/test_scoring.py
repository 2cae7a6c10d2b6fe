import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from ucad import key_search, scoring
from ucad.scoring import (
    anomaly_maps,
    image_scores,
    nearest_distances,
    patch_scores,
    select_task,
    task_distances,
)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def brute_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[:, None, :].double() - b[None, :, :].double()).norm(dim=2)


@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_nearest_distances_match_brute_force(generator, chunk_size):
    queries = torch.randn(37, 6, generator=generator)
    bank = torch.randn(23, 6, generator=generator)
    dist, idx = nearest_distances(queries, bank, k=4, chunk_size=chunk_size)
    expected, expected_idx = brute_distances(queries, bank).sort(dim=1)
    assert dist.shape == idx.shape == (37, 4)
    assert torch.equal(idx, expected_idx[:, :4])
    torch.testing.assert_close(dist.double(), expected[:, :4], atol=1e-4, rtol=1e-5)


def test_nearest_distances_hand_example_and_half_input():
    bank = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    queries = torch.tensor([[3.0, 4.0], [10.0, 1.0]]).half()
    dist, idx = nearest_distances(queries, bank)
    assert dist.dtype == torch.float32
    assert idx[:, 0].tolist() == [0, 1]
    torch.testing.assert_close(dist[:, 0], torch.tensor([5.0, 1.0]))


def test_nearest_distances_reject_bad_k_and_dims():
    with pytest.raises(ValueError, match="k must be"):
        nearest_distances(torch.randn(3, 2), torch.randn(2, 2), k=3)
    with pytest.raises(ValueError, match="share D"):
        nearest_distances(torch.randn(3, 2), torch.randn(2, 3))


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_task_distances_match_brute_force(generator, chunk_size):
    features = torch.randn(3, 7, 4, generator=generator)
    keys = [torch.randn(n, 4, generator=generator) for n in (2, 5, 1)]
    expected = torch.tensor(
        [
            [brute_distances(image, task_keys).min(dim=1).values.sum() for task_keys in keys]
            for image in features
        ]
    )
    got = task_distances(features, keys, chunk_size=chunk_size)
    assert got.shape == (3, 3)
    torch.testing.assert_close(got.double(), expected.double(), atol=1e-4, rtol=1e-5)


def test_select_task_picks_the_cluster_of_each_image(generator):
    centres = 20 * torch.eye(3, 8)
    keys = [
        c + torch.randn(k, 8, generator=generator) for c, k in zip(centres, (4, 9, 2), strict=True)
    ]
    truth = torch.tensor([2, 0, 1, 1, 0])
    features = centres[truth][:, None, :] + torch.randn(5, 6, 8, generator=generator)
    assert torch.equal(select_task(features, keys), truth)


def test_task_distances_reject_empty_tasks():
    with pytest.raises(ValueError, match="at least one task"):
        task_distances(torch.randn(1, 2, 3), [])
    with pytest.raises(ValueError, match="at least one key"):
        task_distances(torch.randn(1, 2, 3), [torch.randn(2, 3), torch.randn(0, 3)])


# Key search: select_task must be task_distances' argmin, bit for bit, ties to the lowest index.


def exhaustive_choice(features, keys):
    return task_distances(features, keys).argmin(dim=1)


def classes_and_images(generator, tasks, dim, separation, key_counts=(6,), images=5, patches=7):
    """Gaussian classes (centres ``separation`` apart on average) and images drawn from them."""
    centres = separation * torch.randn(tasks, dim, generator=generator)
    keys = [
        centre + torch.randn(key_counts[t % len(key_counts)], dim, generator=generator)
        for t, centre in enumerate(centres)
    ]
    truth = torch.randint(tasks, (images,), generator=generator)
    features = centres[truth][:, None] + torch.randn(images, patches, dim, generator=generator)
    return features, keys


@pytest.fixture
def exhaustive_calls(monkeypatch):
    """The image indices of every exhaustive (subset) computation select_task asks for."""
    calls = []
    totals = scoring._KeyDistances.totals

    def recording(self, images=None):
        calls.append(None if images is None else images.tolist())
        return totals(self, images)

    monkeypatch.setattr(scoring._KeyDistances, "totals", recording)
    return calls


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 20, None])
def test_task_distances_of_a_subset_carry_the_same_bits(generator, chunk_size):
    """What select_task's exhaustive fallback relies on; blocks straddle images when P = 7."""
    features, keys = classes_and_images(generator, 6, 12, 1.0, (1, 3, 8), images=9)
    distances = scoring._KeyDistances(features, keys, chunk_size)
    whole = distances.totals()
    assert torch.equal(whole, task_distances(features, keys, chunk_size))
    for images in ([0], [8], [3, 4], [7, 1, 5], list(range(9))):
        assert torch.equal(distances.totals(torch.tensor(images)), whole[images])


@pytest.mark.parametrize("dim", [3, 40, 100])  # the bound projects on 32 directions
@pytest.mark.parametrize("separation", [0.0, 0.3, 1.0, 10.0])  # overlapping .. well separated
def test_select_task_is_the_exhaustive_argmin(generator, dim, separation):
    for tasks, key_counts in ((2, (1,)), (7, (1, 4, 9)), (60, (5,)), (25, (1, 2, 30))):
        features, keys = classes_and_images(generator, tasks, dim, separation, key_counts)
        assert torch.equal(select_task(features, keys), exhaustive_choice(features, keys))


def test_select_task_random_cases(generator):
    for trial in range(40):
        tasks = int(torch.randint(2, 40, (), generator=generator))
        dim = int(torch.randint(1, 90, (), generator=generator))
        key_counts = torch.randint(1, 8, (tasks,), generator=generator).tolist()
        features, keys = classes_and_images(
            generator,
            tasks,
            dim,
            [0.0, 0.5, 3.0, 30.0][trial % 4],
            key_counts,
            images=int(torch.randint(1, 12, (), generator=generator)),
            patches=int(torch.randint(1, 9, (), generator=generator)),
        )
        if trial % 3 == 0:
            keys[-1] = keys[0].clone()  # an exact tie wherever task 0 wins
        assert torch.equal(select_task(features, keys), exhaustive_choice(features, keys))


def test_select_task_settles_separated_classes_without_the_exhaustive_search(
    generator, exhaustive_calls
):
    features, keys = classes_and_images(generator, 40, 96, 10.0, images=30)
    expected = exhaustive_choice(features, keys)
    exhaustive_calls.clear()
    assert torch.equal(select_task(features, keys), expected)
    assert exhaustive_calls == []


def test_select_task_breaks_exact_ties_like_argmin(generator, exhaustive_calls):
    features, keys = classes_and_images(generator, 8, 48, 10.0, images=12)
    winners = exhaustive_choice(features, keys).tolist()
    # a copy of a winning class before and after it: equal totals, the lowest index wins
    keys = [keys[winners[10]].clone(), *keys, keys[winners[11]].clone()]
    # and two classes whose keys are the patches of image 9, in two orders: equal totals near 0
    keys += [features[9].clone(), features[9][torch.randperm(7, generator=generator)].clone()]
    totals = task_distances(features, keys)
    assert totals[10, 0] == totals[10, 1 + winners[10]]
    assert totals[9, -2] == totals[9, -1] == totals[9].min() < 1
    tied = ((totals == totals.amin(dim=1, keepdim=True)).sum(dim=1) > 1).nonzero().flatten()
    assert 0 < len(tied) < 12 and not set(range(4)) <= set(tied.tolist())  # see test_probe
    exhaustive_calls.clear()
    assert torch.equal(select_task(features, keys), totals.argmin(dim=1))
    # bounds cannot tell exact ties apart: those images, and only those, went exhaustive
    assert exhaustive_calls == [tied.tolist()]


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e5])
@pytest.mark.parametrize("step", [0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3])
def test_select_task_near_ties(generator, offset, step):
    """Classes that are copies of one class moved by tiny steps: totals within rounding, on
    features with a large common offset (rounding grows with it)."""
    dim = 40
    base = offset + torch.randn(9, dim, generator=generator)
    keys = [base + step * t * torch.randn(9, dim, generator=generator) for t in range(12)]
    features = offset + torch.randn(10, 7, dim, generator=generator)
    features[:5] = base[torch.randint(9, (5, 7), generator=generator)] + 1e-3 * features[:5]
    assert torch.equal(select_task(features, keys), exhaustive_choice(features, keys))


def test_select_task_on_noisy_copies_of_one_class(generator):
    """`ucad bench`'s extra classes: one class's keys plus Gaussian noise of the keys' std."""
    directions = torch.randn(8, 100, generator=generator)
    keys0 = 5 + torch.randn(30, 8, generator=generator) @ directions  # low-rank, like features
    spread = keys0.std()
    keys = [keys0] + [keys0 + spread * torch.randn(30, 100, generator=generator) for _ in range(49)]
    features = keys0[torch.randint(30, (12, 9), generator=generator)]
    features += 0.3 * torch.randn(12, 9, 100, generator=generator)
    features[8:] = keys[17][torch.randint(30, (4, 9), generator=generator)]  # a noisy class's
    expected = exhaustive_choice(features, keys)
    assert (expected[:8] == 0).all() and (expected[8:] == 17).all()
    assert torch.equal(select_task(features, keys), expected)


@pytest.mark.parametrize("tied", ["probe", "later", "none"])
def test_select_task_probe(generator, exhaustive_calls, tied):
    """The first images are a probe: when bounds settle none of them, every image goes
    exhaustive. Here they fail on an exact tie (a duplicated class)."""
    features, keys = classes_and_images(generator, 30, 64, 10.0, images=10)
    source, copies = {"probe": (0, slice(1, 4)), "later": (9, slice(6, 9))}.get(tied, (0, None))
    if copies is not None:
        noise = 0.01 * torch.randn(3, 7, 64, generator=generator)
        features[copies] = features[source] + noise
        keys.append(keys[int(exhaustive_choice(features, keys)[source])].clone())
    expected = exhaustive_choice(features, keys)
    exhaustive_calls.clear()
    assert torch.equal(select_task(features, keys), expected)
    if tied == "probe":
        assert exhaustive_calls == [list(range(10))]
    elif tied == "later":
        assert exhaustive_calls == [(expected == expected[source]).nonzero().flatten().tolist()]
        assert len(exhaustive_calls[0]) < 10
    else:
        assert exhaustive_calls == []


def test_select_task_on_unstructured_data(generator):
    """Gaussian keys and patches: bounds prune little, most images go exhaustive."""
    keys = [torch.randn(6, 64, generator=generator) for _ in range(30)]
    features = torch.randn(10, 7, 64, generator=generator)
    assert torch.equal(select_task(features, keys), exhaustive_choice(features, keys))


def test_select_task_half_input_single_class_and_empty(generator):
    features, keys = classes_and_images(generator, 9, 40, 1.0)
    half = features.half()
    assert torch.equal(select_task(half, keys), exhaustive_choice(half, keys))
    assert select_task(features, keys[:1]).tolist() == [0] * 5
    assert select_task(features[:0], keys).shape == (0,)
    assert task_distances(features[:0], keys).shape == (0, 9)
    assert select_task(features[:, :0], keys).tolist() == [0] * 5
    assert torch.equal(task_distances(features[:, :0], keys), torch.zeros(5, 9))
    with pytest.raises(ValueError, match="at least one key"):
        select_task(features, [keys[0], keys[0][:0]])
    with pytest.raises(ValueError, match="share D"):
        select_task(features, [keys[0][:, :3]])


def test_select_task_on_non_finite_huge_and_tiny_values(generator):
    features, keys = classes_and_images(generator, 9, 40, 10.0, images=12)
    features[1, 2, 3] = math.nan
    features[2, 0, 0] = math.inf
    features[9, 1] = math.nan  # after the probe images
    assert torch.equal(select_task(features, keys), exhaustive_choice(features, keys))
    features, keys = classes_and_images(generator, 9, 40, 10.0, images=12)
    features[10] *= 1e19  # finite, but squares overflow float32
    keys[4] = keys[4] * 1e-30
    assert torch.equal(select_task(features, keys), exhaustive_choice(features, keys))
    keys[4][0, 0] = math.nan
    assert torch.equal(select_task(features, keys), exhaustive_choice(features, keys))
    # squared distances in float32's subnormal range: underflow, not relative rounding
    for scale in (1e-18, 1e-21, 1e-30):
        features, keys = classes_and_images(generator, 9, 40, 10.0, images=12)
        tiny_features, tiny_keys = features * scale, [k * scale for k in keys]
        expected = exhaustive_choice(tiny_features, tiny_keys)
        assert torch.equal(select_task(tiny_features, tiny_keys), expected)


# torch >= 2.9: per-backend float32 precision ('none' defers to the level above)
PRECISION_LEVELS = (
    torch.backends,
    torch.backends.mkldnn,
    getattr(torch.backends.mkldnn, "matmul", None),
    getattr(torch.backends.cuda, "matmul", None),
)
PER_BACKEND = all(hasattr(level, "fp32_precision") for level in PRECISION_LEVELS)


@pytest.mark.parametrize("setting", ["high", "medium", "mkldnn.matmul bf16", "global bf16"])
def test_select_task_goes_exhaustive_when_products_may_round_more(generator, monkeypatch, setting):
    if " " in setting and not PER_BACKEND:
        pytest.skip("this torch has no per-backend float32 precision")
    features, keys = classes_and_images(generator, 9, 40, 10.0)
    pruned = []
    monkeypatch.setattr(key_search, "pruned_argmin", lambda *args: pruned.append(1))
    legacy = torch.get_float32_matmul_precision()
    saved = [level.fp32_precision for level in PRECISION_LEVELS] if PER_BACKEND else []
    try:
        if setting == "mkldnn.matmul bf16":
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        elif setting == "global bf16":  # inherited: mkldnn and its matmul say 'none'
            torch.backends.fp32_precision = "bf16"
        else:
            torch.set_float32_matmul_precision(setting)
        assert not key_search.prunes_on(torch.device("cpu"))
        assert torch.equal(select_task(features, keys), exhaustive_choice(features, keys))
    finally:
        torch.set_float32_matmul_precision(legacy)
        for level, value in zip(PRECISION_LEVELS, saved, strict=False):
            level.fp32_precision = value
    assert not pruned
    assert key_search.prunes_on(torch.device("cpu"))


@pytest.mark.parametrize("dim", [5, 40, 200])
@pytest.mark.parametrize("precision", [torch.float32, torch.float64])
def test_key_search_margins_hold_the_exhaustive_totals(generator, dim, precision):
    """The margins directly: lower bounds never exceed, and intervals always hold, the totals
    task_distances computes. Two groups of classes far apart, in 9 of the ``dim`` directions (so
    the bound is nearly exact): patches lie far from the centre of all keys but near their own
    keys, so rounding is large against distances. In float64 the search's side hardly rounds,
    so its margins alone must cover task_distances' error (without them this fails)."""
    directions = torch.randn(8, dim, generator=generator)
    centres = torch.randn(20, 8, generator=generator) @ directions
    centres[:, 0] += torch.tensor([1e3, -1e3]).repeat_interleave(10)
    spread = [0.3 * torch.randn(n, 8, generator=generator) @ directions for n in (3, 11) * 10]
    keys = [centre + rows for centre, rows in zip(centres, spread, strict=True)]
    patches = 0.3 * torch.randn(6, 7, 8, generator=generator) @ directions
    features = centres[torch.arange(0, 18, 3)][:, None] + patches
    distances = scoring._KeyDistances(features, keys)
    totals = distances.totals()
    bank = distances.bank
    patches, rows, centre = distances.patches, bank.rows.view(20, distances.slots, -1), bank.centre
    if precision == torch.float64:  # the same centred operands, nothing left to round
        patches, rows = (patches - centre).double(), (rows - centre).double()
        centre = centre.new_zeros(centre.shape, dtype=torch.float64)
    exact = brute_distances(patches - centre, (rows - centre).flatten(0, 1))
    exact = exact.view(6, 7, 20, -1).amin(dim=3).sum(dim=1)
    assert (totals - exact).abs().max() > 1e-4 * totals.min()  # rounding that matters
    search = key_search._PrunedSearch(patches, 7, rows, centre)
    query_side = key_search._project(patches, centre, search.basis)
    query_sq = query_side[:, -1].clone()
    query_side[:, -1] = 1
    assert (search._lower_bounds(query_side, query_sq) <= totals).all()
    value, low, high = (torch.full(totals.shape, math.inf, dtype=precision) for _ in range(3))
    pairs = torch.cartesian_prod(torch.arange(6), torch.arange(20)).T
    search._evaluate(*pairs, 0, query_sq, value, low, high)
    assert (low <= totals).all() and (totals <= high).all()


def test_patch_scores_hand_example():
    features = torch.tensor([[[3.0, 4.0], [0.0, 1.0]], [[6.0, 8.0], [1.0, 0.0]]])
    knowledge = torch.tensor([[0.0, 0.0], [6.0, 9.0]])
    torch.testing.assert_close(
        patch_scores(features, knowledge), torch.tensor([[5.0, 1.0], [1, 1]])
    )


KNOWLEDGE = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [10.0, 10.0]])
# image 0: top patch (-3, 0) -> m* = (0, 0), N_3(m*) = {(0,0), (1,0), (0,2)} at 3, 4, sqrt(13).
# image 1: top patch (10, 13) -> m* = (10, 10), N_3(m*) = {(10,10), (0,2), (1,0)}.
FEATURES = torch.tensor([[[-3.0, 0.0], [0.5, 0.0]], [[1.0, 0.1], [10.0, 13.0]]])


def test_image_scores_reweighting_hand_example():
    scores = patch_scores(FEATURES, KNOWLEDGE)
    w0 = 1 - math.exp(3) / (math.exp(3) + math.exp(4) + math.exp(math.sqrt(13)))
    w1 = 1 - math.exp(3) / (math.exp(3) + math.exp(math.sqrt(221)) + math.exp(math.sqrt(250)))
    got = image_scores(FEATURES, KNOWLEDGE, scores, neighbours=3)
    torch.testing.assert_close(got, torch.tensor([3 * w0, 3 * w1]))
    torch.testing.assert_close(
        image_scores(FEATURES, KNOWLEDGE, scores, reweight=False), scores.amax(1)
    )


def test_image_scores_stay_finite_for_large_distances():
    # Distances of ~3000 would overflow exp() in float32; the weights tend to 1 here.
    features, knowledge = 1000 * FEATURES, 1000 * KNOWLEDGE
    got = image_scores(features, knowledge, patch_scores(features, knowledge))
    torch.testing.assert_close(got, torch.tensor([3000.0, 3000.0]))


def test_image_scores_single_neighbour_gives_zero_weight():
    # With b = 1, N_b(m*) = {m*}: the ratio is 1, so the weight is 0.
    scores = patch_scores(FEATURES, KNOWLEDGE)
    torch.testing.assert_close(
        image_scores(FEATURES, KNOWLEDGE, scores, neighbours=1), torch.zeros(2)
    )


def test_anomaly_map_of_hot_patch_peaks_at_its_centre():
    scores = torch.zeros(1, 16)
    scores[0, 1 * 4 + 2] = 1.0  # patch (row 1, col 2) of a 4x4 grid; 7 px per patch
    for sigma in (0.0, 1.0):
        heat = anomaly_maps(scores, (4, 4), 28, sigma=sigma)
        assert heat.shape == (1, 28, 28)
        assert divmod(int(heat[0].argmax()), 28) == (10, 17)  # patch centre: 1*7+3, 2*7+3
        # bilinear spreads the patch value over its 7x7 area; the blur keeps the mass
        assert heat.sum().item() == pytest.approx(49.0, rel=1e-3)


def test_anomaly_map_sigma_zero_is_bilinear_by_hand():
    scores = torch.tensor([[0.0, 4.0, 0.0, 4.0]])
    heat = anomaly_maps(scores, (2, 2), (3, 4), sigma=0)
    torch.testing.assert_close(heat[0], torch.tensor([[0.0, 1, 3, 4]]).expand(3, 4))
    upsampled = F.interpolate(scores.view(1, 1, 2, 2), size=(3, 4), mode="bilinear")
    torch.testing.assert_close(heat, upsampled[:, 0])


def scipy_blur(maps: torch.Tensor, sigma: float, radius: tuple[int, int]) -> np.ndarray:
    """scipy's Gaussian filter per map: `mirror` borders (the edge pixel is not repeated)."""
    return np.stack(
        [ndimage.gaussian_filter(m, sigma, mode="mirror", radius=radius) for m in maps.double()]
    )


@pytest.mark.parametrize(
    ("grid", "size", "sigma"),
    [((14, 14), 224, 4.0), ((3, 5), (40, 56), 2.0), ((4, 4), 28, 1.3), ((16, 12), (16, 12), 2.0)],
)
def test_anomaly_map_blur_is_scipys_gaussian_filter(generator, grid, size, sigma):
    scores = torch.rand(2, grid[0] * grid[1], generator=generator) * 10
    upsampled = anomaly_maps(scores, grid, size, sigma=0)
    blurred = anomaly_maps(scores, grid, size, sigma=sigma)
    radius = math.ceil(4 * sigma)  # the documented kernel radius, on both axes
    expected = scipy_blur(upsampled, sigma, (radius, radius))
    np.testing.assert_allclose(blurred.numpy(), expected, rtol=1e-5, atol=1e-5)
    if radius == int(4 * sigma + 0.5):  # then scipy's own truncate=4 gives the same kernel
        default_truncate = np.stack(
            [ndimage.gaussian_filter(m, sigma, mode="mirror") for m in upsampled.double()]
        )
        np.testing.assert_allclose(blurred.numpy(), default_truncate, rtol=1e-5, atol=1e-5)
    # the comparison sees the borders: scipy's default `reflect` (edge pixel repeated) differs
    # by far more than the tolerance (at grid == size the map is not smoothed by upsampling)
    reflected = np.stack([ndimage.gaussian_filter(m, sigma) for m in upsampled.double()])
    assert np.abs(blurred.numpy() - reflected).max() > (0.1 if grid == size else 1e-4)


def test_anomaly_map_blur_on_tiny_maps_and_bad_input():
    scores = torch.rand(2, 4)
    heat = anomaly_maps(scores, (2, 2), 4, sigma=4.0)  # radius 16 capped at 3
    assert heat.shape == (2, 4, 4) and torch.isfinite(heat).all()
    # the capped kernel is still a mirror-bordered Gaussian, normalised over its 7 taps
    expected = scipy_blur(anomaly_maps(scores, (2, 2), 4, sigma=0), 4.0, (3, 3))
    np.testing.assert_allclose(heat.numpy(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="grid"):
        anomaly_maps(torch.rand(2, 5), (2, 2), 4)
    with pytest.raises(ValueError, match="sigma"):
        anomaly_maps(torch.rand(2, 4), (2, 2), 4, sigma=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_select_task_on_cuda_is_the_exhaustive_argmin(generator):
    features, keys = classes_and_images(generator, 50, 200, 10.0, (1, 20), images=40)
    features, keys = features.cuda(), [k.cuda() for k in keys]
    keys.append(keys[3].clone())  # a tie
    assert torch.equal(select_task(features, keys), exhaustive_choice(features, keys))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(generator):
    features = torch.randn(4, 9, 16, generator=generator)
    keys = [torch.randn(n, 16, generator=generator) for n in (3, 7)]
    knowledge = torch.randn(12, 16, generator=generator)
    cuda = features.cuda().half()
    torch.testing.assert_close(
        task_distances(cuda, keys).cpu(),
        task_distances(features.half(), keys),
        rtol=1e-4,
        atol=1e-3,
    )
    scores = patch_scores(cuda, knowledge.cuda())
    assert scores.device.type == "cuda"
    torch.testing.assert_close(scores.cpu(), patch_scores(features.half(), knowledge))
    cpu_images = image_scores(features, knowledge, patch_scores(features, knowledge))
    gpu_features, gpu_knowledge = features.cuda(), knowledge.cuda()
    gpu_scores = patch_scores(gpu_features, gpu_knowledge)
    gpu_images = image_scores(gpu_features, gpu_knowledge, gpu_scores)
    torch.testing.assert_close(gpu_images.cpu(), cpu_images, rtol=1e-3, atol=1e-3)
    assert anomaly_maps(scores, (3, 3), 12).device.type == "cuda"
