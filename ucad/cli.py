"""The `ucad` command."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ucad import __version__
from ucad.cli_store import add_store_commands
from ucad.config import PRESETS, ROUTINGS, load_config
from ucad.data.datasets import FORMATS
from ucad.export import add_export_parser
from ucad.ui import add_ui_parser

log = logging.getLogger("ucad")


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    """`--set field=value` overrides; values are read as YAML scalars (3, 0.5, true, null)."""
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set expects field=value, got {item!r}")
        overrides[name.strip()] = yaml.safe_load(value)
    return overrides


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="default: paper")
    parser.add_argument("--config", type=Path, help="YAML or JSON file overriding preset fields")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override one field"
    )


def _config_from(args: argparse.Namespace):
    return load_config(args.preset, args.config, _parse_set(args.set))


def json_ready(value: Any) -> Any:
    """`value` with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write through a temporary sibling so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    # JSON has no NaN or infinity: undefined figures are null
    tmp.write_text(json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def cmd_synth(args: argparse.Namespace) -> None:
    from ucad.data.synth import generate

    made = (Path(args.out) / "dataset.json").exists()
    names = generate(args.out, classes=args.classes, seed=args.seed)
    verb = "already holds" if made else "wrote"
    classes = "class" if len(names) == 1 else "classes"
    print(f"{args.out} {verb} {len(names)} {classes}: {', '.join(names)}")


def _store(args: argparse.Namespace):
    from ucad.store import ArtifactStore

    return ArtifactStore(args.store)


def _report(result, json_path: Path | None) -> None:
    from ucad.report import format_run

    data = result.as_json()
    print(format_run(data))
    if json_path:
        _write_json(json_path, data)
        print(f"wrote {json_path}")


def _run(args: argparse.Namespace, request, kind: str) -> None:
    """Run a request, report it, and record it in MLflow (a failure is a warning unless
    --strict-tracking)."""
    from ucad.runners import runner_for
    from ucad.runs import track

    log.info("config: %s", request.config.model_dump_json())
    started = time.time()
    with runner_for(request.config, request.store) as runner:  # this process, or a Dask cluster
        result = request.run(runner)
    _report(result, args.json)
    if not args.no_tracking:
        track(result, request.store, kind, strict=args.strict_tracking, started=started)


def cmd_add_task(args: argparse.Namespace) -> None:
    from ucad.continual import AddTask

    request = AddTask(
        model=args.model,
        task=args.task,
        data=args.data,
        config=_config_from(args),
        store=_store(args),
        format=args.format,
        routing=args.routing,
    )
    _run(args, request, "add-task")


def cmd_benchmark(args: argparse.Namespace) -> None:
    from ucad.continual import Replay

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else None
    request = Replay(
        data=args.data,
        config=_config_from(args),
        store=_store(args),
        format=args.format,
        tasks=tasks,
        model=args.model,
        routing=args.routing,
    )
    _run(args, request, "benchmark")


def cmd_bench(args: argparse.Namespace) -> None:
    from ucad.bench import bench_settings, run_bench
    from ucad.bench_report import format_report

    settings = bench_settings(
        args.preset,
        args.config,
        _parse_set(args.set),
        images=args.images,
        classes=args.classes,
        epochs=args.epochs,
        device=args.device,
        structure=args.structure,
        scale_out=args.scale_out,
    )
    report = run_bench(settings)
    print(format_report(report))
    if args.json:
        _write_json(args.json, report)
        print(f"wrote {args.json}")


def _parse_thresholds(items: Sequence[str]) -> dict[str, float]:
    """`--threshold CLASS=VALUE` overrides of stored class thresholds."""
    thresholds = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--threshold expects CLASS=VALUE, got {item!r}")
        try:
            thresholds[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--threshold {item!r}: {value!r} is not a number") from None
    return thresholds


def cmd_predict(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from ucad.predictions import predict_files

    thresholds = _parse_thresholds(args.threshold)
    if args.onnx:  # onnxruntime only: torch is not imported
        from ucad.onnx_inspector import load_onnx_inspector

        if args.device or args.batch_size:
            raise ValueError("--device and --batch-size apply to --model, not --onnx")
        inspector = load_onnx_inspector(args.onnx, thresholds)
    else:
        from ucad.inference import Inspector

        store = _store(args).require_existing()
        inspector = Inspector.load(store, args.model, thresholds, args.device, args.batch_size)
    records = []
    for record in predict_files(inspector, args.paths, args.out):
        records.append(record)
        decision = "ANOMALOUS" if record["anomalous"] else "normal"
        tqdm.write(
            f"{decision:9}  {record['task']}  score {record['score']:#.4g} "
            f"(threshold {record['threshold']:#.4g})  {record['path']}"
        )
    flagged = sum(record["anomalous"] for record in records)
    print(
        f"{len(records)} image{'' if len(records) == 1 else 's'}, {flagged} anomalous "
        f"(model {inspector.name} version {inspector.version})"
    )
    if args.out:
        print(f"heat maps in {args.out}")
    if args.json:
        _write_json(
            args.json,
            {
                "model": inspector.name,
                "version": inspector.version,
                "thresholds": inspector.thresholds,
                "images": records,
            },
        )
        print(f"wrote {args.json}")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="dataset root")
    parser.add_argument("--format", choices=FORMATS, default="mvtec", help="default: mvtec")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser)
    parser.add_argument(
        "--routing",
        choices=ROUTINGS,
        default="agnostic",
        help="agnostic: each image selects its class by its keys (default); "
        "oracle: the true class (diagnostic, as the published numbers were made)",
    )
    _add_store_arg(parser)
    parser.add_argument("--json", type=Path, help="write all figures to this JSON file")
    tracking = parser.add_mutually_exclusive_group()
    tracking.add_argument("--no-tracking", action="store_true", help="do not log the run to MLflow")
    tracking.add_argument(
        "--strict-tracking",
        action="store_true",
        help="fail (exit 1) if the run cannot be logged to MLflow; default: warn. Where: "
        "--set tracking_uri=URI, else $MLFLOW_TRACKING_URI, else <store>/mlflow.db",
    )


def _add_store_arg(parser: argparse.ArgumentParser, default: Any = None) -> None:
    parser.add_argument(
        "--store",
        default=default,
        help="artifact store root or fsspec URL (default: $UCAD_STORE or ./artifacts)",
    )


def _add_general_options(parser: argparse.ArgumentParser, default: Any = False) -> None:
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="debug logging"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="warnings and errors only"
    )
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks on errors"
    )


class _CommandParser(argparse.ArgumentParser):
    """A (sub)command's parser: takes the general options after the command too
    (`ucad predict ... -v`), and names itself in its usage when an argument is unknown."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Not set unless given here, so the same option before the command still counts.
        _add_general_options(self, default=argparse.SUPPRESS)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:  # argparse would leave them to `ucad`'s own usage line
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ucad", description="Unsupervised continual anomaly detection (UCAD)."
    )
    _add_general_options(parser)
    parser.add_argument("--version", action="version", version=f"ucad {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser
    )

    synth = commands.add_parser(
        "synth", help="write a synthetic MVTec-AD-layout dataset (no download needed)"
    )
    synth.add_argument("out", type=Path, help="output folder")
    synth.add_argument("--classes", type=int, default=3, help="number of classes (default 3)")
    synth.add_argument(
        "--seed", type=int, default=0, help="random seed of the images and defects (default 0)"
    )
    synth.set_defaults(run=cmd_synth)

    add = commands.add_parser(
        "add-task", help="learn one class into a model, then evaluate every class it knows"
    )
    add.add_argument("--model", required=True, help="model name (created if new)")
    add.add_argument("--task", required=True, help="class to learn")
    _add_data_args(add)
    _add_run_args(add)
    add.set_defaults(run=cmd_add_task)

    bench = commands.add_parser(
        "benchmark", help="learn a stream of classes in order into a fresh model, report all"
    )
    _add_data_args(bench)
    bench.add_argument("--tasks", help="comma-separated class order (default: all, alphabetical)")
    bench.add_argument("--model", help="name of the fresh model (default: benchmark-<UTC time>)")
    _add_run_args(bench)
    bench.set_defaults(run=cmd_benchmark)

    predict = commands.add_parser(
        "predict", help="score images with a model version: class, score, decision, heat map"
    )
    predict.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image or folder")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="NAME[@VERSION]", help="default version: the latest")
    source.add_argument(
        "--onnx",
        type=Path,
        metavar="DIR",
        help="an export folder (`ucad export`), run with onnxruntime on the CPU",
    )
    predict.add_argument(
        "--out", type=Path, metavar="DIR", help="write a heat-map overlay PNG per image here"
    )
    predict.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="CLASS=VALUE",
        help="override one class's stored threshold (repeatable)",
    )
    predict.add_argument("--device", help="override the model's device (cpu, cuda, cuda:N)")
    predict.add_argument("--batch-size", type=int, metavar="N", help="images per forward pass")
    _add_store_arg(predict)
    predict.add_argument(
        "--json", type=Path, metavar="OUT", help="write one record per image to this JSON file"
    )
    predict.set_defaults(run=cmd_predict)

    add_export_parser(commands)

    speed = commands.add_parser(
        "bench",
        help="time every stage against its floor (bare backbone passes) on generated data",
    )
    _add_config_args(speed)
    speed.add_argument(
        "--images",
        type=int,
        default=16,
        help="training images per class (default 16; "
        "tests: half as many normal and as many defective)",
    )
    speed.add_argument("--classes", type=int, default=10, help="classes in the stream (default 10)")
    speed.add_argument(
        "--epochs", type=int, default=1, help="prompt-training epochs to time (default 1)"
    )
    speed.add_argument("--device", help="cpu, cuda or cuda:N (default: the config's device)")
    speed.add_argument(
        "--structure",
        choices=("auto", "sam", "superpixel"),
        default="auto",
        help="structure source to time; auto: SAM if its weights are on disk, else superpixels; "
        "sam: SAM, with random weights if its own are missing (minutes per image on a CPU)",
    )
    speed.add_argument(
        "--scale-out",
        type=int,
        default=4,
        metavar="K",
        help="time the first K classes of the stream on a local Dask cluster of 1 and of 2 "
        "workers (needs ucad[dask]; 0: skip; default 4)",
    )
    speed.add_argument("--json", type=Path, help="write all figures to this JSON file")
    speed.set_defaults(run=cmd_bench)

    add_store_commands(commands, _add_store_arg)
    add_ui_parser(commands)
    return parser


# Libraries that log INFO through handlers of their own, past the root logger's level.
NOISY_LOGGERS = ("mlflow", "alembic", "prefect", "httpx", "distributed", "urllib3")
# Libraries that log every step at INFO: their lines only with -v.
CHATTY_LOGGERS = ("distributed", "onnxscript", "onnx_ir")


def quiet_libraries() -> None:
    """Warnings and errors only, from every library too (-q)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when MLflow is imported
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("-v/--verbose and -q/--quiet cannot be used together")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.quiet:
        quiet_libraries()
    elif not args.verbose:  # a cluster's start and stop, an export's graph passes: only with -v
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        args.run(args)
    except BrokenPipeError:  # the reader went away (`ucad models | head -1`): stop quietly
        with contextlib.suppress(OSError, ValueError):  # no second error when Python exits
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as if stopped by SIGPIPE, like other command-line tools
    except (ValueError, OSError, RuntimeError, ImportError) as err:
        if args.debug:
            raise
        print(f"ucad: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ucad: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
