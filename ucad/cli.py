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


def cmd_benchmark(args: argparse.Namespace) -> None:
    from ucad.benchmark import run_stream
    from ucad.report import format_result

    config = _config_from(args)
    log.info("config: %s", config.model_dump_json())
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    result = run_stream(args.data, args.format, config, tasks, args.routing).as_json()
    print(format_result(result))
    if args.json:
        _write_json(args.json, result)
        print(f"\nwrote {args.json}")


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

    bench = commands.add_parser(
        "benchmark", help="learn a stream of classes in order and report every figure"
    )
    bench.add_argument("--data", type=Path, required=True, help="dataset root")
    bench.add_argument("--format", choices=FORMATS, default="mvtec", help="default: mvtec")
    bench.add_argument("--tasks", help="comma-separated class order (default: all, alphabetical)")
    _add_config_args(bench)
    bench.add_argument(
        "--routing",
        choices=("agnostic", "oracle"),
        default="agnostic",
        help="agnostic: each image selects its class by its keys (default); "
        "oracle: the true class (diagnostic, as the published numbers were made)",
    )
    bench.add_argument("--json", type=Path, help="write all figures to this JSON file")
    bench.set_defaults(run=cmd_benchmark)
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
