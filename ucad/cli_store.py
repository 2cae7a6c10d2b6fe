"""`ucad models [rm]` and `ucad store verify|prune`: look after models and the artifact store."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ucad.store import ArtifactStore

StoreArg = Callable[..., None]  # (parser, default=None): adds --store


class VerificationFailed(RuntimeError):
    """`store verify` found damage: exit 1 after the list."""


def _store(args: argparse.Namespace) -> ArtifactStore:
    return ArtifactStore(args.store).require_existing()


def cmd_models(args: argparse.Namespace) -> None:
    from ucad.manifest import ManifestError, load_version

    store = _store(args)
    names = store.models()
    if not names:
        print(f"no models in {store.root}")
    for name in names:
        print(name)
        for number in store.model_versions(name):
            try:
                version = load_version(store, name, number)
            except ManifestError as err:
                print(f"  v{number}  DAMAGED: {err}")
                continue
            config = version.config
            print(
                f"  v{number}  {version.created_utc}  {config.backbone}, {config.structure}, "
                f"{config.epochs} epochs, seed {config.seed}: {', '.join(version.task_names)}"
            )


def cmd_models_rm(args: argparse.Namespace) -> None:
    store = _store(args)
    versions = store.remove_model(args.name)
    print(
        f"removed model {args.name} ({len(versions)} version(s)); its stage artifacts stay "
        "until `ucad store prune --unreferenced`"
    )


def cmd_store_verify(args: argparse.Namespace) -> None:
    from ucad.verify import repair, verify_store

    store = _store(args)
    problems = verify_store(store, args.model)
    scope = f"model {args.model}" if args.model else f"store {store.root}"
    if not problems:
        print(f"{scope}: every artifact and model version verified")
        return
    for problem in problems:
        print(f"DAMAGED  {problem}")
    if args.repair:
        moved = repair(store, problems)
        print(
            f"moved {len(moved)} damaged artifact(s) aside (under damaged/); the next run that "
            "needs them computes them again. Damaged model manifests must be fixed or removed "
            "by hand (ucad models rm)."
        )
    raise VerificationFailed(f"{scope}: {len(problems)} problem(s) found")


def cmd_store_prune(args: argparse.Namespace) -> None:
    from ucad.verify import prune

    store = _store(args)
    removed = prune(store, args.older_than * 3600, args.unreferenced, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path in removed:
        print(f"{verb}  {path}")
    print(f"{verb} {len(removed)} item(s) from {store.root}")


def add_store_commands(commands: argparse._SubParsersAction, add_store_arg: StoreArg) -> None:
    models = commands.add_parser("models", help="list models, their versions and classes")
    add_store_arg(models)
    models.set_defaults(run=cmd_models)
    model_commands = models.add_subparsers(dest="models_command", metavar="COMMAND")
    remove = model_commands.add_parser("rm", help="remove every version of a model")
    remove.add_argument("name", help="model name")
    # `ucad models --store S rm NAME` as well as `... rm NAME --store S`: unset here, the
    # value given to `models` stays (argparse would otherwise reset it to the default)
    add_store_arg(remove, default=argparse.SUPPRESS)
    remove.set_defaults(run=cmd_models_rm)

    store = commands.add_parser("store", help="check and clean the artifact store")
    store_commands = store.add_subparsers(dest="store_command", required=True, metavar="COMMAND")
    verify = store_commands.add_parser(
        "verify", help="check every artifact and model version; exit 1 if any is damaged"
    )
    verify.add_argument("--model", help="only this model and the artifacts it names")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="move damaged artifacts aside; the next run that needs them computes them again",
    )
    add_store_arg(verify)
    verify.set_defaults(run=cmd_store_verify)
    prune = store_commands.add_parser(
        "prune", help="remove what killed runs left behind (and, on request, unused artifacts)"
    )
    prune.add_argument(
        "--older-than",
        type=float,
        default=24.0,
        metavar="HOURS",
        help="temporaries of writers on other hosts are removed after this age (default 24); "
        "on this host, as soon as their writer process is gone",
    )
    prune.add_argument(
        "--unreferenced",
        action="store_true",
        help="also remove stage artifacts that no model version names or could evaluate with",
    )
    prune.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    add_store_arg(prune)
    prune.set_defaults(run=cmd_store_prune)
