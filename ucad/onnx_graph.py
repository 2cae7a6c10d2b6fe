"""The whole of `UCAD.predict` as one traceable torch module, for the ONNX export (`ucad.export`).

`build_graph(model)` returns it. Its one input, `images`: uint8 RGB, NHWC (batch, crop, crop, 3),
each image already resized (shorter side to `resize`) and centre cropped to `crop` by
`ucad.data.images.Geometry` with the interpolation `ucad-export.json` names; the normalisation
(x / 255 - mean) / std happens inside. Its outputs, per image:

    task           int64   (batch,)            the class chosen by its keys (index into classes)
    score          float32 (batch,)            image anomaly score, to compare with that class's
                                               threshold
    map            float32 (batch, crop, crop) anomaly map at the model's input size
    key_distances  float32 (batch, classes)    per class, the sum over patches of the distance
                                               to the nearest key

Every class's keys, prompts and knowledge are constants of the graph; the chosen class's prompts
and knowledge are gathered per image, so a batch of mixed classes takes one frozen and one
prompted forward. Knowledge banks of different sizes are padded to the largest: padding rows get
a huge squared norm (never a nearest neighbour) and are masked out of the re-weighting.
The graph computes in float32 whatever precision the model's config asks of torch.

Prefix prompts run through the backbone's own `block_with_prefix`, given one prefix per image.
This module imports torch only inside its functions, so `ucad --help` stays fast.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ucad.model import UCAD

INPUT_NAME = "images"
OUTPUT_NAMES = ("task", "score", "map", "key_distances")
# Squared norm of knowledge padding rows: far above any real distance, far below float32's max.
_PAD_SQUARED_NORM = 1e30


@dataclass(frozen=True)
class GraphSpec:
    """The plain settings the forward needs besides tensors."""

    prompt_mode: str
    grid: tuple[int, int]
    image_size: int
    blur_sigma: float
    reweight: bool
    neighbours: int  # re-weighting support size, capped at the largest knowledge bank


def check_exportable(model: UCAD) -> None:
    """Raise ValueError naming what of `model` the export cannot reproduce."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    backbone = model.backbone
    if backbone.prompt_mode == "prefix":
        for i, block in enumerate(backbone.vit.blocks):
            if type(block) is not Block or type(block.attn) is not Attention:
                raise ValueError(
                    f"cannot export prefix prompts through block {i} of backbone "
                    f"{model.config.backbone} ({type(block).__name__} with "
                    f"{type(block.attn).__name__}): only timm's pre-norm Block with its "
                    "standard Attention is supported (prompt_mode 'additive' has no such limit)"
                )
    elif backbone.prompt_mode != "additive":
        raise ValueError(f"cannot export prompt_mode {backbone.prompt_mode!r}")
    dim, shape = backbone.embed_dim, tuple(backbone.prompt_shape())
    for memory in model.memories:
        sizes = (memory.keys.shape, memory.knowledge.shape)
        if any(len(s) != 2 or s[0] < 1 or s[1] != dim for s in sizes):
            raise ValueError(
                f"class {memory.name!r}: keys {tuple(sizes[0])} and knowledge {tuple(sizes[1])} "
                f"must be non-empty (rows, {dim}) to export"
            )
        if tuple(memory.prompts.shape) != shape:
            raise ValueError(
                f"class {memory.name!r}: prompts {tuple(memory.prompts.shape)} do not fit the "
                f"backbone's {shape}"
            )


def build_graph(model: UCAD) -> nn.Module:
    """The whole of `model.predict` as one traceable float32 CPU module: uint8 images in, the
    outputs `OUTPUT_NAMES` out. `model` itself is left as it was."""
    check_exportable(model)
    return _graph_class()(model).eval()


@functools.cache
def _graph_class() -> type:
    # Defined on first use: torch is imported only when something is exported.
    from torch import nn

    class RoutedUCAD(nn.Module):
        def __init__(self, model: UCAD) -> None:
            super().__init__()
            self.backbone = copy.deepcopy(model.backbone).cpu().float()
            for name, tensor in _graph_constants(model).items():
                self.register_buffer(name, tensor)
            config = model.config
            largest = max(int(memory.knowledge.shape[0]) for memory in model.memories)
            self.spec = GraphSpec(
                prompt_mode=model.backbone.prompt_mode,
                grid=tuple(model.backbone.grid),
                image_size=config.image_size,
                blur_sigma=config.blur_sigma,
                reweight=config.reweight,
                neighbours=min(config.reweight_neighbours, largest),
            )

        def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            return _routed_forward(self, images)

    return RoutedUCAD


def _graph_constants(model: UCAD) -> dict[str, Tensor]:
    """Every class's memory as stacked float32 tensors, centred as `ucad.scoring` centres them
    (distances are unchanged, rounding error shrinks)."""
    import torch

    memories = model.memories
    keys = torch.stack(
        [_pad_by_repeating(m.keys.float(), _rows(memories, "keys")) for m in memories]
    )
    keys = keys.flatten(0, 1)  # (T * K, D): all classes in one product, as scoring.task_distances
    key_centre = keys.mean(dim=0)
    centred_keys = keys - key_centre
    centres, banks, norms = [], [], []
    size = _rows(memories, "knowledge")
    for memory in memories:
        knowledge = memory.knowledge.float()
        centre = knowledge.mean(dim=0)
        bank = knowledge - centre
        padding = size - bank.shape[0]
        norms.append(torch.cat([bank.pow(2).sum(dim=1), torch.full((padding,), _PAD_SQUARED_NORM)]))
        banks.append(torch.cat([bank, bank.new_zeros(padding, bank.shape[1])]))
        centres.append(centre)
    return {
        "key_bank_t": centred_keys.T.contiguous(),
        "key_sq": centred_keys.pow(2).sum(dim=1),
        "key_centre": key_centre,
        "prompts": torch.stack([m.prompts.float() for m in memories]),
        "knowledge": torch.stack(banks),  # (T, M, D) centred, zero rows as padding
        "knowledge_sq": torch.stack(norms),  # (T, M), padding rows huge
        "knowledge_centre": torch.stack(centres),  # (T, D)
        "knowledge_size": torch.tensor([int(m.knowledge.shape[0]) for m in memories]),
    }


def _rows(memories: list, field: str) -> int:
    return max(int(getattr(memory, field).shape[0]) for memory in memories)


def _pad_by_repeating(rows: Tensor, size: int) -> Tensor:
    """Pad by repeating the last row: a duplicate never changes a minimum (as scoring does)."""
    return rows[[min(i, rows.shape[0] - 1) for i in range(size)]]


def _routed_forward(graph: Any, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ucad import scoring

    spec: GraphSpec = graph.spec
    backbone = graph.backbone
    x = (images.permute(0, 3, 1, 2).float() / 255 - backbone.mean) / backbone.std
    key_distances = _key_distances(graph, _features(graph, x, None))
    task = key_distances.argmin(dim=1)
    prompted = _features(graph, x, graph.prompts[task])
    bank, bank_sq = graph.knowledge[task], graph.knowledge_sq[task]
    centred = prompted - graph.knowledge_centre[task][:, None, :]
    patch, nearest = _nearest_knowledge(centred, bank, bank_sq)
    if spec.reweight:
        sizes = graph.knowledge_size[task]
        score = _reweighted(centred, bank, bank_sq, sizes, patch, nearest, spec.neighbours)
    else:
        score = patch.amax(dim=1)
    maps = scoring.anomaly_maps(patch, spec.grid, spec.image_size, spec.blur_sigma)
    return task, score, maps, key_distances


def _features(graph: Any, x: Tensor, prompts: Tensor | None) -> Tensor:
    """`PromptedViT.features` with one set of prompts per image: (B, N, D)."""
    from ucad.backbone import block_with_prefix

    vit = graph.backbone.vit
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for i, block in enumerate(vit.blocks):
        if prompts is None:
            x = block(x)
        elif graph.spec.prompt_mode == "additive":
            x = block(x + prompts[:, i, None, :])
        else:
            x = block_with_prefix(block, x, _per_image_prefix(block.attn, x, prompts[:, i]))
    return x[:, graph.backbone.num_prefix_tokens :]


def _per_image_prefix(attn: nn.Module, x: Tensor, prefix: Tensor) -> Tensor:
    """Per-image prefixes (B, 2, P, D) as key and value tokens (2, B, heads, P, head_dim)."""
    heads, head_dim = attn.num_heads, attn.head_dim
    return prefix.reshape(x.shape[0], 2, -1, heads, head_dim).permute(1, 0, 3, 2, 4)


def _key_distances(graph: Any, frozen: Tensor) -> Tensor:
    """(B, T): per class, the sum over patches of the distance to its nearest key."""
    centred = frozen - graph.key_centre
    partial = graph.key_sq - 2 * (centred @ graph.key_bank_t)  # (B, N, T * K)
    classes = graph.knowledge.shape[0]
    nearest = partial.unflatten(-1, (classes, -1)).amin(dim=-1)  # (B, N, T)
    squared = nearest + centred.pow(2).sum(dim=-1, keepdim=True)
    return squared.clamp_min(0).sqrt().sum(dim=1)


def _nearest_knowledge(centred: Tensor, bank: Tensor, bank_sq: Tensor) -> tuple[Tensor, Tensor]:
    """Patch scores (B, N) and nearest bank row (B, N) of centred features in per-image banks."""
    partial = bank_sq[:, None, :] - 2 * (centred @ bank.transpose(1, 2))  # (B, N, M)
    best, index = partial.min(dim=2)
    return (best + centred.pow(2).sum(dim=-1)).clamp_min(0).sqrt(), index


def _reweighted(
    centred: Tensor,
    bank: Tensor,
    bank_sq: Tensor,
    sizes: Tensor,
    patch: Tensor,
    nearest: Tensor,
    neighbours: int,
) -> Tensor:
    """`scoring.image_scores` with re-weighting, on per-image banks with padding rows masked."""
    dim = centred.shape[-1]
    top_score, top_patch = patch.max(dim=1)
    worst = centred.gather(1, top_patch[:, None, None].expand(-1, 1, dim))  # (B, 1, D)
    star_index = nearest.gather(1, top_patch[:, None])  # (B, 1)
    star = bank.gather(1, star_index[..., None].expand(-1, -1, dim))  # (B, 1, D)
    partial = bank_sq[:, None, :] - 2 * (star @ bank.transpose(1, 2))  # (B, 1, M)
    support = partial.topk(neighbours, dim=2, largest=False).indices[:, 0]  # (B, k)
    support_rows = bank.gather(1, support[..., None].expand(-1, -1, dim))  # (B, k, D)
    to_star = (worst - star).norm(dim=2)[:, 0]
    to_support = (worst - support_rows).norm(dim=2)
    # A class with fewer rows than `neighbours` has padding in its support: leave it out.
    to_support = to_support.masked_fill(support >= sizes[:, None], float("-inf"))
    # logsumexp spelled out, max first, so no exporter decomposition can overflow
    largest = to_support.amax(dim=1)
    log_sum = largest + (to_support - largest[:, None]).exp().sum(dim=1).log()
    return (1 - (to_star - log_sum).exp()) * top_score
