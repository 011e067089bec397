"""The rollout subcommands :mod:`provisioning.fleet` adds: release keys, ``bundle``, ``serve``, ``deploy``,
``status`` and ``cancel`` (docs/fleet.md walks through them)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.errors import ProvisioningError
from agent.mqtt import topics
from provisioning.ingest.cli import add_broker_arguments, add_db_argument, cloud_broker, database_location
from provisioning.records import Inventory, load_document
from provisioning.rollout.bundles import BundleStore, bundle_model_file, describe, read_references
from provisioning.rollout.chunks import ChunkService
from provisioning.rollout.issuer import Issuer, RetainedPublisher
from provisioning.rollout.plan import RolloutPlan
from provisioning.rollout.release import ReleaseKeys
from provisioning.rollout.rollout import Rollout
from provisioning.rollout.schema import open_rollout_database
from provisioning.rollout.status import all_rollouts, rollout_status

# Exit statuses of `fleet deploy`: 0 completed, 3 anything else it ended in (aborted and rolled back, timed out, ...).
NOT_COMPLETED = 3


def add_commands(commands: Any) -> None:
    """Add the rollout subcommands to the fleet parser; each sets ``handler``."""
    init = commands.add_parser("init-release-key", help="create the release root key, a release key and key list 1")
    init.set_defaults(handler=_run_init_release_key)
    rotate = commands.add_parser("rotate-release-key", help="a new signing key and a new signed key list")
    rotate.add_argument("--revoke-old", action="store_true", help="revoke the key it replaces")
    rotate.set_defaults(handler=_run_rotate)
    revoke = commands.add_parser("revoke-release-key", help="revoke a release key (by kid) in a new key list")
    revoke.add_argument("kid")
    revoke.set_defaults(handler=_run_revoke)
    resign = commands.add_parser("resign-key-list", help="sign the same keys as a new key list (before it expires)")
    resign.set_defaults(handler=_run_resign)

    bundle = commands.add_parser("bundle", help="build and sign a bundle from a .tflite file into the bundle store")
    bundle.add_argument("model", type=Path)
    bundle.add_argument("--id", required=True, help="the model id")
    bundle.add_argument("--version", required=True)
    bundle.add_argument("--task", help="default: the model id")
    bundle.add_argument("--labels", type=Path, help="a label file, one per line")
    bundle.add_argument("--reference-inputs", type=Path, help="JSON list of {inputs, expected, tolerance}")
    bundle.add_argument("--chunk-size", type=int, default=64 * 1024)
    bundle.add_argument("--runtime", default="auto", help="the runtime that reads the model: auto, litert, tflite-runtime")
    _add_store(bundle)
    bundle.set_defaults(handler=_run_bundle)

    serve = commands.add_parser("serve", help="answer devices' chunk requests from the bundle store")
    add_broker_arguments(serve)
    serve.add_argument("--client-id", default="fleet-serve-1", help="one per instance")
    serve.add_argument("--group", default="fleet-serve", help="the shared subscription group of the instances")
    _add_store(serve)
    serve.set_defaults(handler=_run_serve)

    deploy = commands.add_parser("deploy", help="roll a bundle out in rings; resumable (--resume ID)")
    deploy.add_argument("bundle", nargs="?", help="model@version in the bundle store")
    targets = deploy.add_mutually_exclusive_group()
    targets.add_argument("--to", nargs="+", metavar="DEVICE", help="these devices, the first ones first")
    targets.add_argument("--group", help="the inventory's devices in this group")
    targets.add_argument("--profile", help="the inventory's devices with this hardware profile")
    deploy.add_argument("--resume", metavar="DEPLOYMENT", help="continue a rollout that was stopped")
    deploy.add_argument("--id", help="the rollout's id (default: model-version-time)")
    deploy.add_argument("--rings", default="1,10%,100%", help="cumulative counts or percentages (default 1,10%%,100%%)")
    deploy.add_argument("--ramp", choices=["rings", "exponential"], default="rings")
    deploy.add_argument("--max-failure-rate", type=float, default=10.0, help="percent (default 10)")
    deploy.add_argument("--min-finished", type=int, default=3, help="devices finished before judging the rate")
    deploy.add_argument("--device-deadline", type=float, default=3600.0, help="seconds per device")
    deploy.add_argument("--deadline", type=float, default=86400.0, help="seconds for the whole rollout")
    deploy.add_argument("--probation-seconds", type=float, default=60.0)
    deploy.add_argument("--probation-requests", type=int, default=50, help="0: seconds only")
    deploy.add_argument("--activation", choices=["immediately", "maintenance_window"], default="immediately")
    deploy.add_argument("--rollback-to", help="model@version to restore on abort (default: the last completed)")
    deploy.add_argument("--poll", type=float, default=2.0, help="seconds between decisions")
    deploy.add_argument("--no-wait", action="store_true", help="send the first ring and return")
    deploy.add_argument("--client-id", default="fleet-deploy")
    add_broker_arguments(deploy)
    add_db_argument(deploy)
    _add_store(deploy)
    deploy.set_defaults(handler=_run_deploy)

    status = commands.add_parser("status", help="rollouts, or one rollout's devices, as JSON")
    status.add_argument("deployment", nargs="?")
    add_db_argument(status)
    status.set_defaults(handler=_run_status)

    cancel = commands.add_parser("cancel", help="stop a rollout; devices on their way get a signed cancel")
    cancel.add_argument("deployment")
    cancel.add_argument("--rollback", action="store_true", help="also roll back devices that finished")
    cancel.add_argument("--client-id", default="fleet-cancel")
    add_broker_arguments(cancel)
    add_db_argument(cancel)
    _add_store(cancel)
    cancel.set_defaults(handler=_run_cancel)


def _add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, help="the bundle store (default: FLEET_DIR/bundles)")


def _store(args: argparse.Namespace) -> BundleStore:
    return BundleStore(args.store or Path(args.dir) / "bundles")


def _print(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def _run_init_release_key(args: argparse.Namespace) -> int:
    keys = ReleaseKeys(Path(args.dir))
    keys.init()
    _report_written(keys.written)
    return 0


def _run_rotate(args: argparse.Namespace) -> int:
    keys = ReleaseKeys(Path(args.dir))
    print(f"signing key now {keys.rotate(revoke_old=args.revoke_old)}; publish the key list: any `fleet deploy`")
    _report_written(keys.written)
    return 0


def _run_revoke(args: argparse.Namespace) -> int:
    keys = ReleaseKeys(Path(args.dir))
    keys.revoke(args.kid)
    _report_written(keys.written)
    return 0


def _run_resign(args: argparse.Namespace) -> int:
    keys = ReleaseKeys(Path(args.dir))
    keys.refresh()
    _report_written(keys.written)
    return 0


def _report_written(paths: list[Path]) -> None:
    for path in paths:
        print(f"wrote {path}")
    if not paths:
        print("nothing to do: already up to date", file=sys.stderr)


def _run_bundle(args: argparse.Namespace) -> int:
    from agent.models.accelerators import load_runtime  # LiteRT is loaded only by the command that needs it

    key = ReleaseKeys(Path(args.dir)).signing_key()
    bundle = bundle_model_file(
        key, args.model, model_id=args.id, version=args.version, task=args.task or args.id,
        labels=_labels(args.labels), runtime=load_runtime(args.runtime),
        references=read_references(args.reference_inputs) if args.reference_inputs else None,
        chunk_size=args.chunk_size,
    )  # fmt: skip
    directory = _store(args).add(bundle)
    _print({**describe(bundle.manifest), "stored": str(directory)})
    return 0


def _labels(path: Path | None) -> list[str]:
    from agent.models.authoring import read_labels

    return read_labels(path) if path else []


def _run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = ChunkService(_store(args), cloud_broker(args), client_id=args.client_id, group=args.group)
    stop = _stop_on_signals()
    service.start()
    print(f"fleet serve: {args.client_id} on {service.topic_filter}", file=sys.stderr, flush=True)
    while not stop.wait(60):
        counts = service.counts
        logging.info("served %d requests, %d chunks, %d bytes to %d devices", counts.requests, counts.chunks,
                     counts.bytes, len(counts.devices))  # fmt: skip
    service.stop()
    return 0


def _run_deploy(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    database = open_rollout_database(database_location(args))
    releases = ReleaseKeys(Path(args.dir))
    publisher = RetainedPublisher(cloud_broker(args), args.client_id)
    try:
        publisher.retain(topics.key_list_topic(), releases.key_list())
        issuer = Issuer(database, releases.signing_key(), publisher)
        if args.resume:
            rollout = Rollout(args.resume, issuer, _store(args))
            rollout.deployment()
        else:
            rollout = _new_rollout(args, issuer)
        print(f"fleet deploy: rollout {rollout.deployment_id}", file=sys.stderr, flush=True)
        if args.no_wait:
            rollout.step()
            state = rollout.deployment().state
        else:
            state = rollout.run(args.poll, _stop_on_signals())
    finally:
        publisher.close()
    _print(rollout_status(rollout.deployment_id))
    return 0 if state == "completed" else NOT_COMPLETED


def _new_rollout(args: argparse.Namespace, issuer: Issuer) -> Rollout:
    if not args.bundle:
        raise ProvisioningError("give the bundle to deploy (model@version), or --resume DEPLOYMENT")
    store = _store(args)
    manifest = store.manifest(args.bundle)
    plan = RolloutPlan(
        rings=tuple(part for part in args.rings.split(",") if part), ramp=args.ramp,
        max_failure_rate=args.max_failure_rate, min_finished=args.min_finished,
        device_deadline_s=args.device_deadline, deadline_s=args.deadline, activation=args.activation,
        probation={"seconds": args.probation_seconds, "requests": args.probation_requests or None},
    )  # fmt: skip
    deployment_id = args.id or f"{manifest.model_id}-{manifest.version}-{int(time.time())}"
    return Rollout.create(deployment_id, args.bundle, _targets(args), plan, issuer, store, args.rollback_to)


def _targets(args: argparse.Namespace) -> list[str]:
    if args.to:
        return list(args.to)
    if not (args.group or args.profile):
        raise ProvisioningError("say whom to deploy to: --to DEVICE..., --group G or --profile P")
    inventory = load_document(Inventory, Path(args.dir) / "inventory.json")
    return inventory_devices(inventory, group=args.group, profile=args.profile)


def inventory_devices(inventory: Inventory, *, group: str | None = None, profile: str | None = None) -> list[str]:
    """The active devices of ``group`` (or with hardware ``profile``), sorted by id; ProvisioningError if none."""
    chosen = sorted(
        entry.device_id for entry in inventory.devices.values()
        if entry.status == "active" and (group in entry.groups if group else entry.profile == profile)
    )  # fmt: skip
    if not chosen:
        which = f"group {group}" if group else f"profile {profile}"
        raise ProvisioningError(f"no active device in the inventory with {which}")
    return chosen


def _run_status(args: argparse.Namespace) -> int:
    open_rollout_database(database_location(args), create=False)
    _print(rollout_status(args.deployment) if args.deployment else all_rollouts())
    return 0


def _run_cancel(args: argparse.Namespace) -> int:
    database = open_rollout_database(database_location(args), create=False)
    releases = ReleaseKeys(Path(args.dir))
    publisher = RetainedPublisher(cloud_broker(args), args.client_id)
    try:
        issuer = Issuer(database, releases.signing_key(), publisher)
        Rollout(args.deployment, issuer, _store(args)).cancel(roll_back=args.rollback)
    finally:
        publisher.close()
    _print(rollout_status(args.deployment))
    return 0


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    return stop
