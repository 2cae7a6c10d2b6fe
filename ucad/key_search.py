"""Exact pruned key search: `ucad.scoring.select_task` without most of the exhaustive products.

For a patch x and a task t, `task_distances` takes the distance to the nearest key,
sqrt(min_k ||x - k||^2), on centred float32 operands, and sums it over the image's patches. A
lower bound of it needs far fewer operations: with Pi v the coordinates of v on a few (``dim``)
orthonormal principal directions and r(v) the norm of what they leave out,

    ||x - k||^2 = ||Pi x - Pi k||^2 + ||(residual of x) - (residual of k)||^2
               >= ||Pi x - Pi k||^2 + (r(x) - r(k))^2
               =  ||x||^2 + ||k||^2 - 2 <(Pi x, r(x)), (Pi k, r(k))>,

a product of dim + 2 columns (the last one carries ||k||^2) instead of D. Summed over an image's
patches it bounds the task's total from below. Per image, the task with the least bound gets its
exact total; tasks whose bound exceeds that cannot win; the few left get exact totals too. Each
exact total comes with an interval that holds the total `task_distances` computes, and the image
is settled only when the least total's interval lies strictly below every other task's bound or
interval. Ties and near ties are therefore never settled here: those images take their totals
from `task_distances`' own blocks, bit for bit, so the result is always its argmin, ties to the
lowest index included.

Rounding (u = 2^-24; D dimensions, dim directions, P patches; N_x = ||x||, R_t the largest key
norm of task t). A dot product of n float32 terms errs by at most about n u sum|a_i b_i|, in any
order, with or without fused multiply-adds. Hence a squared distance from ||k||^2 - 2xk + ||x||^2,
in `task_distances` or here, errs by at most 2 (D + 2) u (N_x + R_t)^2. The bound's own errors
come from the float32 basis (rounded from an orthonormal float64 one), the coordinates (each off
by at most (D + 1) u N_x, so sqrt(dim) (D + 1) u N_x in all), the residual, its norm and the small
product; they sum to at most (2 sqrt(dim) (D + 1) + (dim + 2)(sqrt(dim) + 2) + 2 D + 4) u
(N_x + R_t)^2, to which the exhaustive search's own error is added. Both margins below are twice
these sums. A sum of P non-negative terms errs by at most (P - 1) u of their sum, and square roots
round correctly, so totals widen by (2 P + 8) u relatively. Products that underflow lose up to
2^-150 each, far less than `_TINY`, which every squared margin adds. Images whose norms could
overflow, non-finite operands, and products that may round below float32 (TF32, bf16) go to the
exhaustive search.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

_U = 2.0**-24  # float32 unit roundoff
_TINY = 2.0**-120  # absolute squared margin: covers underflow, negligible for real distances
_LARGEST_NORM = 2.0**50  # below this, no square, product or sum comes near float32's 2^128
# Principal directions of the bound. More make it tighter (fewer exact totals) and cost little
# in the bound's product, which is bound by writing its (patches, keys) output; 32 did as well as
# 16 on `ucad bench`'s classes (noisy copies of one) and far better than 16 on 100 well separated
# synthetic classes; 64 was slower on both (10 and 100 classes).
_BOUND_DIM = 32
# Patches and keys (at most this many rows of each) the directions are estimated from.
_SUBSPACE_SAMPLE = 256
# Images routed first; when bounds settle none of them, all images go to the exhaustive search.
_PROBE_IMAGES = 4
# Bytes of one block of centred patch rows, of a block of bound products, of an exact product.
_BATCH_BYTES = 32 * 2**20
_BOUND_BLOCK_BYTES = 4 * 2**20


def prunes_on(device: torch.device) -> bool:
    """Whether `pruned_argmin` may run on ``device``: a CPU with IEEE float32 matrix products.

    On an accelerator the exhaustive search is one fast product per block against many small
    steps here (not measured there); with TF32 or bf16 products the margins do not hold.
    """
    if device.type != "cpu":
        return False
    # 'none' defers to the level above (matmul -> mkldnn -> global); older torch has no such API
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    levels = (matmul, torch.backends.mkldnn, torch.backends)
    settings = [getattr(level, "fp32_precision", None) for level in levels]
    if settings[0] is None:
        return torch.get_float32_matmul_precision() == "highest"
    return next((s for s in settings if s not in (None, "none")), "ieee") == "ieee"


def pruned_argmin(
    patches: Tensor,
    num_patches: int,
    keys: Tensor,
    centre: Tensor,
    exhaustive: Callable[[Tensor], Tensor],
) -> Tensor:
    """``task_distances(...).argmin(dim=1)`` from bounds and a few exact totals per image.

    ``patches`` (N * P, D) and ``keys`` (T, K, D) float32 (short tasks padded by repeating a key)
    as `task_distances` reads them, ``centre`` (D,) what it subtracts from both.
    ``exhaustive(images)`` returns its argmin for the images (indices) it is given.
    """
    num_images = len(patches) // num_patches
    chosen = torch.full((num_images,), -1, dtype=torch.long, device=patches.device)
    search = _PrunedSearch(patches, num_patches, keys, centre)
    batch = max(1, _BATCH_BYTES // (4 * num_patches * patches.shape[1]))
    starts = [0, *range(min(_PROBE_IMAGES, num_images), num_images, batch)]
    if search.usable:
        for start, stop in zip(starts, [*starts[1:], num_images], strict=True):
            settled = search.route(start, stop)
            chosen[start:stop] = settled
            if start == 0 and not bool((settled >= 0).any()):
                break  # bounds did not help on the probe: they rarely will on the rest
    undecided = (chosen < 0).nonzero().flatten()
    if len(undecided):
        chosen[undecided] = exhaustive(undecided)
    return chosen


class _PrunedSearch:
    """Bound operands of all keys, and the routing of one batch of images at a time."""

    def __init__(self, patches: Tensor, num_patches: int, keys: Tensor, centre: Tensor) -> None:
        self.patches, self.num_patches, self.keys, self.centre = patches, num_patches, keys, centre
        num_tasks, slots, dim = keys.shape
        bound_dim = min(_BOUND_DIM, dim)
        self.exact_margin = 8 * (dim + 2) * _U
        root = math.sqrt(bound_dim)
        bound_error = 2 * root * (dim + 1) + (bound_dim + 2) * (root + 2) + 2 * dim + 4
        self.bound_margin = 2 * (bound_error + 2 * (dim + 2)) * _U
        self.sum_slack = (2 * num_patches + 8) * _U
        flat_keys = keys.flatten(0, 1)
        sample = torch.cat(
            [_every_nth(patches, _SUBSPACE_SAMPLE).float(), _every_nth(flat_keys, _SUBSPACE_SAMPLE)]
        )
        self.basis = _principal_basis(sample - centre.float(), bound_dim)
        # the small product's key side: [-2 Pi k, -2 r(k), ||k||^2], (dim + 2, T * K)
        projected = _project(flat_keys, centre, self.basis)
        self.key_sq = projected[:, -1].view(num_tasks, slots)
        self.key_norm = self.key_sq.amax(dim=1).sqrt()  # R_t
        # NaN compares false: any non-finite key leaves everything to the exhaustive search
        self.usable = bool(self.key_norm.max() <= _LARGEST_NORM)
        projected[:, :-1] *= -2
        self.key_side = projected.T.contiguous()

    def route(self, start: int, stop: int) -> Tensor:
        """The task of each image ``start:stop`` where bounds settle it, else -1."""
        num_images, patches = stop - start, self.num_patches
        query_side = _project(
            self.patches[start * patches : stop * patches], self.centre, self.basis
        )
        query_sq = query_side[:, -1].clone()
        query_side[:, -1] = 1  # [Pi x, r(x), 1]
        # NaN compares false: non-finite images are left to the exhaustive search
        largest = query_sq.view(num_images, patches).amax(dim=1).sqrt() + self.key_norm.max()
        finite = largest <= _LARGEST_NORM
        lower = self._lower_bounds(query_side, query_sq)  # (n, T)
        images = torch.arange(num_images, device=lower.device)
        # exact totals: first the task with the least bound, then every task that may beat it
        value, low, high = (torch.full_like(lower, math.inf) for _ in range(3))
        totals = (start, query_sq, value, low, high)
        self._evaluate(images[finite], lower.argmin(dim=1)[finite], *totals)
        first_high = high.amin(dim=1, keepdim=True)  # the only task with an interval yet
        # (written so that a NaN bound stays a candidate)
        candidates = ~(lower > first_high) & finite[:, None]
        candidates &= torch.isinf(value)  # not evaluated yet
        # with most tasks left, exact totals cost more than the exhaustive block: leave those
        crowded = candidates.sum(dim=1) >= max(2, lower.shape[1] // 2)
        pairs = (candidates & ~crowded[:, None]).nonzero()
        self._evaluate(pairs[:, 0], pairs[:, 1], *totals)
        winner = value.argmin(dim=1)
        rivals = torch.where(torch.isinf(value), lower, low)
        rivals[images, winner] = math.inf
        # not `>=`: NaN anywhere leaves the image unsettled
        settled = (high[images, winner] < rivals.amin(dim=1)) & finite & ~crowded
        return torch.where(settled, winner, -1)

    def _lower_bounds(self, query_side: Tensor, query_sq: Tensor) -> Tensor:
        """Lower bounds (n, T) of the totals `task_distances` computes for these images."""
        num_tasks, slots = self.key_sq.shape
        step = max(1, _BOUND_BLOCK_BYTES // (4 * num_tasks * slots))
        least = torch.cat(
            [
                torch.mm(rows, self.key_side).view(-1, num_tasks, slots).amin(dim=2)
                for rows in query_side.split(step)
            ]
        )
        margin = (query_sq.sqrt()[:, None] + self.key_norm).square_().mul_(self.bound_margin)
        bound_sq = least.add_(query_sq[:, None]).sub_(margin.add_(_TINY))
        per_patch = bound_sq.clamp_min_(0).sqrt_().view(-1, self.num_patches, num_tasks)
        return per_patch.sum(dim=1).mul_(1 - self.sum_slack)

    def _evaluate(
        self,
        images: Tensor,
        tasks: Tensor,
        start: int,
        query_sq: Tensor,
        value: Tensor,
        low: Tensor,
        high: Tensor,
    ) -> None:
        """Exact totals of (image, task) pairs in ``value``, and in ``low`` and ``high`` the ends
        of an interval that holds the total `task_distances` computes; ``images`` count from
        ``start``, ``query_sq`` holds their patches' squared norms."""
        patches = self.num_patches
        offsets = torch.arange(patches, device=images.device)
        per_product = max(1, _BATCH_BYTES // (4 * patches * max(self.keys.shape[1:])))
        for task in tasks.unique().tolist():
            keys = self.keys[task] - self.centre  # the very operands of task_distances
            for part in images[tasks == task].split(per_product):
                rows = (part[:, None] * patches + offsets).flatten()
                queries = self.patches[start * patches + rows].to(self.centre) - self.centre
                product = torch.addmm(self.key_sq[task], queries, keys.T, alpha=-2)
                dist_sq = product.amin(dim=1).add_(query_sq[rows]).view(-1, patches)
                margin = (query_sq[rows].sqrt() + self.key_norm[task]).square_()
                margin = margin.mul_(self.exact_margin).add_(_TINY).view(-1, patches)
                lows = (dist_sq - margin).clamp_min_(0).sqrt_().sum(dim=1)
                low[part, task] = lows.mul_(1 - self.sum_slack)
                high[part, task] = (dist_sq + margin).sqrt_().sum(dim=1).mul_(1 + self.sum_slack)
                value[part, task] = dist_sq.clamp_min_(0).sqrt_().sum(dim=1)


def _every_nth(rows: Tensor, count: int) -> Tensor:
    """About ``count`` rows spread evenly over ``rows``."""
    return rows[:: max(1, -(-len(rows) // count))]


def _principal_basis(sample: Tensor, dim: int) -> Tensor:
    """Orthonormal rows (dim, D) along the main directions of the finite rows of ``sample``.

    One step of subspace iteration from a fixed random start (no global random state), in float64
    so that the basis is orthonormal to far below float32 rounding. Any orthonormal basis gives
    valid bounds; this one makes them tight.
    """
    total = sample.shape[1]
    if dim >= total:
        return torch.eye(total, device=sample.device)
    sample = sample[torch.isfinite(sample).all(dim=1)].double()
    start = torch.randn(total, dim + 8, generator=torch.Generator().manual_seed(0))
    # scaled first, so that huge (finite) rows cannot overflow the products
    sample = sample / sample.abs().max().clamp_min(1e-300) if len(sample) else sample
    span = torch.linalg.qr(sample.T @ (sample @ start.to(sample))).Q  # (D, dim + 8)
    coordinates = sample @ span
    _, vectors = torch.linalg.eigh(coordinates.T @ coordinates)  # ascending eigenvalues
    top = torch.linalg.qr(span @ vectors[:, -dim:]).Q
    return top.T.float().contiguous()


def _project(rows: Tensor, centre: Tensor, basis: Tensor) -> Tensor:
    """(n, dim + 2) for the n ``rows`` minus ``centre``: their coordinates in ``basis``, the norm
    of what it leaves out, and their squared norms.

    In blocks, one pass over ``rows``, so that the centred rows and residuals stay in cache.
    """
    basis = basis.to(centre.dtype)  # float32 here; tests also run the search in float64
    out = centre.new_empty(rows.shape[0], basis.shape[0] + 2)
    step = max(1, _BOUND_BLOCK_BYTES // (4 * rows.shape[1]))
    for block, part in zip(rows.split(step), out.split(step), strict=True):
        block = block.to(centre.dtype) - centre  # the very operands of task_distances
        part[:, :-2] = coordinates = block @ basis.T
        part[:, -2] = torch.addmm(block, coordinates, basis, alpha=-1).norm(dim=1)
        part[:, -1] = block.pow(2).sum(dim=1)
    return out
