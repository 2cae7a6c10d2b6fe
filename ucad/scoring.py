"""Task-agnostic scoring: task selection by keys, patch/image scores and anomaly maps.

All distances are Euclidean, computed in float32 on the device of the features, over chunks of
query rows so that one distance block stays near ``_BLOCK_BYTES`` (smaller blocks on a CPU for
the key search, see `_ExhaustiveSearch`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ucad.sampling import flatten_patches

# Big enough for efficient matrix products, small enough that the reduction after each product
# reads a block still warm in cache.
_BLOCK_BYTES = 32 * 2**20
# At most this many patch rows per block of task_distances on a CPU (whole images, at least one).
_CPU_BLOCK_ROWS = 1024


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
    All keys form one bank, so each block of images needs a single matrix product; a block holds
    whole images, about ``chunk_size`` patch rows (at least one image).
    """
    search = _ExhaustiveSearch(features, keys, chunk_size)
    blocks = [search.block(b) for b in range(search.num_blocks)]
    return torch.cat(blocks) if blocks else search.centre.new_zeros(0, search.num_tasks)


def select_task(features: Tensor, keys: Sequence[Tensor]) -> Tensor:
    """Task index (N,) per image: the task whose keys lie closest to the image's patches.

    Exactly ``task_distances(features, keys).argmin(dim=1)``, ties to the lowest index included,
    but most totals are never computed: see `_pruned_argmin`.
    """
    search = _ExhaustiveSearch(features, keys)
    num_images, num_patches = features.shape[:2]
    if search.num_tasks == 1 or num_images == 0 or num_patches == 0:
        # one total per image, or all totals zero: the argmin is task 0
        return torch.zeros(num_images, dtype=torch.long, device=features.device)
    if features.device.type not in _PRUNE_ON or not _ieee_float32_matmul(features.device):
        # On an accelerator the exhaustive search is one fast product per block, against the
        # many small steps of the pruned one (not measured there yet); and with TF32 or bf16
        # products the rounding bounds of the pruned search do not hold.
        return search.argmin()
    return _pruned_argmin(search)


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
    One matrix product per chunk (faster than torch.cdist on CPU). Both sides are centred on the
    bank mean first: distances are unchanged but the norms shrink, which limits cancellation error
    when features share a large common offset.
    """
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"queries (Q, D) and bank (M, D) must share D, got shapes "
            f"{tuple(queries.shape)} and {tuple(bank.shape)}"
        )
    if bank.shape[0] == 0:
        raise ValueError("bank is empty")
    bank = bank.to(queries.device, torch.float32)
    centre = bank.mean(dim=0)
    bank = bank - centre
    bank_sq = bank.pow(2).sum(dim=1)
    rows = chunk_size or max(1, _BLOCK_BYTES // (4 * bank.shape[0]))
    for chunk in queries.split(rows):
        chunk = chunk.float() - centre
        yield torch.addmm(bank_sq, chunk, bank.T, alpha=-2), chunk.pow(2).sum(dim=1, keepdim=True)


def _finish(partial: Tensor, query_sq: Tensor) -> Tensor:
    """Distances from reduced partial values (rows, m) and the queries' squared norms (rows, 1)."""
    return partial.add_(query_sq).clamp_min_(0).sqrt_()


class _ExhaustiveSearch:
    """`task_distances`' arithmetic: all keys in one centred bank, images in fixed blocks.

    `select_task` reasons about these very float operands (features and keys minus `centre`)
    and, for an image it cannot decide by bounds, computes that image's block: the same
    operations on the same operands, hence the same bits as `task_distances`. The bank itself
    is built only when a block is computed.
    """

    def __init__(
        self, features: Tensor, keys: Sequence[Tensor], chunk_size: int | None = None
    ) -> None:
        self.features = features
        self.queries = flatten_patches(features)
        dim, self.device = features.shape[-1], features.device
        if not keys:
            raise ValueError("keys must hold at least one task")
        self.sizes = [int(task_keys.shape[0]) for task_keys in keys]
        if min(self.sizes) < 1:
            raise ValueError(f"every task needs at least one key, got key counts {self.sizes}")
        shapes = [tuple(task_keys.shape) for task_keys in keys]
        if any(len(shape) != 2 or shape[1] != dim for shape in shapes):
            raise ValueError(f"keys must be (K_t, {dim}) tensors like the features, got {shapes}")
        self.keys = [task_keys.to(self.device, torch.float32) for task_keys in keys]
        # Shorter tasks are padded by repeating their last key (a duplicate cannot change a
        # minimum), so that per-task minima are a reshape of (rows, T * K_max).
        self.num_tasks, self.slots = len(keys), max(self.sizes)
        # The mean of the padded bank: centred, distances are unchanged but the norms shrink,
        # which limits cancellation error when features share a large common offset.
        total = torch.zeros(dim, device=self.device)
        for task_keys, size in zip(self.keys, self.sizes, strict=True):
            total += task_keys.sum(dim=0)
            if size < self.slots:
                total += (self.slots - size) * task_keys[-1]
        self.centre = total / (self.num_tasks * self.slots)
        # Few images per block on a CPU, so that an image `select_task` cannot decide by bounds
        # costs little more than itself.
        rows = max(1, _BLOCK_BYTES // (4 * self.num_tasks * self.slots))
        rows = chunk_size or (rows if features.is_cuda else min(rows, _CPU_BLOCK_ROWS))
        self.images_per_block = max(1, rows // max(1, features.shape[1]))
        self.num_blocks = -(-features.shape[0] // self.images_per_block)
        self._bank: tuple[Tensor, Tensor] | None = None

    def centred(self, task: int) -> Tensor:
        """The keys (K_t, D) of ``task`` minus `centre`: rows of the bank."""
        return self.keys[task] - self.centre

    def bank(self) -> tuple[Tensor, Tensor]:
        """The centred bank (T * K_max, D) and its rows' squared norms."""
        if self._bank is None:
            bank = torch.empty(self.num_tasks, self.slots, self.centre.shape[0], device=self.device)
            for task_keys, rows, size in zip(self.keys, bank, self.sizes, strict=True):
                torch.sub(task_keys, self.centre, out=rows[:size])
                rows[size:] = rows[size - 1]
            bank = bank.flatten(0, 1)
            self._bank = bank, _squared_norms(bank)
        return self._bank

    def block(self, index: int) -> Tensor:
        """Totals (n, T) of the images of block ``index``."""
        bank, bank_sq = self.bank()
        start = index * self.images_per_block
        images = self.features[start : start + self.images_per_block]
        chunk = flatten_patches(images).float() - self.centre
        partial = torch.addmm(bank_sq, chunk, bank.T, alpha=-2)
        minima = partial.view(-1, self.num_tasks, self.slots).amin(dim=2)
        per_patch = _finish(minima, chunk.pow(2).sum(dim=1, keepdim=True))
        return per_patch.view(*images.shape[:2], self.num_tasks).sum(dim=1)

    def argmin(self) -> Tensor:
        """``task_distances(...).argmin(dim=1)``."""
        return torch.cat([self.block(b).argmin(dim=1) for b in range(self.num_blocks)])

    def decide(self, images: Tensor, chosen: Tensor) -> None:
        """Set ``chosen`` (N,) to the argmin for every image in a block with one of ``images``
        that is undecided (negative in ``chosen``)."""
        images = images[chosen[images] < 0]
        if len(images) == 0:
            return
        for b in (images // self.images_per_block).unique().tolist():
            start = b * self.images_per_block
            winners = self.block(b).argmin(dim=1)
            chosen[start : start + len(winners)] = winners


def _squared_norms(rows: Tensor) -> Tensor:
    """Squared norms of ``rows`` (n, D), in chunks: no temporary as large as ``rows``."""
    step = max(1, _BOUND_BLOCK_BYTES // (4 * rows.shape[1]))
    return torch.cat([chunk.pow(2).sum(dim=1) for chunk in rows.split(step)])


# Pruned key search ------------------------------------------------------------------------------
#
# Per patch x and task t the exhaustive search computes d_t(x)^2 = ||x||^2 + min_k (||k||^2 - 2xk)
# on centred float32 operands. A lower bound of it comes from the same expression in a few
# dimensions: with Pi the projection on the main `_BOUND_DIMS` directions of patches and keys,
#   ||x - k||^2 = ||Pi(x - k)||^2 + ||Pi'(x - k)||^2 >= ||Pi(x - k)||^2 + (||Pi'x|| - ||Pi'k||)^2,
# that is ||x||^2 + ||k||^2 - 2 <(Pi x, ||Pi'x||), (Pi k, ||Pi'k||)>, a product of
# 16-64 + 2 columns (with ||k||^2) instead of D. Summed over an image's patches it bounds
# the task's total from below; a task whose bound exceeds an upper bound of a total the search did
# compute cannot be the argmin. Both sides carry a worst-case float32 rounding margin (this
# search's products and the exhaustive search's own), so rounding can never prune the task
# `task_distances` would choose.

# Directions of the bound by number of tasks: its product grows with the tasks, the exact totals
# it leaves grow fewer with the directions (measured on ViT-B features, 10 and 100 classes).
_BOUND_DIMS = ((16, 64), (64, 32), (math.inf, 16))  # (up to this many tasks, directions)
# Blocks of the bound's product on a CPU: a few rows of (Q, T * K_max), reduced while in cache.
_BOUND_BLOCK_BYTES = 4 * 2**20
# Patches and keys (each at most this many rows) the directions are estimated from.
_SUBSPACE_SAMPLE = 256
_SUBSPACE_ITERATIONS = 1
# Images routed first; when none of them can be pruned, the rest go to the exhaustive search.
_PROBE_IMAGES = 4
# Typical lower bound / total (measured: 0.85-0.95 on ViT features); only steers the work.
_TIGHTNESS = 0.8
_ROUNDOFF = 2.0**-24  # float32 unit roundoff
# Devices select_task prunes on.
_PRUNE_ON = ("cpu",)


def _ieee_float32_matmul(device: torch.device) -> bool:
    """Whether float32 matrix products round like float32 (no TF32 or bf16 shortcuts)."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return False
    for backend in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None)):
        precision = getattr(backend, "fp32_precision", "none")
        if precision not in ("none", "ieee"):
            return False
    return True


def _pruned_argmin(search: _ExhaustiveSearch) -> Tensor:
    """``task_distances(...).argmin(dim=1)`` from bounds and a few exact totals per image.

    First for `_PROBE_IMAGES` images, then for the rest, unless bounds pruned nothing there
    (then the rest take the exhaustive search at once); see `_PrunedSearch.route`.
    """
    pruned = _PrunedSearch(search)
    num_images = search.features.shape[0]
    probe = min(num_images, _PROBE_IMAGES)
    if pruned.route(0, probe):
        pruned.route(probe, num_images)
    else:
        search.decide(torch.arange(probe, num_images, device=pruned.chosen.device), pruned.chosen)
    return pruned.chosen


class _PrunedSearch:
    """The state of `_pruned_argmin`: bound operands, exact totals and choices."""

    def __init__(self, search: _ExhaustiveSearch) -> None:
        self.search = search
        num_images, self.num_patches, dim = search.features.shape
        tasks, slots = search.num_tasks, search.slots
        device = search.features.device
        self.chosen = torch.full((num_images,), -1, dtype=torch.long, device=device)
        bound_dim = min(next(d for most, d in _BOUND_DIMS if tasks <= most), dim)
        # |computed - exact| <= margin (||x|| + ||k||)^2 for each squared distance: a dot product
        # of n terms errs by at most n u ||x|| ||k||; with a factor two to spare.
        self.exact_margin = 4 * (dim + 8) * _ROUNDOFF  # this search's and the exhaustive one's
        self.bound_margin = 2 * (dim + bound_dim + 8) * (2 + math.sqrt(bound_dim + 1)) * _ROUNDOFF
        self.sum_factor = (2 * self.num_patches + 8) * _ROUNDOFF  # sums of P terms, and roots
        # The bound's operands: [u, 1] . [-2v, ||k||^2] = ||k||^2 - 2uv, for the padded tasks;
        # one pass over the keys, a few tasks at a time.
        patches = search.queries[:: -(-len(search.queries) // _SUBSPACE_SAMPLE)]
        step = -(-sum(search.sizes) // _SUBSPACE_SAMPLE)
        keys = torch.cat([task_keys[::step] for task_keys in search.keys])
        self.basis = _principal_basis(torch.cat([patches.float(), keys]) - search.centre, bound_dim)
        key_low = torch.empty(tasks, slots, bound_dim + 2, device=device)
        for group in _task_groups(search.sizes, _BOUND_BLOCK_BYTES // (4 * dim)):
            centred = torch.cat([search.keys[task] for task in group]) - search.centre
            low = torch.cat(
                [_with_residual_norm(centred, self.basis), _squared_norms(centred)[:, None]], dim=1
            )
            if all(search.sizes[task] == slots for task in group):  # no padding: one copy
                key_low[group[0] : group[-1] + 1] = low.view(len(group), slots, -1)
                continue
            for task, rows in zip(group, low.split([search.sizes[t] for t in group]), strict=True):
                key_low[task, : len(rows)] = rows
                key_low[task, len(rows) :] = rows[-1]
        self.key_sq = key_low[:, :, -1].flatten()  # (T * K_max,) a copy
        self.key_norm = self.key_sq.view(tasks, slots).amax(dim=1).sqrt()  # largest per task
        key_low[:, :, :-1] *= -2
        self.key_low = key_low.flatten(0, 1).T.contiguous()
        # exact totals of (image, task) pairs, with intervals that hold the exhaustive totals
        self.value = torch.full((num_images, tasks), math.inf, device=device)
        self.low, self.high = self.value.clone(), self.value.clone()

    def route(self, start: int, stop: int) -> bool:
        """Choose the task of images ``start:stop``; whether bounds left any to prune.

        1. Lower bounds of every total.
        2. Per image, the exact total of its task with the least bound bounds the winner's.
        3. Tasks whose lower bound exceeds that cannot win. Images left with many candidates (no
           task stands out) take the exhaustive search's block: pruning would not pay.
        4. The other candidates get exact totals. The least wins where its interval lies
           strictly below every other candidate's; otherwise (a tie or a near tie) the image's
           exhaustive block decides.
        """
        if start >= stop:
            return False
        search, chosen = self.search, self.chosen
        images = torch.arange(start, stop, device=chosen.device)
        # the exhaustive search's operands for these images
        rows = slice(start * self.num_patches, stop * self.num_patches)
        self.start, self.queries = start, search.queries[rows].float() - search.centre
        self.query_sq = self.queries.pow(2).sum(dim=1)
        # Products and sums of finite operands must stay finite for the bounds to mean anything.
        largest = self.query_sq.max().sqrt() + self.key_norm.max()
        if not bool(torch.isfinite(largest * largest)):
            search.decide(images, chosen)
            return False
        lower = self.lower_bounds()
        crowd = max(2, search.num_tasks // 2)
        # Bounds are typically _TIGHTNESS or more of the totals, so tasks with bounds within
        # 1 / _TIGHTNESS of the least are likely candidates: with too many, the image goes
        # exhaustive at once (a guess that decides what is cheaper, never the result).
        likely = (lower <= lower.amin(dim=1, keepdim=True) / _TIGHTNESS).sum(dim=1)
        search.decide(images[likely > crowd], chosen)
        pending = (chosen[images] < 0).nonzero().flatten()  # positions within images
        first = lower[pending].argmin(dim=1)
        self.evaluate(images[pending], first)
        candidates = torch.zeros_like(lower, dtype=torch.bool)
        # (written so that a NaN bound prunes nothing)
        candidates[pending] = ~(lower[pending] > self.high[images[pending], first][:, None])
        candidates[pending, first] = True
        search.decide(images[candidates.sum(dim=1) > crowd], chosen)
        candidates &= (chosen[images] < 0)[:, None]
        pruning = bool(candidates.any())
        candidates[pending, first] = False  # evaluated already
        pairs = candidates.nonzero()
        self.evaluate(images[pairs[:, 0]], pairs[:, 1])
        winner = self.value[images].argmin(dim=1)
        others = self.low[images]
        others[torch.arange(len(images), device=chosen.device), winner] = math.inf
        proven = self.high[images, winner] < others.amin(dim=1)
        mine = chosen[images]
        chosen[images] = torch.where((mine < 0) & proven, winner, mine)
        search.decide(images[(mine < 0) & ~proven], chosen)
        return pruning

    def lower_bounds(self) -> Tensor:
        """Lower bounds (n, T) of the totals `task_distances` gives the current images."""
        search, query_sq = self.search, self.query_sq
        query_low = _with_residual_norm(self.queries, self.basis)
        query_low = torch.cat([query_low, torch.ones_like(query_sq)[:, None]], dim=1)
        budget = _BLOCK_BYTES if query_sq.is_cuda else _BOUND_BLOCK_BYTES
        step = max(1, budget // (4 * self.key_low.shape[1]))
        bound_sq = torch.cat(
            [
                torch.mm(chunk, self.key_low).view(-1, search.num_tasks, search.slots).amin(dim=2)
                for chunk in query_low.split(step)
            ]
        ).add_(query_sq[:, None])
        scale = (query_sq.sqrt()[:, None] + self.key_norm).square_()
        bound_sq.sub_(scale.mul_(self.bound_margin)).clamp_min_(0).sqrt_()
        lower = bound_sq.view(-1, self.num_patches, search.num_tasks).sum(dim=1)
        return lower.mul_(1 - self.sum_factor)

    def evaluate(self, images: Tensor, tasks: Tensor) -> None:
        """Exact totals, and intervals around them, of (image, task) pairs; grouped by task."""
        search, patches = self.search, self.num_patches
        queries, query_sq = self.queries, self.query_sq
        offsets = torch.arange(patches, device=queries.device)
        per_block = max(1, _BLOCK_BYTES // (4 * search.slots * patches))
        for task in tasks.unique().tolist():
            keys = search.centred(task)
            keys_sq = self.key_sq[task * search.slots : task * search.slots + len(keys)]
            for part in images[tasks == task].split(per_block):
                first, count = int(part[0]) - self.start, len(part)
                if int(part[-1]) - self.start - first + 1 == count:  # consecutive: a view
                    rows = slice(first * patches, (first + count) * patches)
                else:
                    rows = ((part[:, None] - self.start) * patches + offsets).flatten()
                minima = torch.addmm(keys_sq, queries[rows], keys.T, alpha=-2)
                exact_sq = minima.amin(dim=1).add_(query_sq[rows]).clamp_min_(0)
                margin = (query_sq[rows].sqrt() + self.key_norm[task]).square_()
                margin = margin.mul_(self.exact_margin).view(count, patches)
                exact_sq = exact_sq.view(count, patches)
                # the intervals' own sums and roots round too: sum_factor
                low = (exact_sq - margin).clamp_min_(0).sqrt_().sum(dim=1)
                self.low[part, task] = low.mul_(1 - self.sum_factor)
                high = (exact_sq + margin).sqrt_().sum(dim=1)
                self.high[part, task] = high.mul_(1 + self.sum_factor)
                self.value[part, task] = exact_sq.sqrt_().sum(dim=1)


def _task_groups(sizes: Sequence[int], rows: int) -> Iterator[list[int]]:
    """Consecutive tasks in groups of about ``rows`` keys (at least one task per group)."""
    group: list[int] = []
    total = 0
    for task, size in enumerate(sizes):
        if group and total + size > rows:
            yield group
            group, total = [], 0
        group.append(task)
        total += size
    if group:
        yield group


def _principal_basis(sample: Tensor, dim: int) -> Tensor:
    """Orthonormal rows (dim, D): the main directions of the rows of ``sample``.

    One step of subspace iteration from a fixed random start, so the result does not depend on
    any global random state. Any orthonormal basis gives valid bounds; this one makes them tight.
    """
    total = sample.shape[1]
    if dim >= total:
        return torch.eye(total, device=sample.device)
    sample = sample.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    sample = sample / sample.abs().max().clamp_min(1e-30)  # no overflow in the products
    start = torch.randn(total, dim + 8, generator=torch.Generator().manual_seed(0))
    basis = start.to(sample.device)
    for _ in range(_SUBSPACE_ITERATIONS):
        basis = torch.linalg.qr(basis.double()).Q.float()
        basis = sample.T @ (sample @ basis)
    basis = torch.linalg.qr(basis.double()).Q
    projected = (sample @ basis.float()).double()
    _, vectors = torch.linalg.eigh(projected.T @ projected)  # ascending eigenvalues
    top = torch.linalg.qr(basis @ vectors[:, -dim:]).Q
    return top.T.float().contiguous()


def _with_residual_norm(rows: Tensor, basis: Tensor) -> Tensor:
    """(n, dim + 1): coordinates of ``rows`` in ``basis`` and the norm of what is left out.

    In chunks, so that the residuals never leave the cache: one pass over ``rows``.
    """
    out = rows.new_empty(rows.shape[0], basis.shape[0] + 1)
    step = max(1, _BOUND_BLOCK_BYTES // (4 * rows.shape[1]))
    for chunk, part in zip(rows.split(step), out.split(step), strict=True):
        part[:, :-1] = coordinates = chunk @ basis.T
        part[:, -1] = torch.addmm(chunk, coordinates, basis, alpha=-1).norm(dim=1)
    return out


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
