"""One typed configuration for the whole method, with named presets.

Every number METHOD.md gives is a default here, never a literal in the code. A config is
validated once at the door (unknown fields and wrong types are errors) and printed into every run.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# How a test image finds its class: by its keys (the method), or told the true one (diagnostic).
Routing = Literal["agnostic", "oracle"]
ROUTINGS: tuple[Routing, ...] = get_args(Routing)


class Config(BaseModel):
    """All settings of a UCAD run. Defaults are the `paper` preset (METHOD.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Backbone: any timm VisionTransformer, computed only up to `feature_layer`.
    backbone: str = "vit_base_patch16_224.augreg_in21k"
    pretrained: bool = True
    weights_file: str | None = Field(
        default=None, description="Local checkpoint for the backbone instead of the timm hub."
    )
    backbone_args: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for timm.create_model."
    )
    feature_layer: int = Field(default=5, ge=0)
    image_size: int = Field(default=224, ge=32)
    resize: int | None = Field(
        default=None, description="Shorter side before the centre crop; None = image_size."
    )

    # Prompts.
    prompt_mode: Literal["prefix", "additive"] = "prefix"
    prompt_length: int = Field(default=1, ge=1)

    # Structure maps for the contrastive loss.
    structure: Literal["sam", "sam_reference", "superpixel"] = "sam"
    sam_model: Literal["vit_b", "vit_l", "vit_h"] = "vit_b"
    sam_checkpoint: str | None = None
    sam_points_per_side: int = Field(default=32, ge=1)
    sam_pred_iou_thresh: float = 0.88
    sam_stability_score_thresh: float = 0.95
    sam_box_nms_thresh: float = 0.7
    superpixel_segments: int = Field(default=32, ge=2)

    # Structure-based contrastive learning.
    temperature: float = Field(default=0.5, gt=0)
    lambda_pos: float = 1.0
    lambda_neg: float = 1.0
    lr: float = Field(default=5e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = Field(default=8, ge=1)
    epochs: int = Field(default=25, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)

    # Memory sizes per task.
    key_size: int = Field(default=196, ge=1)
    knowledge_size: int = Field(default=196, ge=1)
    projection_dim: int = Field(default=128, ge=1)

    # Scoring.
    reweight: bool = True
    reweight_neighbours: int = Field(default=3, ge=1)
    blur_sigma: float = Field(default=4.0, ge=0)

    # Decision thresholds, one per class, from normal training images held out of its knowledge.
    calibration_fraction: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="Share of each class's training images held out to calibrate its threshold.",
    )
    threshold_quantile: float = Field(
        default=0.99,
        gt=0,
        le=1,
        description="Target share of normal images at or under the threshold (conformal rank).",
    )

    # Run.
    seed: int = 0
    device: str = Field(
        default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="What the backbone and SAM compute in. auto: bf16 on CUDA and on CPUs with "
        "native bf16 (AVX512-BF16, AMX), float32 elsewhere. Distances and losses stay float32.",
    )
    inference_batch_size: int = Field(default=32, ge=1)
    workers: int = Field(default=4, ge=1, description="Threads for image decoding.")
    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else <store>/mlflow.db.",
    )

    # Where stages run, from the `ucad` command and the flows alike (ucad.runners.runner_for).
    task_runner: Literal["threads", "dask"] = Field(
        default="threads",
        description="threads: stages in this process, one at a time (a flow splits a class's "
        "structure maps into max_workers chunks on threads); dask: stages on a Dask cluster, "
        "max_workers at once (needs ucad[dask]).",
    )
    dask_address: str | None = Field(
        default=None, description="Dask scheduler address; None starts a local cluster."
    )
    max_workers: int = Field(
        default=4,
        ge=1,
        description="dask: stages at once (a local cluster's worker processes); threads: "
        "structure-map chunks per class in a flow.",
    )

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.resize is not None and self.resize < self.image_size:
            raise ValueError(f"resize ({self.resize}) must be >= image_size ({self.image_size})")
        if self.dask_address and self.task_runner != "dask":
            raise ValueError("dask_address is set but task_runner is not 'dask'")
        return self

    @property
    def resize_to(self) -> int:
        return self.resize or self.image_size

    def digest_fields(self, *names: str) -> dict[str, Any]:
        """The named fields as plain JSON values: what a stage's cache key reads."""
        data = self.model_dump(mode="json")
        return {name: data[name] for name in names}


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    # Mechanics, not accuracy: a random small ViT and weight-free structure maps, so a whole
    # stream runs in minutes on a laptop CPU with no download.
    "smoke": {
        "backbone": "vit_tiny_patch16_224",
        "pretrained": False,
        "structure": "superpixel",
        "epochs": 2,
        # the same figures on every machine: no bf16 where a CPU happens to have it
        "precision": "fp32",
    },
}


def load_config(
    preset: str = "paper", file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Build a config: preset, then a YAML/JSON file, then explicit overrides (later wins)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values: dict[str, Any] = dict(PRESETS[preset])
    if file is not None:
        values.update(_read_config_file(Path(file)))
    values.update(overrides or {})
    try:
        return Config(**values)
    except ValidationError as err:
        where = f" (from {file})" if file else ""
        raise ValueError(f"invalid configuration{where}: {_problems(err)}") from None


def _problems(err: ValidationError) -> str:
    """pydantic's errors as one line each: the field, what is wrong, a likely spelling."""
    lines = []
    for problem in err.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "config"
        if problem["type"] == "extra_forbidden":
            close = difflib.get_close_matches(field, list(Config.model_fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"unknown field {field!r}{hint}")
        else:
            lines.append(f"{field}: {problem['msg']} (got {problem.get('input')!r})")
    return "; ".join(lines)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise FileNotFoundError(f"{path}: cannot read config file: {err.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ValueError(f"{path}: not valid {kind}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of field: value")
    return data


# Fields that change how fast a run is, not what it computes: a model may be extended with others.
RUNTIME_FIELDS = (
    "device",
    "inference_batch_size",
    "workers",
    "task_runner",
    "dask_address",
    "max_workers",
    "tracking_uri",
)


def result_fields(config: Config) -> dict[str, Any]:
    """The config fields that decide what a model computes (all but RUNTIME_FIELDS)."""
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in RUNTIME_FIELDS}
