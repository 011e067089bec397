"""Command line: ``edge-agent run | check-config | identity | models | verify | call | outbox | demo | mcp-stdio``."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.compat import UTC
from agent.errors import AgentError, ConfigError, SignatureInvalid

# The settings (pydantic) and everything else are imported by the commands that need them: for `run` only
# once main() has switched the cyclic collector off (see _cmd_run).
if TYPE_CHECKING:
    from agent.config import LocalBroker
    from agent.models.catalog import ModelEntry
    from agent.observe.logs import LogFormat

log = logging.getLogger("agent")


def _setup_logging(level: str, log_format: LogFormat = "text") -> None:
    from agent.observe.logs import configure_logging

    configure_logging(level, log_format, sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    # Peewee imports psycopg2 whenever it is installed (the [fleet] extra, for `fleet ingest`): 6 MB of libpq,
    # OpenSSL and Kerberos and 8 ms in a process whose databases are all SQLite. None in sys.modules makes that
    # import fail as if the package were absent.
    sys.modules.setdefault("psycopg2", None)
    from agent.observe.memory import limit_malloc_arenas

    limit_malloc_arenas()  # before the first thread: importing agent.app starts numpy's OpenBLAS thread
    from agent.config_loader import load_settings
    from agent.models.probe_early import probe_early

    # main() switched the cyclic collector off: it comes back once the agent serves, with what exists by then
    # frozen (left out of every later collection, which also keeps those short).
    try:
        settings = load_settings(args.config)
        _setup_logging(settings.log_level, settings.log_format)
        # The probes of operator-supplied model files run beside the imports and the start, not before the models.
        probe_early(settings)
        from agent.app import Agent

        agent = Agent(settings)
        agent.start()
        gc.freeze()
    finally:
        gc.enable()
    agent.run_until_signalled()
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from agent.config_loader import describe_effective_config, load_settings_with_sources

    print(describe_effective_config(load_settings_with_sources(args.config)))
    print(f"{args.config or 'built-in defaults'}: valid", file=sys.stderr)
    return 0


def _cmd_identity(args: argparse.Namespace) -> int:
    from agent.config_loader import load_settings
    from agent.signing import init_identity, show_identity

    settings = load_settings(args.config)
    describe = init_identity if args.action == "init" else show_identity
    identity = describe(settings.signing, settings.device_id, settings.data_dir)
    state = "created" if identity.created else "existing"
    print(
        f"device {identity.device_id}: {state} {identity.backend} key in {identity.location}, "
        f"public key sha256 {identity.public_key_sha256}",
        file=sys.stderr,
    )
    print(identity.public_key_pem.rstrip("\n"))
    print(identity.csr_pem.rstrip("\n"))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from agent.config_loader import load_settings
    from agent.models.accelerators import load_runtime
    from agent.models.authoring import add_model_file, read_labels
    from agent.models.catalog import MANIFEST_NAME
    from agent.models.manager import ModelManager
    from agent.models.probe import ModelProbe, allowance_for

    settings = load_settings(args.config)
    models_dir = args.models_dir or settings.models_dir
    # The agent's probe verdicts are shared where its data_dir exists; the command never creates that folder.
    state_dir = settings.data_dir if settings.data_dir.is_dir() else None
    if args.action == "add":
        if models_dir is None:
            raise AgentError("models add needs --models-dir, or models_dir in --config: the bundled models are read-only")
        entry = add_model_file(
            models_dir,
            args.file,
            model_id=args.id or args.file.stem.replace("_", "-"),
            version=args.version,
            task=args.task or args.file.stem.replace("_", "-"),
            labels=read_labels(args.labels) if args.labels else [],
            probe=ModelProbe(
                load_runtime(settings.inference.runtime),
                state_dir=state_dir,
                allowance_bytes=allowance_for(settings.limits.process_soft_limit_mb),
            ),
        )
        print(f"added {entry.id} {entry.version} to {models_dir / MANIFEST_NAME}", file=sys.stderr)
        print(format_entry(entry, None))
        return 0
    manager = ModelManager.for_limits(models_dir, settings.limits, settings.inference, state_dir=state_dir)
    refused = manager.verify_all()
    catalog = manager.catalog
    for entry in catalog.models.values():
        print(format_entry(entry, refused.get(entry.id)))
    for ensemble in catalog.ensembles.values():
        state = "serving" if ensemble.id in catalog.servable_ids else "REFUSED: a member is refused"
        members = ", ".join(member.model for member in ensemble.members)
        print(f"{ensemble.id} {ensemble.version} ({ensemble.task}, {ensemble.strategy} of {members}): {state}")
    if args.action == "check":
        print(f"{len(refused)} of {len(catalog.models)} models refused", file=sys.stderr)
        return 1 if refused else 0
    return 0


def format_entry(entry: ModelEntry, refused: str | None) -> str:
    """A model's manifest entry as the agent serves it (or why it refuses it), one tensor per line."""
    state = f"REFUSED: {refused}" if refused else "serving"
    lines = [f"{entry.id} {entry.version} ({entry.task}, {entry.file}): {state}"]
    for kind, specs in (("in ", entry.inputs), ("out", entry.outputs)):
        for spec in specs:
            quantized = f" scale {spec.quantization.scale:g} zero point {spec.quantization.zero_point}" if spec.quantization else ""
            lines.append(f"  {kind} {spec.name} {spec.shape} {spec.dtype}{quantized}")
    if entry.labels:
        lines.append(f"  labels: {', '.join(entry.labels)}")
    return "\n".join(lines)


def _read_input(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise AgentError(f"cannot read {name}: {exc.strerror}") from None


def _cmd_verify(args: argparse.Namespace) -> int:
    from cryptography import x509

    from agent.signing import request_sha256, verify_message

    try:
        certificates = [x509.load_pem_x509_certificate(_read_input(str(path))) for path in args.certificate]
    except ValueError as exc:
        raise AgentError(f"--certificate is not a PEM certificate: {exc}") from None
    expected_digest = request_sha256(_read_input(str(args.request))) if args.request else None
    try:
        verified = verify_message(
            _read_input(args.message),
            _read_input(str(args.pubkey)),
            expected_request_sha256=expected_digest,
            expected_device_id=args.device,
            certificates=certificates,
        )
    except SignatureInvalid as exc:
        print(f"edge-agent: invalid: {exc}", file=sys.stderr)
        return 1
    signed_at = datetime.fromtimestamp(verified.iat, UTC).isoformat().replace("+00:00", "Z")
    key = "a delegated key" if verified.mode == "delegated" else "the device key"
    if verified.binding is not None:
        kind = "error reply" if "error" in verified.message else "reply"
        what = (
            f"{kind} to request {json.dumps(verified.binding.get('request_id'))} of client "
            f"{verified.binding.get('client_id')} (request sha256 {verified.binding.get('request_sha256')})"
        )
    else:
        what = "record"
    source = f" from device {verified.device_id}" if verified.device_id else ""
    print(f"valid: {what}{source}, signed {signed_at} by {key}")
    return 0


def _parse_assignment(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise AgentError(f"expected name=value, got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def _broker_and_device(args: argparse.Namespace) -> tuple[LocalBroker, str]:
    from agent.config import LocalBroker, Settings
    from agent.config_loader import load_settings

    settings = load_settings(args.config) if args.config else None
    broker = settings.local if settings else LocalBroker()
    overrides = {key: value for key, value in (("host", args.host), ("port", args.port)) if value is not None}
    device = args.device or (settings.device_id if settings else Settings().device_id)
    return broker.model_copy(update=overrides), device


def _cmd_call(args: argparse.Namespace) -> int:
    from agent.tools.client import DeviceClient

    if args.json:
        source = sys.stdin if args.json == "-" else open(args.json, encoding="utf-8")
        request = json.load(source)
        method, params = request.get("method", "infer"), request.get("params")
    elif args.model:
        method = "infer"
        params = {"model": args.model, "inputs": dict(_parse_assignment(item) for item in args.inputs)}
    else:
        raise AgentError("give a MODEL with name=value inputs, or --json FILE")
    broker, device = _broker_and_device(args)
    with DeviceClient(broker, device) as client:
        reply = client.call(method, params, timeout=args.timeout)
    if args.json_out:
        print(json.dumps(reply))
    else:
        print(format_reply(reply))
    return 1 if "error" in reply else 0


def format_reply(reply: dict[str, Any]) -> str:
    """A human-readable rendering of one JSON-RPC reply."""
    if "error" in reply:
        error = reply["error"]
        return f"error {error.get('code')}: {error.get('message')}"
    result = reply.get("result", {})
    lines = []
    if "model" in result:
        lines.append(f"model {result['model']} {result.get('model_version', '')} (served by {result.get('served_by')})")
    for item in result.get("top", []):
        lines.append(f"  {item['label']:<16} {item['score']:.3f}")
    if "top" not in result:
        for name, value in result.get("outputs", {}).items():
            lines.append(f"  {name}: {json.dumps(value)[:200]}")
    if "timing_ms" in result:
        timing = result["timing_ms"]
        lines.append(f"  timing: queue {timing['queue']:.2f} ms, inference {timing['inference']:.2f} ms, total {timing['total']:.2f} ms")
    return "\n".join(lines) if lines else json.dumps(result, indent=2)


def _cmd_mcp_stdio(args: argparse.Namespace) -> int:
    # stdout is the MCP channel: everything else, logs included, goes to stderr.
    _setup_logging("INFO")
    try:
        from agent.tools.mcp_bridge import run_stdio_bridge
    except ImportError as exc:
        raise AgentError(f"mcp-stdio needs the MCP SDK ({exc}): pip install 'edge-agent[mcp]'") from None
    broker, device = _broker_and_device(args)
    run_stdio_bridge(broker, device, timeout=args.timeout)
    return 0


def _cmd_outbox(args: argparse.Namespace) -> int:
    from agent.config_loader import load_settings
    from agent.upstream.outbox import Outbox
    from agent.upstream.upstream import OUTBOX_FILE

    settings = load_settings(args.config)
    path = settings.data_dir / OUTBOX_FILE
    if not path.exists():
        raise AgentError(f"no outbox at {path} (local-only, or the agent never ran with this data_dir)")
    with Outbox(path, settings.outbox, read_only=True) as outbox:
        if args.action == "status":
            print(json.dumps(outbox.stats().model_dump(mode="json"), indent=2))
        else:
            for entry in outbox.peek(args.limit, cls=args.cls, state=args.state):
                print(json.dumps(entry.model_dump(mode="json")))
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from agent.config_loader import load_settings
    from agent.deploy.journal import JOURNAL_FILE, Journal

    settings = load_settings(args.config)
    journal = Journal(settings.data_dir / "deploy" / JOURNAL_FILE, read_only=True)
    try:
        print(json.dumps(journal.report(args.limit), indent=2))
    finally:
        journal.close()
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from agent.tools.demo import run_demo

    _setup_logging("WARNING")
    return run_demo()


def build_parser() -> argparse.ArgumentParser:
    from agent.config import MESSAGE_CLASSES

    parser = argparse.ArgumentParser(prog="edge-agent", description="TFLite inference over MQTT")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the agent")
    run.add_argument("--config", type=Path, help="TOML config file (defaults serve without one)")
    run.set_defaults(handler=_cmd_run)

    check = commands.add_parser("check-config", help="validate a config file and print the effective values")
    check.add_argument("--config", type=Path)
    check.set_defaults(handler=_cmd_check_config)

    identity = commands.add_parser("identity", help="create or show the device signing key and its CSR")
    identity.add_argument("action", choices=("init", "show"), help="init creates the key if there is none")
    identity.add_argument("--config", type=Path, help="TOML config file with the [signing] section")
    identity.set_defaults(handler=_cmd_identity)

    models = commands.add_parser("models", help="add a model file; list or check what the agent will serve")
    model_actions = models.add_subparsers(dest="action", required=True)
    add = model_actions.add_parser("add", help="read a .tflite file and write its entry into the models folder")
    add.add_argument("file", type=Path, help="the .tflite file")
    add.add_argument("--id", help="model id (default: the file name)")
    add.add_argument("--version", default="1", help="model version (default: 1)")
    add.add_argument("--task", help="task, for routing (default: the id)")
    add.add_argument("--labels", type=Path, help="a label file, one per line (replaces the model's metadata labels)")
    for action, summary in (("list", "print every model and what it is served as"), ("check", "as list; exit 1 if any is refused")):
        model_actions.add_parser(action, help=summary)
    for parser_ in model_actions.choices.values():
        parser_.add_argument("--config", type=Path, help="TOML config file (models_dir, [inference] runtime)")
        parser_.add_argument("--models-dir", type=Path, help="the writable models folder (default: models_dir of --config)")
    models.set_defaults(handler=_cmd_models)

    verify = commands.add_parser("verify", help="check a captured message's signature; exit 0 only if valid")
    verify.add_argument("message", help="the message as published (FILE, or - for stdin)")
    verify.add_argument("--pubkey", type=Path, required=True, help="the device public key (PEM or DER)")
    verify.add_argument(
        "--certificate", type=Path, action="append", default=[],
        help="a delegation certificate (PEM) for messages that name theirs by x5t#S256; repeatable",
    )  # fmt: skip
    verify.add_argument("--request", type=Path, help="the request as sent: a reply must answer exactly it")
    verify.add_argument("--device", help="the device id the message must come from")
    verify.set_defaults(handler=_cmd_verify)

    call = commands.add_parser("call", help="send one request to a device and print the answer")
    call.add_argument("model", nargs="?", help="model id")
    call.add_argument("inputs", nargs="*", help="input=JSON value, e.g. features='[[0.1, 0.2]]'")
    call.add_argument("--json", help="a JSON-RPC request (or its method/params) from FILE, or - for stdin")
    call.add_argument("--json-out", action="store_true", help="print the raw JSON reply")
    call.add_argument("--device", help="device id (default: from --config, else this host's)")
    call.add_argument("--config", type=Path, help="take broker and device from this config")
    call.add_argument("--host")
    call.add_argument("--port", type=int)
    call.add_argument("--timeout", type=float, default=30.0)
    call.set_defaults(handler=_cmd_call)

    outbox = commands.add_parser("outbox", help="inspect the durable outbox (safe while the agent runs)")
    outbox.add_argument("action", choices=["status", "peek"], help="status: depth, bytes, ages, drops; peek: rows")
    outbox.add_argument("--config", type=Path)
    outbox.add_argument("--limit", type=int, default=20, help="peek: how many rows")
    outbox.add_argument("--cls", choices=list(MESSAGE_CLASSES), help="peek: one class only")
    outbox.add_argument("--state", choices=["queued", "claimed", "dead"], help="peek: one state only")
    outbox.set_defaults(handler=_cmd_outbox)

    deploy = commands.add_parser("deploy", help="the deployment journal (safe while the agent runs)")
    deploy.add_argument("action", choices=["status"], help="status: recent deployments, their states and reasons")
    deploy.add_argument("--config", type=Path)
    deploy.add_argument("--limit", type=int, default=20, help="how many deployments")
    deploy.set_defaults(handler=_cmd_deploy)

    demo = commands.add_parser("demo", help="start a private broker and an agent, send example requests")
    demo.set_defaults(handler=_cmd_demo)

    bridge = commands.add_parser("mcp-stdio", help="serve a device's models as MCP tools on stdin/stdout")
    bridge.add_argument("--device", help="device id (default: from --config, else this host's)")
    bridge.add_argument("--config", type=Path, help="take broker and device from this config")
    bridge.add_argument("--host")
    bridge.add_argument("--port", type=int)
    bridge.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each device reply")
    bridge.set_defaults(handler=_cmd_mcp_stdio)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Importing and starting the agent creates tens of thousands of objects that live as long as the process
    # (modules, classes, pydantic schemas) and almost no cyclic garbage, yet the cyclic collector would walk
    # them again and again on the way (30-40 ms of CPU on x86, a tenth of the time to online), and all of them
    # once more at its first collection after. So `run` imports and starts with it off (_cmd_run turns it back
    # on); every other command gets it back as soon as its arguments are parsed.
    gc.disable()
    try:
        args = build_parser().parse_args(argv)
        if args.handler is not _cmd_run:
            gc.enable()
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    except AgentError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1
    finally:
        gc.enable()  # also after --help, an error, or in a process that called main() and goes on
