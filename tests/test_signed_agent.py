"""The running agent signs everything it publishes: replies (errors too), status, the will; and the CLI checks it.

Real mosquitto, real swtpm, the real ``edge-agent`` CLI in subprocesses. Messages are captured raw off the
broker, so what is verified is exactly what a subscriber receives.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent.app import Agent
from agent.config import BUNDLED_MODELS_DIR, ENV_PREFIX, LocalBroker
from agent.errors import SignatureInvalid
from agent.mqtt import topics
from agent.mqtt.localbroker import MosquittoProcess
from agent.signing import public_key_pem, verify_message
from agent.signing.swtpm import SwtpmProcess, free_port_pair
from agent.tools.client import DeviceClient
from tests.fixtures.agents import (
    REPO_ROOT,
    AgentProcess,
    Listener,
    agent_overrides,
    write_config,
)

VIBRATION = json.loads((BUNDLED_MODELS_DIR / "manifest.json").read_text())["models"][0]["examples"][0]["inputs"]
PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----\n.*?\n-----END \1-----", re.DOTALL)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _request(request_id: Any, method: str, params: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        body["params"] = params
    return json.dumps(body).encode()


def _ask(client: DeviceClient, replies: Listener, payload: bytes) -> bytes:
    """Publish one raw request and return the raw payload of the reply the broker delivered."""
    seen = len(replies.messages)
    client.publish_raw(payload)
    assert replies.wait_for(lambda msgs: len(msgs) > seen), "no reply"
    return replies.messages[seen].payload


def _latest(listener: Listener, topic: str) -> bytes:
    return [m.payload for m in listener.messages if m.topic == topic][-1]


def _cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    done = subprocess.run(
        [sys.executable, "-m", "agent", *args], cwd=REPO_ROOT, env=env, input=stdin, capture_output=True, timeout=120
    )
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def _write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def _device_pem(agent: Agent, tmp_path: Path) -> str:
    assert agent.signer is not None
    return _write(tmp_path / "device.pem", public_key_pem(agent.signer.public_key))


def _config(tmp_path: Path, broker: MosquittoProcess, models_dir: Path, **signing: Any) -> Path:
    return write_config(tmp_path / "agent.toml", agent_overrides(broker, models_dir, tmp_path / "data", signing=signing))


def test_replies_errors_and_status_verify_with_the_device_key(
    swtpm: SwtpmProcess,
    start_agent: Callable[..., Agent],
    client_factory: Callable[..., DeviceClient],
    local_broker: MosquittoProcess,
    tmp_path: Path,
) -> None:
    agent = start_agent(signing={"backend": "tpm", "tcti": swtpm.tcti}, limits={"max_payload_bytes": 4096})
    pem_file = _device_pem(agent, tmp_path)
    device_pem = Path(pem_file).read_bytes()
    client = client_factory("alice")
    replies = Listener(local_broker, "mcp/res/dev1/#")
    status = Listener(local_broker, topics.status_topic("dev1"))
    try:
        requests = {
            "result": _request(7, "infer", {"model": "vibration-anomaly", "inputs": VIBRATION}),
            "error": _request("e-1", "no/such/method"),
            "oversized": _request("big", "ping", {"pad": "x" * 5000}),
        }
        captured = {kind: _ask(client, replies, request) for kind, request in requests.items()}
        assert status.wait_for(lambda msgs: bool(msgs))
        online = _latest(status, topics.status_topic("dev1"))
    finally:
        replies.close()

    expected_ids = {"result": 7, "error": "e-1", "oversized": None}
    for kind, raw in captured.items():
        verified = verify_message(
            raw, device_pem, expected_request_sha256=_sha256(requests[kind]), expected_device_id="dev1"
        )
        assert verified.mode == "delegated" and verified.certificate is not None
        reply = json.loads(raw)
        holder = reply["result"]["_meta"] if kind == "result" else reply["error"]["data"]
        assert {key: holder[key] for key in ("device_id", "client_id", "request_id", "request_sha256", "iat")} == {
            "device_id": "dev1",
            "client_id": "alice",
            "request_id": expected_ids[kind],
            "request_sha256": _sha256(requests[kind]),
            "iat": verified.iat,
        }
        assert reply["id"] == expected_ids[kind]
    assert json.loads(captured["error"])["error"]["code"] == -32601
    assert json.loads(captured["oversized"])["error"]["code"] == -32600
    assert set(json.loads(captured["result"])["result"]["_meta"]) == {
        "device_id", "client_id", "request_id", "request_sha256", "iat", "sig"
    }  # fmt: skip
    assert json.loads(online)["status"] == "online" and "sig" in json.loads(online)
    assert verify_message(online, device_pem).binding is None

    # The CLI agrees, on files and on stdin, and names the request a reply answers.
    for kind, raw in captured.items():
        request_file = _write(tmp_path / f"{kind}.request", requests[kind])
        done = _cli("verify", "--pubkey", pem_file, "--request", request_file, _write(tmp_path / f"{kind}.json", raw))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("valid: ") and "from device dev1" in done.stdout
        assert f"sha256 {_sha256(requests[kind])}" in done.stdout
    done = _cli("verify", "--pubkey", pem_file, "-", stdin=online)
    assert done.returncode == 0 and done.stdout.startswith("valid: record from device dev1"), done.stderr

    # One byte changed, another request, or no signature at all: refused, with the reason.
    tampered = captured["result"].replace(b"vibration-anomaly", b"vibration-anomalx", 1)
    assert tampered != captured["result"]
    refusals = {
        "bad_signature": ("verify", "--pubkey", pem_file, _write(tmp_path / "tampered.json", tampered)),
        "request_mismatch": (
            "verify", "--pubkey", pem_file, "--request", str(tmp_path / "error.request"), str(tmp_path / "result.json")
        ),
        "unsigned": ("verify", "--pubkey", pem_file, _write(tmp_path / "unsigned.json", b'{"status":"online"}')),
    }  # fmt: skip
    for reason, args in refusals.items():
        done = _cli(*args)
        assert done.returncode != 0 and f"invalid: {reason}" in done.stderr, (reason, done.stderr)

    # A clean stop publishes a signed offline status.
    agent.stop()
    try:
        assert status.wait_for(lambda msgs: json.loads(msgs[-1].payload)["status"] == "offline")
        offline = _latest(status, topics.status_topic("dev1"))
    finally:
        status.close()
    assert verify_message(offline, device_pem).iat >= verify_message(online, device_pem).iat


def test_strict_mode_signs_each_message_in_the_tpm_and_never_answers_unsigned(
    swtpm: SwtpmProcess,
    start_agent: Callable[..., Agent],
    client_factory: Callable[..., DeviceClient],
    local_broker: MosquittoProcess,
    tmp_path: Path,
) -> None:
    agent = start_agent(signing={"backend": "tpm", "tcti": swtpm.tcti, "mode": "strict", "tpm_timeout_s": 2.0})
    assert agent.signer is not None
    device_pem = Path(_device_pem(agent, tmp_path)).read_bytes()
    client = client_factory("alice")
    replies = Listener(local_broker, "mcp/res/dev1/#")
    status = Listener(local_broker, topics.status_topic("dev1"))
    try:
        operations = agent.signer.root.operations
        for index in range(3):
            request = _request(index, "ping")
            reply = _ask(client, replies, request)
            verified = verify_message(reply, device_pem, expected_request_sha256=_sha256(request))
            assert verified.mode == "strict" and verified.certificate is None
        assert agent.signer.root.operations - operations >= 3
        # A TPM operation per reply is too slow for the network thread: a cheap ping still goes to a worker.
        assert agent.counters["served_inline"] == 0

        # The TPM goes away: the request is acknowledged without an answer rather than answered unsigned.
        swtpm.kill()
        seen = len(replies.messages)
        client.publish_raw(_request("lost", "ping"))
        assert _eventually(lambda: agent.counters["signing_failed"] == 1)
    finally:
        replies.close()
    assert len(replies.messages) == seen
    # Nor can it sign the offline status at the stop: the will, signed by the device key at start, stands in.
    agent.stop()
    try:
        assert status.wait_for(lambda msgs: json.loads(msgs[-1].payload)["status"] == "offline")
        offline = _latest(status, topics.status_topic("dev1"))
    finally:
        status.close()
    assert verify_message(offline, device_pem).mode == "strict"


def _eventually(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_certificate_by_reference_is_retained_and_follows_each_rotation(
    start_agent: Callable[..., Agent],
    client_factory: Callable[..., DeviceClient],
    local_broker: MosquittoProcess,
    tmp_path: Path,
) -> None:
    signing = {"backend": "software", "key_file": str(tmp_path / "key.pem"), "certificate_header": "x5t#S256"}
    agent = start_agent(signing=signing)
    assert agent.signer is not None
    device_pem = _device_pem(agent, tmp_path)
    identity_topic, status_topic = topics.identity_topic("dev1"), topics.status_topic("dev1")
    published = Listener(local_broker, identity_topic, status_topic)
    replies = Listener(local_broker, "mcp/res/dev1/#")
    try:
        assert published.wait_for(lambda msgs: {m.topic for m in msgs} == {identity_topic, status_topic})
        first = x509.load_pem_x509_certificate(_latest(published, identity_topic))
        request = _request(1, "ping")
        reply = _ask(client_factory("alice"), replies, request)
        with pytest.raises(SignatureInvalid) as refused:
            verify_message(reply, Path(device_pem).read_bytes())
        assert refused.value.reason == "certificate_invalid"
        assert verify_message(reply, Path(device_pem).read_bytes(), certificates=[first]).certificate == first
        certificate_file = _write(tmp_path / "cert.pem", _latest(published, identity_topic))
        reply_file = _write(tmp_path / "reply.json", reply)
        done = _cli("verify", "--pubkey", device_pem, "--certificate", certificate_file, reply_file)
        assert done.returncode == 0 and done.stdout.startswith("valid: reply to request 1 of client alice"), done.stderr

        # After a rotation the retained certificate and status are replaced together; the status verifies
        # with the new certificate.
        count = len(published.messages)
        second = agent.signer.rotate()  # type: ignore[attr-defined]
        assert published.wait_for(lambda msgs: {m.topic for m in msgs[count:]} == {identity_topic, status_topic})
        assert x509.load_pem_x509_certificate(_latest(published, identity_topic)) == second != first
        status = _latest(published, status_topic)
        assert verify_message(status, Path(device_pem).read_bytes(), certificates=[second]).certificate == second
    finally:
        published.close()
        replies.close()


def test_software_backend_warns_and_the_will_verifies_after_kill_9(
    local_broker: MosquittoProcess, models_dir: Path, tmp_path: Path
) -> None:
    key_file = tmp_path / "key.pem"
    config = _config(tmp_path, local_broker, models_dir, backend="software", key_file=str(key_file))
    agent = AgentProcess(config, local_broker).start()
    status = Listener(local_broker, topics.status_topic("dev1"))
    try:
        shown = _cli("identity", "show", "--config", str(config))
        assert shown.returncode == 0, shown.stderr
        device_pem = PEM_BLOCK.search(shown.stdout)
        assert device_pem is not None and device_pem.group(1) == "PUBLIC KEY"
        assert status.wait_for(lambda msgs: bool(msgs))
        online = verify_message(_latest(status, topics.status_topic("dev1")), device_pem.group(0))
        agent.signal(signal.SIGKILL)
        agent.wait(10)
        assert status.wait_for(lambda msgs: json.loads(msgs[-1].payload)["status"] == "offline", timeout=20)
        will = verify_message(_latest(status, topics.status_topic("dev1")), device_pem.group(0))
    finally:
        status.close()
        agent.stop()
    # The will is signed by the device key itself when the agent starts, not by a delegated key.
    assert online.mode == "delegated" and will.mode == "strict" and will.iat <= online.iat + 5
    assert "development only" in agent.log_path.read_text()


def test_an_unreachable_tpm_stops_the_agent_before_it_comes_online(
    local_broker: MosquittoProcess, models_dir: Path, tmp_path: Path
) -> None:
    closed = f"swtpm:host=127.0.0.1,port={free_port_pair()}"  # nothing listens there
    config = _config(tmp_path, local_broker, models_dir, backend="tpm", tcti=closed, tpm_timeout_s=2.0)
    marker_topic = topics.request_topic("dev1", "marker")
    watched = Listener(local_broker, topics.status_topic("dev1"), marker_topic)
    try:
        done = _cli("run", "--config", str(config))
        assert done.returncode != 0
        assert "edge-agent: signing backend 'tpm' is unusable, not starting" in done.stderr, done.stderr
        # Anything the agent had published reached the broker before it exited, so before this marker.
        with DeviceClient(LocalBroker(host=local_broker.host, port=local_broker.port), "dev1", "marker") as marker:
            marker.publish_raw(b"{}").wait_for_publish(10)
        assert watched.wait_for(lambda msgs: any(m.topic == marker_topic for m in msgs))
        assert [m.topic for m in watched.messages] == [marker_topic]
    finally:
        watched.close()


def test_identity_init_then_show_print_the_same_key_and_check_config_names_sources(
    swtpm: SwtpmProcess, local_broker: MosquittoProcess, models_dir: Path, tmp_path: Path
) -> None:
    config = _config(tmp_path, local_broker, models_dir, backend="tpm", tcti=swtpm.tcti, owner_auth="")
    created = _cli("identity", "init", "--config", str(config))
    assert created.returncode == 0, created.stderr
    shown = _cli("identity", "show", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    created_blocks = [(m.group(1), m.group(0)) for m in PEM_BLOCK.finditer(created.stdout)]
    shown_blocks = [(m.group(1), m.group(0)) for m in PEM_BLOCK.finditer(shown.stdout)]
    kinds = ["PUBLIC KEY", "CERTIFICATE REQUEST"]
    assert [kind for kind, _ in created_blocks] == [kind for kind, _ in shown_blocks] == kinds
    assert created_blocks[0] == shown_blocks[0]
    assert "created tpm key" in created.stderr and "existing tpm key" in shown.stderr

    secret = _config(tmp_path, local_broker, models_dir, backend="tpm", tcti=swtpm.tcti, owner_auth="s3cret")
    described = _cli("check-config", "--config", str(secret))
    assert described.returncode == 0, described.stderr
    rows = {line.split()[0]: line.split()[1:] for line in described.stdout.splitlines()[2:] if line.strip()}
    assert rows["signing.backend"] == ['"tpm"', str(secret)]
    assert rows["signing.owner_auth"] == ["<redacted>", str(secret)] and "s3cret" not in described.stdout
    assert rows["signing.mode"] == ['"delegated"', "built-in", "default"]
