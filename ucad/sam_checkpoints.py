"""Segment Anything's weights: the official checkpoints, downloaded once and verified by SHA-256,
or a file of one's own; loaded tensors-only (never unpickled).

    >>> sam = load_sam("vit_b", resolve_sam_checkpoint("vit_b", None))
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam
from tqdm import tqdm

from ucad.backbone import WeightsUnavailableError


@dataclass(frozen=True)
class SamCheckpoint:
    """Where an official SAM checkpoint lives and the SHA-256 of its bytes."""

    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# SHA-256 of Meta's released files (the name's hex suffix is not a SHA-256 prefix).
SAM_CHECKPOINTS: dict[str, SamCheckpoint] = {
    "vit_b": SamCheckpoint(
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    "vit_l": SamCheckpoint(
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "vit_h": SamCheckpoint(
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
}


# Seconds a connection may stay silent during the SAM checkpoint's download.
DOWNLOAD_TIMEOUT_S = 60


def default_cache_dir() -> Path:
    """`$UCAD_CACHE`, else ~/.cache/ucad."""
    return Path(os.environ.get("UCAD_CACHE", Path.home() / ".cache" / "ucad")).expanduser()


def resolve_sam_checkpoint(
    model_type: str, checkpoint: str | Path | None, cache_dir: Path | None = None
) -> Path:
    """The SAM checkpoint file to load: `checkpoint` as given, else the cached official file.

    The official file is downloaded once into `<cache_dir>/sam/` (cache_dir defaults to
    `default_cache_dir()`) and its SHA-256 checked before it is moved into place.
    """
    if model_type not in SAM_CHECKPOINTS:
        raise ValueError(
            f"unknown SAM model_type {model_type!r}; choose from {list(SAM_CHECKPOINTS)}"
        )
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: SAM checkpoint not found (sam_checkpoint)")
        return path
    official = SAM_CHECKPOINTS[model_type]
    path = (cache_dir or default_cache_dir()) / "sam" / official.filename
    if not path.is_file():
        _download_checked(official, path)
    return path


def _download_checked(official: SamCheckpoint, path: Path) -> None:
    """Stream the file to a temp file next to `path`, check its SHA-256, then rename into place.

    Nothing but the verified file is ever left in the cache.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".part")
    part = Path(name)
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                digest = _fetch(official.url, out)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            raise WeightsUnavailableError(
                f"could not download the SAM checkpoint from {official.url}: {err}\n"
                f"Download it yourself and either set `sam_checkpoint: /path/to/{path.name}` in a "
                f"config file (--config), or put it at {path}."
            ) from err
        if digest != official.sha256:
            raise WeightsUnavailableError(
                f"{official.url}: downloaded file has SHA-256 {digest}, expected "
                f"{official.sha256}; it was deleted. Try again, or provide the file yourself "
                f"(`sam_checkpoint: /path/to/{path.name}` in a config file, or put it at {path})."
            )
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def _fetch(url: str, out: BinaryIO) -> str:
    """Copy `url` into `out`; returns the SHA-256 of the bytes written."""
    digest = hashlib.sha256()
    # A timeout per read, not for the whole file (0.4-2.6 GB): a stalled connection fails, a slow
    # one does not.
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=url, disable=None) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise ConnectionError(f"the connection closed after {received} of {total} bytes")
    return digest.hexdigest()


def load_sam_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Load a state-dict file into `model`: tensors only (weights_only), every key must match."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle refusals and corrupt archives raise several types
        raise ValueError(f"{checkpoint}: not a loadable tensor-only state dict ({err})") from err
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(
            f"{checkpoint}: weights do not fit this SAM model "
            f"(wrong model_type for the file?)\n{err}"
        ) from err


def load_sam(model_type: str, checkpoint: Path) -> Sam:
    """The SAM `model_type` with the weights in `checkpoint`, loaded tensors-only."""
    # The registry's builders call torch.load without weights_only: build empty, load safely.
    model = sam_model_registry[model_type](checkpoint=None)
    load_sam_weights(model, checkpoint)
    return model
