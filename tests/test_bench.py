"""`ucad bench` on a tiny configuration: it runs, and its report holds every figure.

Timing is never asserted (shared CI machines are noisy); what is checked is what the figures are
made of: which stages, floors and targets exist, and the forward passes a stream needs.
"""

import json
import sys

import numpy as np
import pytest
import torch

from ucad.bench import Meter
from ucad.cli import main

TINY = [
    "--preset",
    "smoke",
    "--images",
    "2",
    "--classes",
    "2",
    "--set",
    "image_size=64",
    "--set",
    "key_size=8",
    "--set",
    "knowledge_size=16",
]
STAGES = [
    "structure",
    "keys",
    "prompts",
    "knowledge",
    "calibrate",
    "routing",
    "scoring",
    "anomaly_maps",
    "inference",
    "evaluate",
]
STAGE_FIELDS = {
    "stage",
    "images",
    "seconds",
    "images_per_second",
    "peak_bytes",
    "floor_seconds",
    "ratio",
    "target",
    "met",
    "parts",
}
TARGETS = {
    "inference / floor",
    "prompt-training epoch / floor",
    "keys / floor",
    "knowledge / floor",
    "key search with 100 classes / inference",
    "identical rerun / first run",
    "bytes stored per class",
}


def test_bench_runs_on_a_tiny_configuration_and_reports_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["-q", "bench", *TINY, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())

    assert [row["stage"] for row in report["stages"]] == STAGES
    for row in report["stages"]:
        assert set(row) == STAGE_FIELDS
        assert row["seconds"] > 0 and row["images"] > 0
        assert row["peak_bytes"] > 0
    floors = {row["stage"] for row in report["stages"] if row["floor_seconds"] is not None}
    assert floors == set(STAGES) - {"structure", "anomaly_maps"}
    inference = report["stages"][STAGES.index("inference")]
    assert set(inference["parts"]) == {"routing", "scoring", "anomaly_maps"}
    evaluation = report["stages"][STAGES.index("evaluate")]
    assert set(evaluation["parts"]) == {"features", "routing", "scores", "evaluate"}

    stored = report["bytes_per_class"]
    assert set(stored) == {"keys", "prompts", "knowledge", "total"}
    # 8 keys of 192 float32 values at least (zstd is lossless and cannot shrink noise much)
    assert stored["keys"] > 8 * 192 * 4 * 0.5
    assert stored["total"] == stored["keys"] + stored["prompts"] + stored["knowledge"]
    assert report["rerun"]["computed_stages"] == 0
    assert report["rerun"]["fraction"] > 0  # a share, never asserted against a limit

    assert [row["classes"] for row in report["scaling"]] == [1, 10, 100]
    for row in report["scaling"]:
        assert row["routing_ms_per_image"] > row["key_search_ms_per_image"] > 0
        assert 0 < row["key_search_share"] < 1

    steps = report["stream"]["steps"]
    assert [step["step"] for step in steps] == [1, 2]
    test_images = report["images"]["test"]  # every synthetic class has as many
    # Each test image is passed through the frozen backbone once ever: at the step of its class.
    assert [step["frozen_passes"] for step in steps] == [test_images, test_images]
    assert steps[0]["prompted_passes"] == test_images
    assert [step["reextract_passes"] for step in steps] == [2 * test_images, 4 * test_images]
    assert all(step["learn_seconds"] > 0 and step["evaluate_seconds"] > 0 for step in steps)

    assert {target["name"] for target in report["targets"]} == TARGETS
    paper_only = next(t for t in report["targets"] if t["name"] == "bytes stored per class")
    assert paper_only["met"] is None and "paper" in paper_only["why_not"]
    assert report["settings"]["weights"] == "random weights: timing only"
    assert report["settings"]["structure"] == "superpixel"
    assert report["machine"]["cores"] >= 1 and report["machine"]["device"] == "cpu"

    assert "random weights: timing only" in text
    assert "structure maps: superpixel" in text
    assert "every target met" in text or "MISSED:" in text


def test_bench_paper_preset_times_superpixels_when_sam_weights_are_missing():
    from ucad.bench import _structure, bench_settings

    settings = bench_settings("paper", images=2, classes=1)
    config, source, note = _structure(settings)
    assert config.structure == "superpixel" and source is None
    assert "SAM weights not on disk" in note
    assert not settings.config.pretrained and settings.config.epochs == 1


def test_bench_times_sam_with_random_weights_only_when_asked():
    from ucad.bench import _structure, bench_settings
    from ucad.structure import SamStructure

    settings = bench_settings("paper", images=2, classes=1, structure="sam")
    config, source, note = _structure(settings)
    assert config.structure == "sam" and isinstance(source, SamStructure)
    assert note == "SAM vit_b, random weights: timing only"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--images", "1", "at least 2"), ("--classes", "0", "at least 1")],
)
def test_bench_rejects_bad_sizes_with_a_clear_message(capsys, flag, value, message):
    assert main(["bench", "--preset", "smoke", flag, value]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-block peak RSS is Linux-only")
def test_meter_reports_the_peak_memory_of_the_block_only():
    meter = Meter(torch.device("cpu"))
    with meter.measure() as big:
        block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
        del block
    with meter.measure() as small:
        pass
    assert big.peak_bytes - small.peak_bytes > 150 * 2**20
    assert big.seconds > 0
