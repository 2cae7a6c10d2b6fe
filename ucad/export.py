"""Export a model version to one ONNX graph, task-agnostic routing inside, for inspection lines.

    >>> export_onnx(ArtifactStore(), "line-3@2", Path("line-3-v2"))  # model.onnx, ucad-export.json
    >>> inspector = load_onnx_inspector("line-3-v2")                  # ucad.onnx_inspector

The graph (`model.onnx`) has one input, `images`: uint8 RGB, NHWC (batch, crop, crop, 3), each
image already resized (shorter side to `resize`) and centre cropped to `crop` by
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

Exporter: torch.onnx's torch.export-based ("dynamo") exporter, the default since torch 2.9 and
the maintained one; the TorchScript exporter is deprecated and stops at opset 20. Opsets 18
(its native one, no version conversion) to 23 are accepted.

This module imports torch and onnx only inside its functions, so `ucad --help` stays fast.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ucad import __version__

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ucad.model import UCAD
    from ucad.store import ArtifactStore

log = logging.getLogger(__name__)

EXPORT_FILE = "ucad-export.json"
GRAPH_FILE = "model.onnx"
EXPORT_FORMAT = "ucad-onnx/1"
INPUT_NAME = "images"
OUTPUT_NAMES = ("task", "score", "map", "key_distances")
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 18, 23, 18
# Squared norm of knowledge padding rows: far above any real distance, far below float32's max.
_PAD_SQUARED_NORM = 1e30
# Agreement the export checks between the torch module and onnxruntime on its example batch.
_CHECK_RTOL, _CHECK_ATOL = 1e-3, 1e-4


# The export-friendly forward -------------------------------------------------------------------


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
    vit = graph.backbone.vit
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for i, block in enumerate(vit.blocks):
        if prompts is None:
            x = block(x)
        elif graph.spec.prompt_mode == "additive":
            x = block(x + prompts[:, i, None, :])
        else:
            x = _prefix_block(block, x, prompts[:, i])
    return x[:, graph.backbone.num_prefix_tokens :]


def _prefix_block(block: nn.Module, x: Tensor, prefix: Tensor) -> Tensor:
    """timm's pre-norm Block, its attention also attending to per-image prefixes (B, 2, P, D)."""
    x = x + block.drop_path1(block.ls1(_prefix_attention(block.attn, block.norm1(x), prefix)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _prefix_attention(attn: nn.Module, x: Tensor, prefix: Tensor) -> Tensor:
    import torch
    import torch.nn.functional as F

    batch, tokens, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    # (B, 2, P, D) -> key and value tokens (2, B, heads, P, head_dim)
    prefix = prefix.reshape(batch, 2, -1, heads, head_dim).permute(1, 0, 3, 2, 4)
    k = torch.cat([prefix[0], k], dim=2)
    v = torch.cat([prefix[1], v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, -1))
    if attn.gate is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj(out)


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


# Writing an export -----------------------------------------------------------------------------


def export_onnx(
    store: ArtifactStore,
    ref: str,
    out: str | Path,
    opset: int | None = None,
    dynamic_batch: bool = False,
    thresholds: Mapping[str, float] | None = None,
) -> Path:
    """Export model `ref` ("NAME" for the latest version, or "NAME@VERSION") to the folder `out`:
    `model.onnx` and `ucad-export.json`. Returns `out`.

    `opset`: 18..23 (default 18). `dynamic_batch`: any batch size; otherwise batches of 1.
    `thresholds` overrides stored class thresholds in the export. Unknown models and versions
    raise FileNotFoundError; what the graph cannot reproduce raises ValueError naming it.
    """
    from ucad.inference import Inspector

    opset = check_opset(opset)
    inspector = Inspector.load(store, ref, thresholds, device="cpu")
    manifest = store.read_model(inspector.name, inspector.version)
    return export_model(
        inspector.model,
        out,
        name=inspector.name,
        version=inspector.version,
        thresholds=inspector.thresholds,
        model_digest=manifest_digest(manifest),
        opset=opset,
        dynamic_batch=dynamic_batch,
    )


def check_opset(opset: int | None) -> int:
    opset = DEFAULT_OPSET if opset is None else opset
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"ONNX opset {opset} is not supported: the export needs {MIN_OPSET}..{MAX_OPSET}"
        )
    return opset


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the model version's manifest as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def export_model(
    model: UCAD,
    out: str | Path,
    *,
    name: str,
    version: int,
    thresholds: Mapping[str, float],
    model_digest: str,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
) -> Path:
    """Export an in-memory `model` to the folder `out` (see `export_onnx`).

    The graph is checked with onnx.checker and run once with onnxruntime against the torch
    module before it replaces an earlier export there.
    """
    missing = [task for task in model.task_names if task not in thresholds]
    if missing:
        raise ValueError(f"no threshold for class(es) {', '.join(missing)}")
    opset = check_opset(opset)
    graph = build_graph(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staged = out / f".{GRAPH_FILE}.tmp"
    try:
        example = _example_images(model.config.image_size, 2 if dynamic_batch else 1)
        _export_graph(graph, example, staged, opset, dynamic_batch)
        _check_graph(staged)
        _check_against_torch(graph, staged, example)
        os.replace(staged, out / GRAPH_FILE)
    finally:
        staged.unlink(missing_ok=True)
    meta = _export_meta(model, name, version, thresholds, model_digest, opset, dynamic_batch)
    meta["graph_sha256"] = file_sha256(out / GRAPH_FILE)
    _write_json(out / EXPORT_FILE, meta)
    log.info("exported model %s version %d to %s", name, version, out)
    return out


def _example_images(size: int, batch: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def _export_graph(
    graph: nn.Module, example: np.ndarray, path: Path, opset: int, dynamic_batch: bool
) -> None:
    import torch

    shapes = None
    if dynamic_batch:  # exported at batch 2: torch.export specialises sizes 0 and 1
        shapes = {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=65536)}}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
            program = torch.onnx.export(
                graph,
                (torch.from_numpy(example),),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                opset_version=opset,
                dynamic_shapes=shapes,
                external_data=False,
                optimize=True,
                verbose=False,
            )
            program.save(path, external_data=False)
    except Exception as err:  # torch.export raises many kinds; all mean "not exportable"
        raise ValueError(
            f"torch.onnx could not export this model: {type(err).__name__}: {err}"
        ) from err


def _check_graph(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise ValueError(f"the exported graph fails onnx.checker: {err}") from err


def _check_against_torch(graph: nn.Module, path: Path, example: np.ndarray) -> None:
    """Run the example batch through onnxruntime and torch; refuse a graph that disagrees.

    Key distances must agree everywhere; score and map where both chose the same class (the
    random example may hold near-ties, which rounding may break either way).
    """
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: example})
    got = dict(zip(OUTPUT_NAMES, outputs, strict=True))
    with torch.no_grad():
        expected = graph(torch.from_numpy(example))
    want = {name: t.numpy() for name, t in zip(OUTPUT_NAMES, expected, strict=True)}
    _require_close("key_distances", got["key_distances"], want["key_distances"])
    same = got["task"] == want["task"]
    for name in ("score", "map"):
        _require_close(name, got[name][same], want[name][same])


def _require_close(name: str, got: np.ndarray, want: np.ndarray) -> None:
    if got.shape != want.shape:
        raise ValueError(f"the exported graph's {name!r} has shape {got.shape}, not {want.shape}")
    if not np.allclose(got, want, _CHECK_RTOL, _CHECK_ATOL):
        worst = np.abs(got.astype(np.float64) - want).max()
        raise ValueError(
            f"the exported graph disagrees with torch on {name!r} (largest difference {worst:.3g})"
        )


def _export_meta(
    model: UCAD,
    name: str,
    version: int,
    thresholds: Mapping[str, float],
    model_digest: str,
    opset: int,
    dynamic_batch: bool,
) -> dict[str, Any]:
    import onnx
    import torch

    geometry, backbone, config = model.geometry, model.backbone, model.config
    return {
        "format": EXPORT_FORMAT,
        "model": name,
        "version": version,
        "model_digest": model_digest,
        "classes": model.task_names,
        "thresholds": {task: float(thresholds[task]) for task in model.task_names},
        "graph": GRAPH_FILE,
        "input": INPUT_NAME,
        "outputs": list(OUTPUT_NAMES),
        "dynamic_batch": dynamic_batch,  # False: the graph takes batches of exactly 1
        "inference_batch_size": config.inference_batch_size,  # images per run when dynamic
        "workers": config.workers,
        "compute": "float32",
        "preprocessing": {
            "layout": "uint8 RGB NHWC (batch, crop, crop, 3); normalised inside the graph",
            "resize": geometry.resize,  # shorter side, before the centre crop
            "crop": geometry.crop,
            "interpolation": geometry.interpolation,
            "mean": backbone.mean.flatten().tolist(),
            "std": backbone.std.flatten().tolist(),
        },
        "backbone": config.backbone,
        "opset": opset,
        "ucad_version": __version__,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Through a temporary sibling, so a reader never sees half a file."""
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(staged, path)


# Latency ---------------------------------------------------------------------------------------


def latency(
    export_dir: str | Path,
    images: np.ndarray,
    repeats: int = 5,
    store: ArtifactStore | None = None,
) -> dict[str, Any]:
    """Milliseconds per image of the ONNX graph (onnxruntime, CPU) and, given the `store` the
    model came from, of the torch path (`UCAD.predict` on the CPU), on the same uint8
    (N, crop, crop, 3) images: the median of `repeats` timed runs after one warm-up run each.
    """
    import torch

    from ucad.onnx_inspector import load_onnx_inspector

    inspector = load_onnx_inspector(export_dir)
    figures: dict[str, Any] = {
        "model": f"{inspector.name}@{inspector.version}",
        "images": len(images),
        "repeats": repeats,
        "onnx_batch": inspector.graph_batch,
        "onnxruntime_ms_per_image": _ms_per_image(
            lambda: inspector.predict_arrays(images), len(images), repeats
        ),
        "torch_ms_per_image": None,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if store is not None:
        model = _torch_model(store, inspector)
        figures["torch_ms_per_image"] = _ms_per_image(
            lambda: model.predict(images), len(images), repeats
        )
    return figures


def _torch_model(store: ArtifactStore, inspector: Any) -> UCAD:
    """The export's model version from `store`, on the CPU; refused if it is not the same."""
    from ucad.inference import Inspector

    ref = f"{inspector.name}@{inspector.version}"
    if manifest_digest(store.read_model(inspector.name, inspector.version)) != inspector.digest:
        raise ValueError(f"model {ref} in store {store.root!r} is not the one exported")
    return Inspector.load(store, ref, device="cpu").model


def _ms_per_image(run: Callable[[], Any], count: int, repeats: int) -> float:
    run()  # warm-up: lazy allocations, thread pools
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / max(1, count)


# Command line ----------------------------------------------------------------------------------


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`ucad export --model NAME[@VERSION] --format onnx --out DIR [--opset N] [--dynamic-batch]
    [--store ROOT]`; `subparsers` is what `ArgumentParser.add_subparsers` returns."""
    parser = subparsers.add_parser(
        "export",
        help="write a model version as one ONNX graph for inspection lines "
        "(run it with `ucad predict --onnx DIR`)",
    )
    parser.add_argument(
        "--model", required=True, metavar="NAME[@VERSION]", help="default version: the latest"
    )
    parser.add_argument("--format", choices=("onnx",), default="onnx", help="default: onnx")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help=f"export folder ({GRAPH_FILE}, {EXPORT_FILE}); an earlier export there is replaced",
    )
    parser.add_argument(
        "--opset",
        type=int,
        metavar="N",
        help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})",
    )
    parser.add_argument(
        "--dynamic-batch", action="store_true", help="any batch size (default: batches of 1)"
    )
    parser.add_argument(
        "--latency",
        action="store_true",
        help="then time onnxruntime and the torch path per image on the CPU "
        "(8 random images of the model's input size)",
    )
    parser.add_argument(
        "--store", help="artifact store root or fsspec URL (default: $UCAD_STORE or ./artifacts)"
    )
    parser.set_defaults(run=cmd_export)
    return parser


def cmd_export(args: argparse.Namespace) -> None:
    from ucad.store import ArtifactStore  # here: `ucad --help` stays light

    folder = export_onnx(
        ArtifactStore(args.store), args.model, args.out, args.opset, args.dynamic_batch
    )
    meta = json.loads((folder / EXPORT_FILE).read_text())
    graph = folder / meta["graph"]
    batch = "dynamic" if meta["dynamic_batch"] else "1"
    print(
        f"exported model {meta['model']} version {meta['version']} "
        f"({len(meta['classes'])} classes: {', '.join(meta['classes'])}) "
        f"to ONNX opset {meta['opset']}, batch {batch}"
    )
    print(f"wrote {graph} ({graph.stat().st_size / 2**20:.1f} MiB)")
    print(f"wrote {folder / EXPORT_FILE}")
    if args.latency:
        crop = meta["preprocessing"]["crop"]
        images = np.random.default_rng(0).integers(0, 256, (8, crop, crop, 3), dtype=np.uint8)
        figures = latency(folder, images, store=ArtifactStore(args.store))
        print(
            f"latency on the CPU ({figures['threads']} threads, {figures['cpu']}): "
            f"onnxruntime {figures['onnxruntime_ms_per_image']:.1f} ms per image "
            f"(batch {figures['onnx_batch'] or 'dynamic'}), "
            f"torch {figures['torch_ms_per_image']:.1f} ms per image"
        )
