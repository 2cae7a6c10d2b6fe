"""Turn the graph module into an ONNX file and refuse one that does not do what torch does.

`ucad.export` calls these in order: `write_graph` (torch.onnx's torch.export-based exporter),
`check_graph` (onnx.checker) and `check_against_torch` (onnxruntime on an example batch). Each
raises ValueError saying what went wrong. torch, onnx and onnxruntime are imported inside the
functions, so `ucad --help` stays fast.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ucad.onnx_graph import INPUT_NAME, OUTPUT_NAMES

if TYPE_CHECKING:
    from torch import nn

# Agreement the export checks between the torch module and onnxruntime on its example batch.
_CHECK_RTOL, _CHECK_ATOL = 1e-3, 1e-4


def example_images(size: int, batch: int) -> np.ndarray:
    """A seeded random uint8 batch (batch, size, size, 3): what the export traces and checks."""
    return np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def write_graph(
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


def check_graph(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise ValueError(f"the exported graph fails onnx.checker: {err}") from err


def check_against_torch(graph: nn.Module, path: Path, example: np.ndarray) -> None:
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
