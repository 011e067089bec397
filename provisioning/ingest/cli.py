"""``fleet ingest`` and ``fleet query``: the subcommands :mod:`provisioning.fleet` adds to its parser."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import peewee
from pydantic import ValidationError

from agent.config import CloudBroker, TlsSettings
from agent.errors import AgentError
from provisioning.ingest.query import RecordFilter, query, totals
from provisioning.ingest.schema import open_database
from provisioning.ingest.store import RecordStore
from provisioning.ingest.trust import DeviceKeys
from provisioning.ingest.worker import IngestSettings, IngestWorker

DEFAULT_DB = "records.db"
# A batch inflates to at most this: a device's batch_max_bytes is at most 16 MiB (agent.config.CloudBroker).
MAX_DECODED_BYTES = 16 << 20
PASSWORD_VARIABLE = "EDGE_FLEET_BROKER_PASSWORD"


def add_commands(commands: Any) -> None:
    """Add ``ingest`` and ``query`` to the fleet parser's subcommands; each sets ``handler``."""
    ingest = commands.add_parser("ingest", help="store what devices send upstream: verified, de-duplicated")
    add_broker_arguments(ingest)
    ingest.add_argument("--client-id", default="fleet-ingest-1", help="fixed per worker: it names the session")
    ingest.add_argument("--group", default="fleet-ingest", help="shared subscription group of the workers")
    ingest.add_argument("--session-expiry", type=int, default=7 * 86400, help="seconds the broker keeps our session")
    ingest.add_argument("--buffer", type=int, default=256, help="messages held unacknowledged (Receive Maximum)")
    ingest.add_argument("--batch-max", type=int, default=256, help="messages per transaction")
    ingest.add_argument(
        "--max-packet-bytes", type=int, default=4 << 20, help="MQTT 5 Maximum Packet Size: the broker drops larger ones"
    )
    add_db_argument(ingest)
    ingest.set_defaults(handler=_run_ingest)

    show = commands.add_parser("query", help="print stored (or quarantined, held) records as JSON")
    show.add_argument("--device")
    show.add_argument("--kind", help="res, telemetry, audit, ...")
    show.add_argument("--since", help="ISO 8601 (UTC if no zone) or POSIX seconds; arrival at the ingest")
    show.add_argument("--until")
    show.add_argument("--limit", type=int, default=100)
    table = show.add_mutually_exclusive_group()
    table.add_argument("--quarantine", dest="table", action="store_const", const="quarantine")
    table.add_argument("--held", dest="table", action="store_const", const="held")
    table.add_argument("--totals", dest="table", action="store_const", const="totals", help="counts only")
    add_db_argument(show)
    show.set_defaults(handler=_run_query, table="records")


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """The cloud broker's options (the password comes from $EDGE_FLEET_BROKER_PASSWORD); see :func:`cloud_broker`."""
    parser.add_argument("--host", required=True, help="the cloud broker")
    parser.add_argument("--port", type=int, default=8883)
    parser.add_argument("--username")
    parser.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None, help="default: off on loopback only")
    parser.add_argument("--ca-file", type=Path)
    parser.add_argument("--cert-file", type=Path)
    parser.add_argument("--key-file", type=Path)


def cloud_broker(args: argparse.Namespace, **settings: Any) -> CloudBroker:
    """The broker :func:`add_broker_arguments` describes; ``settings`` are further CloudBroker fields."""
    tls: bool | TlsSettings | None = args.tls
    if args.ca_file or args.cert_file or args.key_file:
        tls = TlsSettings(ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
    return CloudBroker(
        host=args.host, port=args.port, username=args.username, password=os.environ.get(PASSWORD_VARIABLE),
        tls=tls, reconnect_min_s=0.5, reconnect_max_s=30.0, **settings,
    )  # fmt: skip


def add_db_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db", help=f"postgresql://user@host/db, sqlite:///path or a file path (default: FLEET_DIR/{DEFAULT_DB})"
    )


def database_location(args: argparse.Namespace) -> str:
    """The fleet database ``--db`` names, by default FLEET_DIR/records.db."""
    return args.db or str(Path(args.dir) / DEFAULT_DB)


def _run_query(args: argparse.Namespace) -> int:
    open_database(database_location(args), create=False)
    if args.table == "totals":
        result: Any = totals()
    else:
        selection = RecordFilter(
            table=args.table, device=args.device, kind=args.kind, since=args.since, until=args.until, limit=args.limit
        )
        result = query(selection)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


def ingest_settings(args: argparse.Namespace) -> IngestSettings:
    """The worker's settings from the command line (the broker password from $EDGE_FLEET_BROKER_PASSWORD)."""
    broker = cloud_broker(args, session_expiry=args.session_expiry, max_packet_bytes=args.max_packet_bytes)
    return IngestSettings(
        broker=broker, client_id=args.client_id, group=args.group, buffer=args.buffer, batch_max=args.batch_max
    )


def _run_ingest(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ingest_settings(args)
    keys = DeviceKeys(Path(args.dir) / "inventory.json")
    keys.refresh()
    store = RecordStore(open_database(database_location(args)), keys, max_decoded_bytes=MAX_DECODED_BYTES)
    worker = IngestWorker(settings, store)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    worker.start()
    print(f"fleet ingest: worker {settings.client_id} on {settings.topic_filter}", file=sys.stderr, flush=True)
    stop.wait()
    worker.stop()
    return 0


def run_command(args: argparse.Namespace) -> int:
    """Run ``ingest`` or ``query``; errors are printed as ``fleet: ...`` with exit status 1."""
    try:
        return int(args.handler(args))
    except (AgentError, ValidationError, OSError, peewee.PeeweeException) as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 1
