"""Bytes on the cloud link per inference response, with and without batching (metered links).

Run: ``python -m benchmarks.bench_uplink_bytes``. The records are real: the shipped vibration-anomaly model
answers an ``infer`` request through :class:`agent.serving.service.RequestService`, and :class:`agent.upstream.upstream.Upstream`
signs its upstream copy (software key, delegated mode) into a real outbox, which a real uplink drains to a
private mosquitto. The uplink connects through a byte-counting TCP proxy that also splits the stream into
MQTT packets, so the figures are measured MQTT bytes (fixed headers, topics, properties, payloads, PUBACKs,
CONNECT and pings), not estimates. Link bytes beyond MQTT are estimated from the measured packet sizes:
TLS 1.3 adds 22 bytes per record (a record per packet, or per 16 KiB of it) and IPv4+TCP with timestamps
52 per 1448-byte segment (no coalescing of packets assumed); cellular operators bill those too.

Two arrival patterns: ``backlog`` (responses stored while the cloud was unreachable, then drained, so
batches are full) and ``steady`` (responses arriving at ``STEADY_RATE`` per second with the default
``batch_linger_ms``, so a batch holds about one linger's worth of responses).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.config import BUNDLED_MODELS_DIR, CloudBroker, Limits, OutboxSettings, Settings, Signing
from agent.models.manager import ModelManager
from agent.mqtt.localbroker import MosquittoProcess, free_port
from agent.serving.protocol import Request, result_reply
from agent.serving.service import RequestService, Timing
from agent.signing.outgoing import encode_reply
from agent.signing.signer import Signer, create_signer
from agent.upstream.upstream import Upstream

DEVICE = "pump-station-7"
CLIENT = "line-3-plc"
BACKLOG_RESPONSES = 1000
STEADY_RATE = 50.0
STEADY_RESPONSES = 250
TLS_RECORD_OVERHEAD = 22
TLS_MAX_RECORD = 16384
TCP_IP_HEADERS = 52
TCP_SEGMENT = 1448
MODES: dict[str, dict[str, Any]] = {
    "single": {"batch": False},
    "batch": {"batch": True, "compression": "none"},
    "batch+zlib": {"batch": True, "compression": "zlib"},
}
CertificateHeader = Literal["x5c", "x5t#S256"]
HEADERS: tuple[CertificateHeader, ...] = ("x5c", "x5t#S256")
FEATURES = [0.5, 3.1, 6.2, 8.5, 0.2, 0.3, 0.5, 71.0]


class CountingProxy:
    """A TCP relay from a local port to ``target`` that counts bytes and MQTT packets in each direction."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.bytes = Counter[str]()
        self.packets: dict[str, list[int]] = {"up": [], "down": []}
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        pending = b""
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                pending = self._count(direction, pending + data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _count(self, direction: str, stream: bytes) -> bytes:
        """Record every complete MQTT packet at the start of ``stream``; return the incomplete rest."""
        while len(stream) >= 2:
            length, multiplier, index = 0, 1, 1
            while index < len(stream) and index <= 4:
                byte = stream[index]
                length += (byte & 0x7F) * multiplier
                multiplier *= 128
                index += 1
                if not byte & 0x80:
                    break
            else:
                return stream
            total = index + length
            if len(stream) < total:
                return stream
            with self._lock:
                self.bytes[direction] += total
                self.packets[direction].append(total)
            stream = stream[total:]
        return stream

    def reset(self) -> None:
        with self._lock:
            self.bytes.clear()
            self.packets = {"up": [], "down": []}

    def snapshot(self) -> tuple[Counter[str], dict[str, list[int]]]:
        with self._lock:
            return Counter(self.bytes), {k: list(v) for k, v in self.packets.items()}

    def close(self) -> None:
        self._server.close()


def link_bytes(packet_sizes: list[int]) -> int:
    """Estimated bytes on a TLS 1.3 over TCP/IPv4 link for these MQTT packets, each sent on its own."""
    total = 0
    for size in packet_sizes:
        tls = size + TLS_RECORD_OVERHEAD * math.ceil(size / TLS_MAX_RECORD)
        total += tls + TCP_IP_HEADERS * math.ceil(tls / TCP_SEGMENT)
    return total


class Responder:
    """Real ``infer`` replies of the vibration-anomaly model for slightly varying feature windows, signed and
    bound to their request as the agent publishes them (and stores their upstream copy)."""

    def __init__(self) -> None:
        self.models = ModelManager(BUNDLED_MODELS_DIR)
        self.service = RequestService(self.models, Limits(), device_id=DEVICE, profile="default")
        self._rng = np.random.default_rng(7)
        self._next_id = 1

    def reply(self, signer: Signer | None) -> bytes:
        features = [round(float(v * self._rng.uniform(0.9, 1.1)), 3) for v in FEATURES]
        message = {
            "jsonrpc": "2.0",
            "id": self._next_id,
            "method": "infer",
            "params": {"model": "vibration-anomaly", "inputs": {"features": [features]}},
        }
        self._next_id += 1
        request = Request.model_validate(message)
        now = time.monotonic()
        reply = result_reply(request.id, self.service.handle(request, Timing(received=now, started=now)))
        digest = hashlib.sha256(json.dumps(message).encode()).hexdigest()
        return encode_reply(reply, signer, client_id=CLIENT, request_sha256=digest)


def _settings(work: Path, cloud_port: int, mode: dict[str, Any], certificate_header: CertificateHeader) -> Settings:
    cloud = CloudBroker(host="127.0.0.1", port=cloud_port, reconnect_min_s=0.05, reconnect_max_s=0.2, **mode)
    signing = Signing(backend="software", key_file=work / "device-key.pem", certificate_header=certificate_header)
    return Settings(device_id=DEVICE, data_dir=work / "data", cloud=cloud, signing=signing, outbox=OutboxSettings())


@contextmanager
def _upstream(settings: Settings) -> Iterator[Upstream]:
    signer = create_signer(settings.signing, DEVICE, settings.data_dir)
    upstream = Upstream(settings, signer, lambda name: None)
    try:
        yield upstream
    finally:
        upstream.stop()
        if signer is not None:
            signer.close()


def _wait_drained(upstream: Upstream, expected: int) -> None:
    deadline = time.monotonic() + 120
    while upstream.uplink.stats().delivered < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {upstream.uplink.stats().delivered} of {expected} delivered")
        time.sleep(0.01)


def measure(
    work: Path,
    proxy: CountingProxy,
    responder: Responder,
    mode: str,
    pattern: str,
    certificate_header: CertificateHeader,
) -> dict[str, Any]:
    """One mode and arrival pattern: MQTT bytes and packets per response, both directions."""
    directory = work / f"{mode}-{pattern}-{certificate_header}".replace("#", "")
    directory.mkdir()
    settings = _settings(directory, proxy.port, MODES[mode], certificate_header)
    responses = BACKLOG_RESPONSES if pattern == "backlog" else STEADY_RESPONSES
    proxy.reset()
    with _upstream(settings) as upstream:
        record_bytes = None
        if pattern == "backlog":
            stored = threading.Semaphore(0)
            for _ in range(responses):
                upstream.store_reply(CLIENT, "infer", responder.reply(upstream.signer), stored.release)
            for _ in range(responses):
                stored.acquire()
            sizes = [entry.size for entry in upstream.outbox.peek(responses)]
            record_bytes = sum(sizes) / len(sizes)
            upstream.start()
        else:
            upstream.start()
            start = time.monotonic()
            for index in range(responses):
                time.sleep(max(0.0, start + index / STEADY_RATE - time.monotonic()))
                upstream.store_reply(CLIENT, "infer", responder.reply(upstream.signer), lambda: None)
        _wait_drained(upstream, responses)
        stats = upstream.uplink.stats()
    counted, packets = proxy.snapshot()
    return {
        "mode": mode,
        "pattern": pattern,
        "certificate_header": certificate_header,
        "responses": responses,
        "record_bytes": record_bytes,
        "publishes": stats.batches if stats.batches else stats.published,
        "up_mqtt_bytes_per_response": counted["up"] / responses,
        "down_mqtt_bytes_per_response": counted["down"] / responses,
        "up_packets_per_response": len(packets["up"]) / responses,
        "link_bytes_per_response": (link_bytes(packets["up"]) + link_bytes(packets["down"])) / responses,
    }


def run() -> dict[str, Any]:
    """Every mode, arrival pattern and certificate header; figures per response."""
    work = Path(tempfile.mkdtemp(prefix="bench-uplink-bytes-"))
    broker = MosquittoProcess(work / "cloud-broker", persistence=False).start()
    proxy = CountingProxy((broker.host, broker.port))
    responder = Responder()
    try:
        rows = [
            measure(work, proxy, responder, mode, pattern, header)
            for header in HEADERS
            for pattern in ("backlog", "steady")
            for mode in MODES
        ]
    finally:
        proxy.close()
        broker.close()
        shutil.rmtree(work, ignore_errors=True)
    defaults = CloudBroker(host="127.0.0.1")
    return {
        "batch_max_records": defaults.batch_max_records,
        "batch_linger_ms": defaults.batch_linger_ms,
        "steady_rate_per_s": STEADY_RATE,
        "rows": rows,
    }


def print_table(results: dict[str, Any]) -> None:
    print(
        f"bytes per vibration-anomaly response on the cloud link (batch_max_records={results['batch_max_records']}, "
        f"batch_linger_ms={results['batch_linger_ms']:g}, steady = {results['steady_rate_per_s']:g} responses/s)"
    )
    header = (
        f"{'signature':<10}{'arrival':<9}{'mode':<12}{'record B':>9}{'msgs':>6}{'MQTT up':>9}{'MQTT down':>10}"
        f"{'link est.':>10}{'vs single':>10}"
    )
    print(header)
    print("-" * len(header))
    single: dict[tuple[str, str], float] = {}
    record_bytes: dict[str, float] = {}
    for row in results["rows"]:
        if row["record_bytes"] is not None:
            record_bytes[row["certificate_header"]] = row["record_bytes"]
        key = (row["certificate_header"], row["pattern"])
        if row["mode"] == "single":
            single[key] = row["link_bytes_per_response"]
        ratio = row["link_bytes_per_response"] / single[key] if key in single else float("nan")
        print(
            f"{row['certificate_header']:<10}{row['pattern']:<9}{row['mode']:<12}"
            f"{record_bytes.get(row['certificate_header'], float('nan')):>9.0f}"
            f"{row['publishes']:>6}{row['up_mqtt_bytes_per_response']:>9.0f}{row['down_mqtt_bytes_per_response']:>10.1f}"
            f"{row['link_bytes_per_response']:>10.0f}{ratio:>9.0%} "
        )


if __name__ == "__main__":
    print_table(run())
