"""`ucad export`: write a model version as one ONNX graph, task-agnostic routing inside, for
inspection lines; and time it against the torch path.

    >>> export_onnx(ArtifactStore(), "line-3@2", Path("line-3-v2"))  # model.onnx, ucad-export.json
    >>> inspector = load_onnx_inspector("line-3-v2")                  # ucad.onnx_inspector

What the graph takes and gives is `ucad.onnx_graph`'s to say (`build_graph`); how it is written
and checked against torch before it replaces an earlier export, `ucad.export_check`'s. This
module names the files, writes `ucad-export.json` beside the graph and holds the command.

Exporter: torch.onnx's torch.export-based ("dynamo") exporter, the default since torch 2.9 and
the maintained one; the TorchScript exporter is deprecated and stops at opset 20. Opsets 18
(its native one, no version conversion) to 23 are accepted.

This module imports torch and onnx only inside its functions, so `ucad --help` stays fast.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ucad import __version__
from ucad.digests import hash_file
from ucad.export_check import check_against_torch, check_graph, example_images, write_graph
from ucad.onnx_graph import INPUT_NAME, OUTPUT_NAMES, build_graph

if TYPE_CHECKING:
    from ucad.model import UCAD
    from ucad.store import ArtifactStore

log = logging.getLogger(__name__)

EXPORT_FILE = "ucad-export.json"
GRAPH_FILE = "model.onnx"
EXPORT_FORMAT = "ucad-onnx/1"
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 18, 23, 18


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
        example = example_images(model.config.image_size, 2 if dynamic_batch else 1)
        write_graph(graph, example, staged, opset, dynamic_batch)
        check_graph(staged)
        check_against_torch(graph, staged, example)
        os.replace(staged, out / GRAPH_FILE)
    finally:
        staged.unlink(missing_ok=True)
    meta = _export_meta(model, name, version, thresholds, model_digest, opset, dynamic_batch)
    meta["graph_sha256"] = file_sha256(out / GRAPH_FILE)
    _write_json(out / EXPORT_FILE, meta)
    log.info("exported model %s version %d to %s", name, version, out)
    return out


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
    return "sha256:" + hash_file(path)[1]


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
        ArtifactStore(args.store).require_existing(),
        args.model,
        args.out,
        args.opset,
        args.dynamic_batch,
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
        images = example_images(meta["preprocessing"]["crop"], 8)
        figures = latency(folder, images, store=ArtifactStore(args.store))
        print(
            f"latency on the CPU ({figures['threads']} threads, {figures['cpu']}): "
            f"onnxruntime {figures['onnxruntime_ms_per_image']:.1f} ms per image "
            f"(batch {figures['onnx_batch'] or 'dynamic'}), "
            f"torch {figures['torch_ms_per_image']:.1f} ms per image"
        )
