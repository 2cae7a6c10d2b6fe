"""Memory sampling: reduce a task's patch features to a few representative vectors.

Keys use exact greedy k-center selection (farthest point sampling); knowledge uses the
PatchCore-style approximate coreset, the same greedy selection on a random projection.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows projected at once, so a half-precision input is never copied to float32 in full.
_PROJECTION_CHUNK = 65536


def farthest_point_sampling(x: Tensor, k: int, start: int = 0) -> Tensor:
    """Greedy k-center selection: indices (k,) of points that cover ``x`` (N, D).

    Starts at ``start`` and repeatedly adds the point farthest (Euclidean) from the selected
    set. Returns ``arange(N)`` when ``k >= N``. Deterministic.
    """
    _check_matrix(x, "x")
    n = x.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0 <= start < n:
        raise ValueError(f"start must be in [0, {n}), got {start}")
    if k >= n:
        return torch.arange(n, device=x.device)

    points = x.float()
    sq_norms = points.pow(2).sum(1)
    selected = torch.empty(k, dtype=torch.long, device=x.device)
    min_sq_dist = torch.full((n,), float("inf"), device=x.device)
    current = torch.tensor(start, device=x.device)
    for step in range(k):
        selected[step] = current
        centre = points[current]
        # ||x - c||^2 by expansion: a matrix-vector product, no (N, D) temporary per step.
        sq_dist = (sq_norms - 2 * (points @ centre) + sq_norms[current]).clamp_min(0)
        torch.minimum(min_sq_dist, sq_dist, out=min_sq_dist)
        # A selected point can never win again, even among duplicates at distance zero.
        min_sq_dist[current] = -1.0
        current = min_sq_dist.argmax()
    return selected


def approximate_coreset(x: Tensor, k: int, projection_dim: int = 128, seed: int = 0) -> Tensor:
    """Approximate greedy coreset of ``x`` (N, D): indices (k,) into the full-dimension rows.

    Runs farthest point sampling on a fixed random Gaussian projection to ``projection_dim``
    (skipped when D <= projection_dim) from a seeded random start. The projection and start
    come from a CPU generator, so they do not depend on the device of ``x``.
    """
    _check_matrix(x, "x")
    if projection_dim < 1:
        raise ValueError(f"projection_dim must be >= 1, got {projection_dim}")
    n, dim = x.shape
    generator = torch.Generator().manual_seed(seed)
    start = int(torch.randint(n, (1,), generator=generator))
    if dim <= projection_dim:
        return farthest_point_sampling(x, k, start=start)
    projection = torch.randn(dim, projection_dim, generator=generator).to(x.device)
    projected = torch.cat([rows.float() @ projection for rows in x.split(_PROJECTION_CHUNK)])
    return farthest_point_sampling(projected, k, start=start)


def sample_keys(features: Tensor, key_size: int) -> Tensor:
    """Task keys: ``key_size`` patch vectors of ``features`` (N, P, D), farthest point sampling."""
    patches = flatten_patches(features)
    return _gather_cpu(patches, farthest_point_sampling(patches, key_size))


def sample_knowledge(
    features: Tensor, knowledge_size: int, projection_dim: int = 128, seed: int = 0
) -> Tensor:
    """Task knowledge: ``knowledge_size`` patch vectors of ``features`` (N, P, D) by coreset."""
    patches = flatten_patches(features)
    indices = approximate_coreset(patches, knowledge_size, projection_dim=projection_dim, seed=seed)
    return _gather_cpu(patches, indices)


def _check_matrix(x: Tensor, name: str) -> None:
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) matrix, got shape {tuple(x.shape)}")


def flatten_patches(features: Tensor) -> Tensor:
    """(N, P, D) patch features -> (N * P, D) rows, image by image."""
    if features.ndim != 3:
        raise ValueError(f"features must be (N, P, D), got shape {tuple(features.shape)}")
    return features.reshape(-1, features.shape[-1])


def _gather_cpu(patches: Tensor, indices: Tensor) -> Tensor:
    return patches[indices].float().cpu().contiguous()
