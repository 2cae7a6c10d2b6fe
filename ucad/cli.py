"""The `ucad` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ucad.config import PRESETS, load_config

log = logging.getLogger("ucad")

FORMATS = ("mvtec", "visa", "folder")


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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write through a temporary sibling so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def cmd_synth(args: argparse.Namespace) -> None:
    from ucad.data.synth import generate

    names = generate(args.out, classes=args.classes, seed=args.seed)
    print(f"wrote {len(names)} classes to {args.out}: {', '.join(names)}")


def _store(args: argparse.Namespace):
    from ucad.store import ArtifactStore

    return ArtifactStore(args.store)


def _report(result, json_path: Path | None) -> None:
    from ucad.report import format_result

    data = result.as_json()
    print(format_result(data))
    computed = [s for s in data["stages"] if not s["cached"]]
    print(
        f"\nmodel {data['model']} version {data['version']}"
        f"{'' if data['new_version'] else ' (unchanged)'}; "
        f"stages: {len(computed)} computed, {len(data['stages']) - len(computed)} cached"
    )
    if json_path:
        _write_json(json_path, data)
        print(f"wrote {json_path}")


def cmd_add_task(args: argparse.Namespace) -> None:
    from ucad.continual import add_task

    config = _config_from(args)
    log.info("config: %s", config.model_dump_json())
    store = _store(args)
    result = add_task(args.model, args.task, args.data, args.format, config, store, args.routing)
    _report(result, args.json)


def cmd_benchmark(args: argparse.Namespace) -> None:
    from ucad.continual import benchmark

    config = _config_from(args)
    log.info("config: %s", config.model_dump_json())
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    store = _store(args)
    result = benchmark(args.data, args.format, config, store, tasks, args.routing, args.model)
    _report(result, args.json)


def cmd_models(args: argparse.Namespace) -> None:
    store = _store(args)
    names = store.models()
    if not names:
        print(f"no models in {store.root}")
    for name in names:
        print(name)
        for version in store.model_versions(name):
            manifest = store.read_model(name, version)
            tasks = ", ".join(t["name"] for t in manifest["tasks"])
            print(f"  v{version}  {manifest.get('created_utc', '')}  {tasks}")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="dataset root")
    parser.add_argument("--format", choices=FORMATS, default="mvtec", help="default: mvtec")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser)
    parser.add_argument(
        "--routing",
        choices=("agnostic", "oracle"),
        default="agnostic",
        help="agnostic: each image selects its class by its keys (default); "
        "oracle: the true class (diagnostic, as the published numbers were made)",
    )
    _add_store_arg(parser)
    parser.add_argument("--json", type=Path, help="write all figures to this JSON file")


def _add_store_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", help="artifact store root or fsspec URL (default: $UCAD_STORE or ./artifacts)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ucad", description="Unsupervised continual anomaly detection (UCAD)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser(
        "synth", help="write a synthetic MVTec-AD-layout dataset (no download needed)"
    )
    synth.add_argument("out", type=Path, help="output folder")
    synth.add_argument("--classes", type=int, default=3, help="number of classes (default 3)")
    synth.add_argument("--seed", type=int, default=0)
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

    models = commands.add_parser("models", help="list models, their versions and classes")
    _add_store_arg(models)
    models.set_defaults(run=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (ValueError, OSError, RuntimeError) as err:
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
