import pytest
import torch

from ucad.sampling import (
    approximate_coreset,
    farthest_point_sampling,
    sample_keys,
    sample_knowledge,
)


def line(*values: float) -> torch.Tensor:
    return torch.tensor(values)[:, None]


def test_fps_on_a_line_picks_farthest_first():
    # From 0: 10 is farthest; then 2 (distance 2 to {0, 10}) beats 1 (distance 1).
    assert farthest_point_sampling(line(0, 1, 2, 10), 3).tolist() == [0, 3, 2]


def test_fps_respects_start():
    # From 10: 0 is farthest, then 5 (distance 5), then 2 (distance 2 to {0, 5}).
    x = line(0, 1, 2, 5, 10)
    assert farthest_point_sampling(x, 4, start=4).tolist() == [4, 0, 3, 2]


def test_fps_k_at_least_n_returns_all():
    x = torch.randn(5, 3)
    assert farthest_point_sampling(x, 5).tolist() == [0, 1, 2, 3, 4]
    assert farthest_point_sampling(x, 9).tolist() == [0, 1, 2, 3, 4]


def test_fps_never_repeats_duplicates():
    x = line(0, 0, 0, 1)
    assert sorted(farthest_point_sampling(x, 3).tolist()) in ([0, 1, 3], [0, 2, 3])


def reference_fps(x: torch.Tensor, k: int, start: int = 0) -> list[int]:
    """Farthest point sampling by direct float64 differences, one point at a time."""
    points = x.double()
    selected = [start]
    nearest = (points - points[start]).norm(dim=1)
    for _ in range(k - 1):
        nearest[selected] = -1.0
        selected.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, (points - points[selected[-1]]).norm(dim=1))
    return selected


def test_fps_half_precision_matches_float():
    x = torch.randn(200, 16)
    half = farthest_point_sampling(x.half(), 20)
    full = farthest_point_sampling(x.half().float(), 20)
    assert torch.equal(half, full)


@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_fps_half_input_selects_what_float64_selects(scale):
    # Values exactly representable in half precision; at scale 300 their squares (~1e5) overflow
    # float16 (max 65504), so squared distances computed in half precision would all be inf.
    g = torch.Generator().manual_seed(0)
    x64 = (torch.randn(300, 16, generator=g) * scale).half().double()
    assert torch.isfinite(x64.half()).all()
    expected = reference_fps(x64, 25, start=4)
    assert farthest_point_sampling(x64, 25, start=4).tolist() == expected
    assert farthest_point_sampling(x64.half(), 25, start=4).tolist() == expected


def test_coreset_half_input_selects_what_float64_selects():
    g = torch.Generator().manual_seed(1)
    x64 = (torch.randn(400, 64, generator=g) * 300).half().double()
    expected = approximate_coreset(x64, 30, projection_dim=16, seed=2)
    assert torch.equal(approximate_coreset(x64.half(), 30, projection_dim=16, seed=2), expected)
    # and without projection (D <= projection_dim): exact FPS from the seeded start
    narrow = x64[:, :8]
    indices = approximate_coreset(narrow.half(), 12, projection_dim=8, seed=2)
    assert indices.tolist() == reference_fps(narrow, 12, start=int(indices[0]))
    assert torch.equal(indices, approximate_coreset(narrow, 12, projection_dim=8, seed=2))


def test_fps_rejects_bad_input():
    with pytest.raises(ValueError, match="k must be"):
        farthest_point_sampling(torch.randn(4, 2), 0)
    with pytest.raises(ValueError, match="start"):
        farthest_point_sampling(torch.randn(4, 2), 2, start=4)
    with pytest.raises(ValueError, match="matrix"):
        farthest_point_sampling(torch.randn(4), 2)


def test_coreset_is_deterministic_per_seed():
    x = torch.randn(500, 256)
    first = approximate_coreset(x, 30, projection_dim=32, seed=3)
    assert torch.equal(first, approximate_coreset(x, 30, projection_dim=32, seed=3))
    assert not torch.equal(first, approximate_coreset(x, 30, projection_dim=32, seed=4))
    assert first.unique().numel() == 30


def test_coreset_without_projection_is_fps_from_seeded_start():
    x = torch.randn(100, 8)
    indices = approximate_coreset(x, 10, projection_dim=8, seed=1)
    assert torch.equal(indices, farthest_point_sampling(x, 10, start=int(indices[0])))


def test_coreset_covers_separated_clusters():
    centres = torch.eye(4) * 100
    x = (centres[:, None, :] + torch.randn(4, 50, 4)).reshape(-1, 4)
    x = torch.cat([x, torch.zeros(200, 60)], dim=1)  # D = 64 > projection_dim
    indices = approximate_coreset(x, 4, projection_dim=16, seed=0)
    assert sorted((indices // 50).tolist()) == [0, 1, 2, 3]


def test_sample_keys_and_knowledge_return_selected_vectors():
    features = torch.randn(3, 10, 8, generator=torch.Generator().manual_seed(0)).half()
    keys = sample_keys(features, 5)
    knowledge = sample_knowledge(features, 6, projection_dim=4, seed=0)
    patches = features.reshape(-1, 8).float()
    for sample, size in ((keys, 5), (knowledge, 6)):
        assert sample.shape == (size, 8) and sample.dtype == torch.float32
        assert sample.is_contiguous() and sample.device.type == "cpu"
        # every sampled vector is one of the patches, bit for bit, and none is taken twice
        matches = (sample[:, None, :] == patches[None, :, :]).all(dim=2)
        assert matches.any(dim=1).all()
        assert matches.float().argmax(dim=1).unique().numel() == size
    assert torch.equal(keys, patches[farthest_point_sampling(patches, 5)])


def test_sample_keys_rejects_flat_features():
    with pytest.raises(ValueError, match=r"\(N, P, D\)"):
        sample_keys(torch.randn(10, 8), 5)
