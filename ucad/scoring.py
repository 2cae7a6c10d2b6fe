"""Task-agnostic scoring: task selection by keys, patch/image scores and anomaly maps.

All distances are Euclidean, computed in float32 on the device of the features, over chunks of
query rows so that one distance block stays near ``_BLOCK_BYTES``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from ucad import key_search
from ucad.sampling import flatten_patches

# Big enough for efficient matrix products, small enough that the reduction after each product
# reads a block still warm in cache.
_BLOCK_BYTES = 32 * 2**20


def nearest_distances(
    queries: Tensor, bank: Tensor, k: int = 1, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Distances (Q, k) and indices (Q, k) of the ``k`` nearest ``bank`` rows to each query.

    The one nearest-neighbour search of the project; ``chunk_size`` (query rows per distance
    block) defaults to what fits the memory budget.
    """
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be in [1, {bank.shape[0]}] (bank rows), got {k}")
    dists, indices = [], []
    for partial, query_sq in _partial_distance_blocks(queries, bank, chunk_size):
        partial, index = partial.topk(k, dim=1, largest=False)
        dists.append(_finish(partial, query_sq))
        indices.append(index)
    return torch.cat(dists), torch.cat(indices)


def task_distances(
    features: Tensor, keys: Sequence[Tensor], chunk_size: int | None = None
) -> Tensor:
    """Per image and task, the sum over patches of the distance to that task's nearest key.

    ``features`` (N, P, D), ``keys`` one (K_t, D) tensor per task; returns (N, T).
    All keys form one bank, so each block of patches needs a single matrix product.
    """
    return _KeyDistances(features, keys, chunk_size).totals()


def select_task(features: Tensor, keys: Sequence[Tensor]) -> Tensor:
    """Task index (N,) per image: the task whose keys lie closest to the image's patches.

    Always ``task_distances(features, keys).argmin(dim=1)``, ties to the lowest index included.
    Where `ucad.key_search` applies (a CPU, IEEE float32 products) it settles most images from
    bounds and a few exact totals; the others take their totals from `task_distances`' own blocks.
    """
    distances = _KeyDistances(features, keys)
    num_images, num_patches = features.shape[:2]
    if distances.num_tasks == 1 or num_images * num_patches == 0:
        # a single task, or every total zero: argmin is task 0
        return torch.zeros(num_images, dtype=torch.long, device=features.device)
    if not key_search.prunes_on(features.device):
        return distances.totals().argmin(dim=1)
    return key_search.pruned_argmin(
        distances.patches,
        num_patches,
        distances.bank.rows.view(distances.num_tasks, distances.slots, -1),
        distances.bank.centre,
        lambda images: distances.totals(images).argmin(dim=1),
    )


def patch_scores(features: Tensor, knowledge: Tensor) -> Tensor:
    """Patch scores (N, P): distance of each patch of ``features`` (N, P, D) to the knowledge."""
    dist, _ = nearest_distances(flatten_patches(features), knowledge)
    return dist.view(features.shape[:2])


def image_scores(
    features: Tensor,
    knowledge: Tensor,
    patch_scores: Tensor,
    reweight: bool = True,
    neighbours: int = 3,
) -> Tensor:
    """Image scores (N,): the maximum patch score, optionally re-weighted as in PatchCore.

    Re-weighting (Roth et al. 2022, eq. 7): with m_test the top-scoring patch, m* its nearest
    knowledge vector and N_b(m*) the ``neighbours`` nearest knowledge vectors of m*, the score
    is scaled by w = 1 - exp(||m_test - m*||) / sum_{m in N_b(m*)} exp(||m_test - m||).
    N_b(m*) includes m* itself (its own nearest neighbour), as PatchCore's implementation
    does; b is capped at the knowledge size.
    """
    if patch_scores.shape != features.shape[:2]:
        raise ValueError(
            f"patch_scores shape {tuple(patch_scores.shape)} does not match features "
            f"(N, P) = {tuple(features.shape[:2])}"
        )
    if neighbours < 1:
        raise ValueError(f"neighbours must be >= 1, got {neighbours}")
    top_score, top_patch = patch_scores.max(dim=1)
    if not reweight:
        return top_score
    bank = knowledge.to(features.device, torch.float32)
    worst = features[torch.arange(features.shape[0], device=features.device), top_patch].float()
    _, nearest = nearest_distances(worst, bank)
    _, support = nearest_distances(bank[nearest[:, 0]], bank, k=min(neighbours, bank.shape[0]))
    # Both distances by direct differences (N x b vectors only), so the ratio is <= 1 exactly.
    dist_to_nearest = (worst - bank[nearest[:, 0]]).norm(dim=1)
    dist_to_support = (worst[:, None, :] - bank[support]).norm(dim=2)
    # exp(d*) / sum exp(d) as exp(d* - logsumexp(d)): no overflow for large raw distances.
    share = (dist_to_nearest - dist_to_support.logsumexp(dim=1)).exp()
    return (1 - share) * top_score


def anomaly_maps(
    patch_scores: Tensor, grid: tuple[int, int], size: int | tuple[int, int], sigma: float = 4.0
) -> Tensor:
    """Pixel anomaly maps (N, H, W) from patch scores (N, P) on a ``grid`` (h, w) of patches.

    Bilinear upsampling (align_corners=False) to ``size``, then a separable Gaussian blur with
    radius ceil(4 sigma) and reflect padding (radius capped at side - 1 for tiny maps, since
    reflection cannot reach further); sigma 0 disables the blur. Raw distances, no normalising.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if patch_scores.ndim != 2 or patch_scores.shape[1] != grid[0] * grid[1]:
        raise ValueError(
            f"patch_scores must be (N, {grid[0] * grid[1]}) for grid {tuple(grid)}, "
            f"got shape {tuple(patch_scores.shape)}"
        )
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    maps = patch_scores.float().view(-1, 1, *grid)
    maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
    if sigma > 0:
        radius = math.ceil(4 * sigma)
        maps = _blur_axis(maps, sigma, min(radius, height - 1), dim=2)
        maps = _blur_axis(maps, sigma, min(radius, width - 1), dim=3)
    return maps[:, 0]


def _partial_distance_blocks(
    queries: Tensor, bank: Tensor, chunk_size: int | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Per chunk of ``queries``: ``||b||^2 - 2ab`` for every bank row b (rows, M), and ``||a||^2``.

    Squared distances are ``partial + ||a||^2``; callers take minima or top-k of ``partial`` first
    and add ``||a||^2`` to the few survivors (`_finish`). That is exact, since rounding is monotone:
    fl(x + c) never reorders values x, and it saves two passes over each large block.
    """
    centred = _CentredBank(queries, bank)
    for chunk in queries.split(centred.block_rows(chunk_size)):
        yield centred.partial(chunk)


class _CentredBank:
    """A bank (M, D) of float32 rows, centred on their mean, on the device of the queries.

    Distances are unchanged by centring both sides, but the norms shrink, which limits
    cancellation error when features share a large common offset. One matrix product per block
    of queries (faster than torch.cdist on CPU). The centred rows are made on first use:
    `select_task` often needs only the centre.
    """

    def __init__(self, queries: Tensor, bank: Tensor) -> None:
        if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
            raise ValueError(
                f"queries (Q, D) and bank (M, D) must share D, got shapes "
                f"{tuple(queries.shape)} and {tuple(bank.shape)}"
            )
        if bank.shape[0] == 0:
            raise ValueError("bank is empty")
        self.rows = bank.to(queries.device, torch.float32)
        self.centre = self.rows.mean(dim=0)

    @cached_property
    def centred(self) -> tuple[Tensor, Tensor]:
        """The centred rows (M, D) and their squared norms (M,)."""
        centred = self.rows - self.centre
        return centred, centred.pow(2).sum(dim=1)

    def block_rows(self, chunk_size: int | None) -> int:
        """Query rows per block: ``chunk_size``, else what keeps a block near ``_BLOCK_BYTES``."""
        return chunk_size or max(1, _BLOCK_BYTES // (4 * self.rows.shape[0]))

    def partial(self, chunk: Tensor) -> tuple[Tensor, Tensor]:
        """``||b||^2 - 2ab`` (rows, M) and ``||a||^2`` (rows, 1) for a block of query rows."""
        centred, centred_sq = self.centred
        chunk = chunk.float() - self.centre
        partial = torch.addmm(centred_sq, chunk, centred.T, alpha=-2)
        return partial, chunk.pow(2).sum(dim=1, keepdim=True)


def _finish(partial: Tensor, query_sq: Tensor) -> Tensor:
    """Distances from reduced partial values (rows, m) and the queries' squared norms (rows, 1)."""
    return partial.add_(query_sq).clamp_min_(0).sqrt_()


def _padded_key_bank(keys: Sequence[Tensor], device: torch.device) -> Tensor:
    """Keys of all tasks as one (T, K_max, D) float32 tensor, so per-task minima are a reshape.

    Shorter tasks are padded by repeating their last key: a duplicate cannot change a minimum.
    """
    if not keys:
        raise ValueError("keys must hold at least one task")
    sizes = [int(task_keys.shape[0]) for task_keys in keys]
    if min(sizes) < 1:
        raise ValueError(f"every task needs at least one key, got key counts {sizes}")
    slots = max(sizes)
    slot = torch.arange(slots)
    return torch.stack(
        [
            (k if n == slots else k[slot.clamp(max=n - 1)]).to(device, torch.float32)
            for k, n in zip(keys, sizes, strict=True)
        ]
    )


class _KeyDistances:
    """`task_distances`' arithmetic, also for a subset of the images.

    Fixed blocks of patch rows against one centred bank of all keys; a subset's totals come from
    the blocks that hold its patches and the same final sum over a tensor of the same shape, so
    they carry the same bits as the full computation (what `select_task` relies on when it
    settles an image the exhaustive way).
    """

    def __init__(
        self, features: Tensor, keys: Sequence[Tensor], chunk_size: int | None = None
    ) -> None:
        self.patches = flatten_patches(features)
        self.num_images, self.num_patches = features.shape[:2]
        padded = _padded_key_bank(keys, self.patches.device)  # (T, K_max, D)
        self.num_tasks, self.slots = padded.shape[:2]
        self.bank = _CentredBank(self.patches, padded.flatten(0, 1))
        self.rows_per_block = self.bank.block_rows(chunk_size)

    def totals(self, images: Tensor | None = None) -> Tensor:
        """Totals (N, T), or (len(images), T) for the given image indices."""
        num_patches = self.num_patches
        if images is None:
            blocks: Iterable[int] = range(-(-len(self.patches) // self.rows_per_block))
        else:
            # the blocks that hold each image's first and last patch, and those between
            first = (images * num_patches // self.rows_per_block).tolist()
            last = (((images + 1) * num_patches - 1) // self.rows_per_block).tolist()
            blocks = sorted({b for a, z in zip(first, last, strict=True) for b in range(a, z + 1)})
        per_patch = self.patches.new_zeros(len(self.patches), self.num_tasks, dtype=torch.float32)
        for block in blocks:
            rows = slice(block * self.rows_per_block, (block + 1) * self.rows_per_block)
            partial, query_sq = self.bank.partial(self.patches[rows])
            minima = partial.view(-1, self.num_tasks, self.slots).amin(dim=2)
            per_patch[rows] = _finish(minima, query_sq)
        totals = per_patch.view(self.num_images, num_patches, self.num_tasks).sum(dim=1)
        return totals if images is None else totals[images]


def _blur_axis(maps: Tensor, sigma: float, radius: int, dim: int) -> Tensor:
    """Gaussian blur of (N, 1, H, W) ``maps`` along ``dim`` (2 or 3) with reflect padding."""
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    if dim == 2:
        padded = F.pad(maps, (0, 0, radius, radius), mode="reflect")
        return F.conv2d(padded, kernel.view(1, 1, -1, 1))
    padded = F.pad(maps, (radius, radius, 0, 0), mode="reflect")
    return F.conv2d(padded, kernel.view(1, 1, 1, -1))
