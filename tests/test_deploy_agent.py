"""Deployments end to end: real agent subprocesses, real local and cloud mosquitto, a file service on the cloud
broker, bundles and documents signed by the tests, the real activator swapping models in ``models_dir``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.models.devmodels import copy_bundled_models
from agent.mqtt.localbroker import MosquittoProcess, free_port
from agent.mqtt.transport import new_client
from tests.fixtures.agents import AgentProcess, Listener, agent_overrides, started_agents, write_config
from tests.fixtures.brokers import CloudSide
from tests.fixtures.deploy_bundles import MODEL_BYTES, Bundle, Publisher, build_bundle, deploy_section
from tests.fixtures.file_service import FileService

# The bundled model's bytes padded (TFLite ignores trailing bytes) so a bundle spans many chunks.
PADDED = MODEL_BYTES + bytes(200_000)
QUICK_PROBATION = {"requests": None, "seconds": 1.0}


@pytest.fixture
def publisher() -> Publisher:
    return Publisher()


@pytest.fixture
def files(cloud_broker: MosquittoProcess) -> Iterator[FileService]:
    service = FileService(cloud_broker)
    yield service
    service.close()


@pytest.fixture
def cloud(cloud_broker: MosquittoProcess) -> Iterator[CloudSide]:
    side = CloudSide(cloud_broker, "deploy-observer")
    assert side.wait_subscribed()
    yield side
    side.close()


class Operator:
    """Publishes retained documents on the cloud broker, as the operator's side would."""

    def __init__(self, broker: MosquittoProcess) -> None:
        self._client = new_client("operator")
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()

    def retain(self, topic: str, payload: bytes) -> None:
        self._client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def operator(cloud_broker: MosquittoProcess) -> Iterator[Operator]:
    side = Operator(cloud_broker)
    yield side
    side.close()


AgentFactory = Callable[..., AgentProcess]


@pytest.fixture
def agents(
    local_broker: MosquittoProcess, cloud_broker: MosquittoProcess, publisher: Publisher, tmp_path: Path
) -> Iterator[AgentFactory]:
    started: list[AgentProcess] = []

    def start(
        device_id: str = "dev1", restart_of: AgentProcess | None = None, metrics_port: int = 0, **deploy: Any
    ) -> AgentProcess:
        home = tmp_path / device_id
        if restart_of is None:
            copy_bundled_models(home / "models")
        values = agent_overrides(
            local_broker, home / "models", home / "data", device_id=device_id,
            cloud={"host": cloud_broker.host, "port": cloud_broker.port, "reconnect_min_s": 0.05,
                   "reconnect_max_s": 0.5},
            deploy=deploy_section(publisher, chunk_timeout_s=1.0, **deploy), models_poll_s=0.2,
            outbox={"reserve_bytes": 0}, metrics={"port": metrics_port},
        )  # fmt: skip
        process = AgentProcess(write_config(home / "agent.toml", values), local_broker, device_id).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def deploy_records(records: list[dict[str, Any]], device_id: str = "dev1") -> list[dict[str, Any]]:
    """The bodies of the ``deploy`` records a device sent upstream (each a signed record in its envelope)."""
    return [r["body"] for r in records if r.get("class") == "deploy" and r.get("device_id") == device_id]


def wait_state(cloud: CloudSide, deployment_id: str, state: str, device_id: str = "dev1", timeout: float = 60) -> None:
    reached = cloud.wait_for(
        lambda records: any(
            r.get("deployment_id") == deployment_id and r.get("state") == state
            for r in deploy_records(records, device_id)
        ),
        timeout,
    )
    seen = [(r.get("deployment_id"), r.get("state"), r.get("reason")) for r in deploy_records(cloud.records, device_id)]
    assert reached, f"{deployment_id} never reported {state}; got {seen}"


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def deploy_status(process: AgentProcess) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "deploy", "status", "--config", str(process.config_path)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(result.stdout)


def retained_deployments(local_broker: MosquittoProcess, device_id: str = "dev1") -> dict[str, Any]:
    """The ``deployments`` member of the device's retained status."""
    listener = Listener(local_broker, f"mcp/status/{device_id}")
    try:
        listener.wait_for(lambda messages: bool(messages), 10)
        document = json.loads(listener.messages[-1].payload)
    finally:
        listener.close()
    return dict(document.get("deployments", {}))


def served_version(local_broker: MosquittoProcess, device_id: str = "dev1") -> str | None:
    return retained_deployments(local_broker, device_id).get("versions", {}).get("vibration-anomaly")


def test_a_signed_deployment_is_fetched_activated_and_reported(
    agents: AgentFactory, operator: Operator, files: FileService, cloud: CloudSide, publisher: Publisher,
    local_broker: MosquittoProcess,
) -> None:  # fmt: skip
    bundle = build_bundle(publisher.release, data=PADDED, chunk_size=32_768)
    files.add(bundle)
    port = free_port()
    agent = agents(metrics_port=port)
    operator.retain("mcp/deploy/device/dev1", publisher.deployment(bundle, deployment_id="d1", probation=QUICK_PROBATION))
    wait_state(cloud, "d1", "active")
    states = [r["state"] for r in deploy_records(cloud.records) if r.get("deployment_id") == "d1"]
    assert states[:7] == ["received", "verified", "downloading", "staged", "activating", "probation", "active"]
    status = deploy_status(agent)
    assert status["active"] == {"vibration-anomaly": "2.0.0"} and status["in_progress"] == []
    assert [t["state"] for t in status["deployments"][0]["history"]][-1] == "active"
    assert served_version(local_broker) == "2.0.0"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'edge_agent_model_version{model="vibration-anomaly",version="2.0.0"} 1.0' in metrics
    assert "edge_agent_deploy_chunks_total 7.0" in metrics and "edge_agent_deployment_in_progress{" not in metrics
    # Refusals are reported too: an older sequence replayed, a bad signature.
    operator.retain("mcp/deploy/device/dev1", publisher.deployment(bundle, deployment_id="d0", sequence=0))
    forged = Publisher().deployment(bundle, deployment_id="d9", sequence=99)
    operator.retain("mcp/deploy/group/none", b"")  # not subscribed: nothing
    operator.retain("mcp/deploy/device/dev1", forged)
    assert cloud.wait_for(lambda records: sum(r.get("event") == "refused" for r in deploy_records(records)) >= 2, 30)
    reasons = [r["reason"] for r in deploy_records(cloud.records) if r.get("event") == "refused"]
    assert any("replayed or older" in reason for reason in reasons) and any("not trusted" in reason for reason in reasons)
    # A bundle whose reference outputs do not match is refused before activation; 2.0.0 goes on serving.
    wrong = {"inputs": {"features": [[0.2, 0.62, 3.1, 3.0, 0.5, 0.35, 0.15, 41.0]]},
             "expected": {"probabilities": [[0.0, 0.0, 1.0]]}, "tolerance": 1e-6}  # fmt: skip
    mismatched = build_bundle(publisher.release, version="3.0.0", data=PADDED, chunk_size=65_536, references=[wrong])
    files.add(mismatched)
    operator.retain("mcp/deploy/device/dev1", publisher.deployment(mismatched, deployment_id="dr", sequence=100))
    wait_state(cloud, "dr", "failed")
    [failure] = [r for r in deploy_records(cloud.records) if r.get("deployment_id") == "dr" and r.get("state") == "failed"]
    assert "refused before activation" in failure["reason"] and "probabilities" in failure["reason"]
    assert served_version(local_broker) == "2.0.0"


@pytest.mark.parametrize("state", ["downloading", "staged", "probation"])
def test_kill_9_in_a_state_then_restart_completes(
    state: str, agents: AgentFactory, operator: Operator, files: FileService, cloud: CloudSide,
    publisher: Publisher, local_broker: MosquittoProcess,
) -> None:  # fmt: skip
    bundle = build_bundle(publisher.release, data=PADDED, chunk_size=8192)
    files.add(bundle)
    hold: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    probation = QUICK_PROBATION
    if state == "downloading":
        files.pause_after = 5  # the file service goes quiet after 5 chunks
    elif state == "staged":
        hold = {"activation": "maintenance_window"}
        extra = {"maintenance_window": _window_not_now()}
    else:
        probation = {"requests": None, "seconds": 3.0}
    agent = agents(**extra)
    operator.retain("mcp/deploy/device/dev1",
                    publisher.deployment(bundle, deployment_id="dk", probation=probation, **hold))  # fmt: skip
    wait_state(cloud, "dk", state)
    if state == "downloading":
        wait_until(lambda: files.served >= 5)
    if state == "staged":  # waiting for its window: the status, /metrics and the journal say so
        assert deploy_status(agent)["in_progress"] == ["dk"]
        wait_until(lambda: (retained_deployments(local_broker).get("in_progress") or {}).get("state") == "staged")
    agent.signal(signal.SIGKILL)
    agent.wait()
    files.pause_after = None
    agents(restart_of=agent)  # without the window: a staged deployment activates now
    wait_state(cloud, "dk", "active")
    if state == "downloading":
        assert files.served < len(bundle.manifest.files[0].chunks) + 5 + 8  # resumed, not restarted


def test_a_cloud_outage_mid_transfer_resumes(
    agents: AgentFactory, operator: Operator, files: FileService, cloud: CloudSide, publisher: Publisher,
    cloud_broker: MosquittoProcess,
) -> None:  # fmt: skip
    bundle = build_bundle(publisher.release, data=PADDED, chunk_size=8192)
    files.add(bundle)
    files.pause_after = 6
    agents()
    operator.retain("mcp/deploy/device/dev1", publisher.deployment(bundle, deployment_id="do", probation=QUICK_PROBATION))
    wait_state(cloud, "do", "downloading")
    wait_until(lambda: files.served >= 6)
    cloud_broker.stop()
    time.sleep(1.0)
    files.pause_after = None
    cloud_broker.start()
    wait_state(cloud, "do", "active")


def test_a_newer_document_mid_download_supersedes_it(
    agents: AgentFactory, operator: Operator, files: FileService, cloud: CloudSide, publisher: Publisher,
    local_broker: MosquittoProcess,
) -> None:  # fmt: skip
    first = build_bundle(publisher.release, data=PADDED, chunk_size=8192)
    newer = build_bundle(publisher.release, version="3.0.0", data=PADDED + b"\0", chunk_size=8192)
    files.add(first)
    files.add(newer)
    files.pause_after = 4
    agents()
    operator.retain("mcp/deploy/device/dev1", publisher.deployment(first, deployment_id="d1", probation=QUICK_PROBATION))
    wait_state(cloud, "d1", "downloading")
    wait_until(lambda: files.served >= 4)
    files.pause_after = None
    operator.retain("mcp/deploy/group/line-3", b"")  # noise on a topic the device does not follow
    operator.retain("mcp/deploy/device/dev1", publisher.deployment(newer, deployment_id="d2", probation=QUICK_PROBATION))
    wait_state(cloud, "d1", "superseded")
    wait_state(cloud, "d2", "active")
    assert served_version(local_broker) == "3.0.0"


def test_three_agents_take_the_same_group_deployment(
    agents: AgentFactory, operator: Operator, files: FileService, cloud: CloudSide, publisher: Publisher
) -> None:
    bundle = build_bundle(publisher.release, data=PADDED, chunk_size=32_768)
    files.add(bundle)
    for device_id in ("pi-1", "pi-2", "pi-3"):
        agents(device_id, groups=["line-3"])
    operator.retain("mcp/deploy/group/line-3",
                    publisher.deployment(bundle, group="line-3", deployment_id="dg", probation=QUICK_PROBATION))  # fmt: skip
    for device_id in ("pi-1", "pi-2", "pi-3"):
        wait_state(cloud, "dg", "active", device_id)


def _window_not_now() -> str:
    hour = (time.localtime().tm_hour + 12) % 24
    return f"{hour:02d}:00-{hour:02d}:30"


def test_an_unusable_release_key_turns_deployments_off_not_the_agent(
    local_broker: MosquittoProcess, cloud_broker: MosquittoProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = copy_bundled_models(tmp_path / "models")
    cloud = {"host": cloud_broker.host, "port": cloud_broker.port}
    with started_agents(local_broker, models, tmp_path / "data") as start:
        agent = start(cloud=cloud, deploy={"trusted_keys": ["-----BEGIN PUBLIC KEY-----\nnot a key\n"]})
        assert agent.deployments is None and "vibration-anomaly" in agent.models.servable_ids
    assert "deployments are off: unusable deployment key" in caplog.text
