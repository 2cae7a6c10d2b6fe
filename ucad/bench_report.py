"""The text report of `ucad bench`: tables and target lines from the report's JSON."""

from __future__ import annotations

from typing import Any

from ucad.bench import MEMORY_STAGES
from ucad.bench_stream import format_scale_out

# Tables ------------------------------------------------------------------------------------------

STAGE_LABELS = {
    "structure": "structure maps",
    "prompts": "prompt training, 1 epoch",
    "calibrate": "calibration",
    "anomaly_maps": "anomaly maps",
    "inference": "inference = routing+scoring+maps",
    "evaluate": "evaluate, cached pipeline",
}
FLOOR_LEGEND = (
    "floor: keys, routing: frozen passes; knowledge, calibration, scoring: prompted passes; "
    "prompt training: prompted forward+backward; inference, evaluation: frozen + prompted passes"
)


def format_report(report: dict[str, Any]) -> str:
    """The report as text: the tables and every target, missed ones marked MISSED."""
    return "\n\n".join(
        [
            _header(report),
            _stage_table(report),
            _storage_lines(report),
            _scaling_table(report),
            _precision_table(report),
            _structure_lines(report),
            _stream_table(report),
            format_scale_out(report.get("scale_out")),
            _target_lines(report),
        ]
    )


def _header(report: dict[str, Any]) -> str:
    settings, host = report["settings"], report["machine"]
    config = settings["config"]
    device = host["gpu"] or f"{host['cpu']}, {host['cores']} cores"
    return "\n".join(
        [
            f"ucad bench {host['ucad']}: {config['backbone']} ({settings['weights']}), "
            f"blocks 0..{config['feature_layer']}, {config['image_size']} px",
            f"machine: {device}; device {host['device']}, torch {host['torch']} "
            f"({host['torch_threads']} threads)",
            f"data: synthetic, {settings['images']} training images per class, "
            f"{report['images']['test']} test images; structure maps: {settings['structure']}",
            f"batch sizes: training {config['batch_size']}, inference "
            f"{config['inference_batch_size']}; peak memory: {settings['memory_kind']}",
        ]
    )


def _stage_table(report: dict[str, Any]) -> str:
    lines = [
        f"{'stage (one class)':<33}{'images':>7}{'seconds':>9}{'img/s':>8}{'peak MB':>9}"
        f"{'floor s':>9}{'ratio':>7}  target"
    ]
    for row in report["stages"]:
        floor = "-" if row["floor_seconds"] is None else f"{row['floor_seconds']:.2f}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        rate = row["images_per_second"]
        target = ""
        if row["target"] is not None:
            verdict = {True: "", False: "  MISSED", None: "  n/a"}[row["met"]]
            target = f"<= {row['target']:.1f}{verdict}"
        lines.append(
            f"{STAGE_LABELS.get(row['stage'], row['stage']):<33}{row['images']:>7}"
            f"{row['seconds']:>9.2f}{'-' if rate is None else f'{rate:.1f}':>8}"
            f"{_megabytes(row['peak_bytes']):>9}{floor:>9}{ratio:>7}  {target}".rstrip()
        )
    return "\n".join([*lines, FLOOR_LEGEND])


def _megabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.0f}"


def _storage_lines(report: dict[str, Any]) -> str:
    stored, rerun = report["bytes_per_class"], report["rerun"]
    parts = ", ".join(f"{stage} {stored[stage] / 1e3:.1f} kB" for stage in MEMORY_STAGES)
    return "\n".join(
        [
            f"stored per class: {parts}; total {stored['total'] / 1e6:.3f} MB",
            f"identical rerun: {rerun['rerun_seconds']:.2f} s = {100 * rerun['fraction']:.2f}% "
            f"of the first run ({rerun['first_seconds']:.1f} s); "
            f"{rerun['computed_stages']} stages computed",
        ]
    )


def _scaling_table(report: dict[str, Any]) -> str:
    rows = report["scaling"]
    columns = "".join(f"{row['classes']:>10}" for row in rows)
    lines = [f"{'per test image, classes in model:':<40}{columns}"]
    for key, label in (
        ("routing_ms_per_image", "routing ms (frozen pass + key search)"),
        ("key_search_ms_per_image", "key search ms"),
        ("scoring_ms_per_image", "scoring ms"),
        ("inference_ms_per_image", "inference ms"),
    ):
        lines.append(f"{label:<40}" + "".join(f"{row[key]:>10.1f}" for row in rows))
    lines.append(
        f"{'key search share of inference':<40}"
        + "".join(f"{100 * row['key_search_share']:>9.1f}%" for row in rows)
    )
    lines.append(
        "extra classes are synthetic (the class's keys plus noise); scoring is one prompted "
        "pass per image under its selected class, whatever the class count"
    )
    return "\n".join(lines)


def _stream_table(report: dict[str, Any]) -> str:
    stream = report["stream"]
    steps = stream["steps"]
    lines = [
        f"stream of {len(steps)} classes, backbone {stream['backbone']} (random weights; "
        "counting passes needs no big model); seconds: each step's least over "
        f"{stream['runs']} runs in fresh stores",
        f"{'step':>4}  {'class':<10}{'learn s':>9}{'evaluate s':>12}{'frozen':>8}{'prompted':>10}"
        f"{'re-extract all':>16}",
    ]
    for step in steps:
        lines.append(
            f"{step['step']:>4}  {step['task']:<10}{step['learn_seconds']:>9.2f}"
            f"{step['evaluate_seconds']:>12.2f}{step['frozen_passes']:>8}"
            f"{step['prompted_passes']:>10}{step['reextract_passes']:>16}"
        )
    total = {
        key: sum(step[key] for step in steps)
        for key in ("frozen_passes", "prompted_passes", "reextract_passes")
    }
    lines.append(
        f"evaluation forward passes over the stream: {total['frozen_passes']} frozen + "
        f"{total['prompted_passes']} prompted; re-extracting everything: "
        f"{total['reextract_passes']}"
    )
    first, last = steps[0], steps[-1]
    lines.append(
        f"add-task, class 1: learn {first['learn_seconds']:.2f} s + evaluate "
        f"{first['evaluate_seconds']:.2f} s; class {last['step']}: learn "
        f"{last['learn_seconds']:.2f} s + evaluate {last['evaluate_seconds']:.2f} s"
    )
    return "\n".join(lines)


def _precision_table(report: dict[str, Any]) -> str:
    precision = report["precision"]
    names = [p for p in ("fp32", "bf16") if p in precision]
    lines = [f"{'images per second':<28}" + "".join(f"{p:>10}" for p in names) + "   speedup"]
    for key, label in (
        ("keys", "keys (frozen)"),
        ("epoch", "training epoch"),
        ("inference", "inference"),
    ):
        speedup = precision.get("speedup", {}).get(key)
        row = f"{label:<28}" + "".join(f"{precision[p][key]:>10.2f}" for p in names)
        lines.append(row + ("" if speedup is None else f"   {speedup:6.2f}x"))
    if not precision["native_bf16"]:
        lines.append("no native bf16 on this machine: precision auto runs float32")
    return "\n".join(lines)


def _structure_lines(report: dict[str, Any]) -> str:
    structure, paper = report["structure"], report["paper_class_s"]
    if structure is None:
        lines = ["structure maps: superpixels timed (--structure sam compares SAM sources)"]
    else:
        lines = [
            f"SAM structure maps ({structure['precision']}), s per image: "
            "segment-anything generator "
            f"{structure['reference_s_per_image']:.2f}, ucad {structure['s_per_image']:.2f} "
            f"({structure['speedup']:.2f}x); agreement (Rand index, patch grid) "
            f"{structure['agreement']:.3f} at {structure['regions_per_image']:.1f} regions "
            "per image",
            f"  ucad upscaled the masks of {100 * structure['upscaled_share']:.0f}% of prompts "
            f"(those past the IoU filter); with every prompt upscaled "
            f"{structure['every_prompt_s_per_image']:.2f} s per image "
            f"({structure['every_prompt_speedup']:.2f}x)",
            _floor_line(structure),
        ]
    if paper["seconds"] is not None:
        lines.append(f"one paper class end to end: {paper['seconds']:.0f} s ({paper['how']})")
    return "\n".join(lines)


def _floor_line(structure: dict[str, Any]) -> str:
    products, rate = structure["products"], structure["product_macs_per_s"]
    share = structure["floor_s_per_image"] / structure["s_per_image"]
    every = structure["every_prompt_floor_s_per_image"] / structure["every_prompt_s_per_image"]
    return (
        f"  products: encoder {products['encoder_macs'] / 1e9:.0f} GMAC, per prompt "
        f"{products['tokens_macs_per_prompt'] / 1e9:.3f} GMAC "
        f"({products['every_prompt_macs_per_prompt'] / 1e9:.3f} with its masks upscaled); at this "
        f"machine's {structure['precision']} product rate ({rate / 1e9:.0f} GMAC/s) they take "
        f"{structure['floor_s_per_image']:.2f} s per image "
        f"({structure['floor_speedup']:.1f}x), {structure['every_prompt_floor_s_per_image']:.2f} "
        f"s with every prompt upscaled ({structure['every_prompt_floor_speedup']:.1f}x): ucad "
        f"runs at {100 * share:.0f}% and {100 * every:.0f}% of that rate"
    )


def _target_lines(report: dict[str, Any]) -> str:
    lines = ["targets"]
    for target in report["targets"]:
        if target["met"] is None:
            verdict = f"n/a ({target['why_not']})" if target["why_not"] else "n/a"
        else:
            verdict = "met" if target["met"] else "MISSED"
        value = target["value"]
        shown = "-" if value is None else f"{value:.3g}"
        sign = ">=" if target.get("at_least") else "<="
        lines.append(f"  {target['name']:<42}{shown:>10}  {sign} {target['limit']:<8g}{verdict}")
    missed = [t["name"] for t in report["targets"] if t["met"] is False]
    lines.append(f"MISSED: {', '.join(missed)}" if missed else "every target met")
    return "\n".join(lines)
