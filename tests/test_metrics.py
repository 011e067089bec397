"""/metrics over real HTTP with a real outbox and uplink behind it; the health part of the status."""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import CloudBroker, OutboxSettings
from agent.errors import AgentError
from agent.mqtt.localbroker import MosquittoProcess
from agent.observe.health import Probes, collect_health, read_process_memory
from agent.observe.memory import MB
from agent.observe.metrics import AgentMetrics, MetricsServer
from agent.upstream.outbox import Outbox
from agent.upstream.uplink import Uplink

MODELS = {"mobilenet", "iris"}
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    store = Outbox(tmp_path / "outbox.db", OutboxSettings(max_messages=2))
    yield store
    store.close()


def build_metrics(probes: Probes) -> AgentMetrics:
    return AgentMetrics(
        probes,
        methods={"infer", "models/list"},
        models=lambda: MODELS,
        signing_backend="software",
        signing_mode="delegated",
        version="0.1.0",
        runtime="ai-edge-litert",
        profile="rpi5",
    )


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_scrape_reports_requests_latency_rejections_outbox_and_process(outbox: Outbox) -> None:
    for n in range(3):
        outbox.enqueue("telemetry", b'{"n": %d}' % n)  # the third evicts the first: max_messages=2
    probes = Probes(
        started=time.monotonic(), intake_depth=lambda: 5, intake_bytes=lambda: 4096, expected_wait_s=lambda: 0.25,
        outbox_stats=outbox.stats,
    )
    metrics = build_metrics(probes)
    metrics.observe_request(method="infer", model="iris", outcome="ok", queue_s=0.0002, inference_s=0.003, total_s=0.004)
    metrics.observe_request(method="infer", model="no-such-model", outcome="invalid_params", total_s=0.001)
    metrics.observe_request(method="made-up/by-client", model=None, outcome="method_not_found", total_s=0.001)
    metrics.count_rejection("rate_limited_client")
    metrics.count_rejection("rate_limited_client")
    metrics.model_loaded("iris")
    server = MetricsServer(metrics.registry, "127.0.0.1", 0)
    server.start()
    try:
        samples = scrape(server.port)
    finally:
        server.stop()

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("edge_agent_requests_total", method="infer", model="iris", outcome="ok") == 1
    assert value("edge_agent_requests_total", method="infer", model="other", outcome="invalid_params") == 1
    assert value("edge_agent_requests_total", method="other", model="none", outcome="method_not_found") == 1
    assert value("edge_agent_request_duration_seconds_count", stage="total") == 3
    assert value("edge_agent_request_duration_seconds_count", stage="queue") == 1
    assert value("edge_agent_request_duration_seconds_bucket", stage="inference", le="0.0025") == 0
    assert value("edge_agent_request_duration_seconds_bucket", stage="inference", le="0.005") == 1
    assert value("edge_agent_requests_rejected_total", reason="rate_limited_client") == 2
    assert value("edge_agent_requests_rejected_total", reason="buffer_full") == 0
    assert value("edge_agent_model_loads_total", model="iris") == 1
    assert value("edge_agent_intake_depth") == 5
    assert value("edge_agent_intake_bytes") == 4096 and value("edge_agent_intake_expected_wait_seconds") == 0.25
    assert value("edge_agent_outbox_messages") == 2
    assert value("edge_agent_outbox_bytes") == len(b'{"n": 1}') * 2
    assert value("edge_agent_outbox_dropped_total", reason="capacity", cls="telemetry") == 1
    assert value("edge_agent_outbox_oldest_age_seconds") >= 0
    assert value("edge_agent_signing_info", backend="software", mode="delegated") == 1
    assert value("edge_agent_build_info", version="0.1.0", runtime="ai-edge-litert", profile="rpi5") == 1
    assert value("edge_agent_process_peak_resident_memory_bytes") > 0
    assert value("process_resident_memory_bytes") > 0
    assert not any(name.startswith("edge_agent_cloud") for name, _ in samples)


def test_cloud_link_state_follows_a_real_uplink(outbox: Outbox, cloud_broker: MosquittoProcess) -> None:
    cloud = CloudBroker(host=cloud_broker.host, port=cloud_broker.port, reconnect_min_s=0.05, reconnect_max_s=0.3)
    uplink = Uplink(outbox, cloud, "dev1")
    metrics = build_metrics(Probes(started=time.monotonic(), intake_depth=lambda: 0, cloud_state=lambda: uplink.state))
    server = MetricsServer(metrics.registry, "127.0.0.1", 0)
    server.start()
    try:
        state = {labels[0][1]: v for (name, labels), v in scrape(server.port).items() if name == "edge_agent_cloud_link_state"}
        assert state == {"connected": 0, "disconnected": 1, "backoff": 0}
        uplink.start()
        try:
            deadline = time.monotonic() + 30
            while uplink.state != "connected":
                assert time.monotonic() < deadline, "uplink never connected"
                time.sleep(0.02)
            samples = scrape(server.port)
            assert samples[("edge_agent_cloud_link_state", (("state", "connected"),))] == 1
        finally:
            uplink.stop()
    finally:
        server.stop()


def test_stopped_server_refuses_connections_and_a_taken_port_is_an_agent_error() -> None:
    metrics = build_metrics(Probes(started=time.monotonic(), intake_depth=lambda: 0))
    server = MetricsServer(metrics.registry, "127.0.0.1", 0)
    server.start()
    port = server.port
    second = MetricsServer(metrics.registry, "127.0.0.1", port)
    with pytest.raises(AgentError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
        second.start()
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    server.stop()  # stopping twice is harmless


def test_health_reads_uptime_load_memory_outbox_and_cloud(outbox: Outbox) -> None:
    outbox.enqueue("audit", b'{"kind": "rate_limited"}')
    started = time.monotonic() - 12.5
    health = collect_health(
        Probes(started=started, intake_depth=lambda: 3, outbox_stats=outbox.stats, cloud_state=lambda: "backoff")
    )
    assert health.uptime_s >= 12.5
    assert len(health.load_average) == 3 and all(load >= 0 for load in health.load_average)
    assert health.memory is not None and 0 < health.memory.rss_bytes <= health.memory.peak_rss_bytes
    assert health.intake_depth == 3
    assert health.outbox is not None and (health.outbox.messages, health.outbox.dead) == (1, 0)
    assert health.cloud == "backoff"
    document = health.model_dump(mode="json")
    assert set(document) == {"uptime_s", "load_average", "memory", "intake_depth", "outbox", "cloud"}


def test_health_without_cloud_or_with_a_closed_outbox_leaves_those_out(tmp_path: Path) -> None:
    closed = Outbox(tmp_path / "closed.db")
    closed.close()
    health = collect_health(Probes(started=time.monotonic(), intake_depth=lambda: 0, outbox_stats=closed.stats))
    assert health.outbox is None and health.cloud is None


def test_process_memory_comes_from_proc(tmp_path: Path) -> None:
    proc_self = tmp_path / "self"
    proc_self.mkdir()
    (proc_self / "statm").write_text(f"5000 {4 * MB // PAGE_SIZE} 300 10 0 900 0\n")
    (proc_self / "status").write_text("Name:\tpython\nVmHWM:\t  8192 kB\nVmRSS:\t  4096 kB\nThreads:\t4\n")
    memory = read_process_memory(proc_self)
    assert memory is not None and (memory.rss_bytes, memory.peak_rss_bytes) == (4 * MB, 8 * MB)
    (proc_self / "status").write_text("Name:\tkthread\n")
    assert read_process_memory(proc_self) is None
    assert read_process_memory(tmp_path / "absent") is None


def test_idle_connections_beyond_the_cap_are_closed_and_idle_ones_time_out() -> None:
    metrics = build_metrics(Probes(started=time.monotonic(), intake_depth=lambda: 0))
    server = MetricsServer(metrics.registry, "127.0.0.1", 0, max_connections=4, timeout_s=0.5)
    server.start()
    idle: list[socket.socket] = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
        # Every connection is eventually closed by the server: the 296 beyond the cap on accept, the 4 it
        # served once they stayed silent for the timeout. recv() returns b"" (EOF) on a closed connection.
        for conn in idle:
            assert conn.recv(1) == b""
        assert ("edge_agent_intake_depth", ()) in scrape(server.port)
    finally:
        for conn in idle:
            conn.close()
        server.stop()
