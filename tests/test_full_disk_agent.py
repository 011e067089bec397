"""Issue #12, the disk cases, with the real agent as a subprocess, its data_dir on a real 8 MiB tmpfs and a real
cloud broker: a full disk at start or during a run never stops local answers, the outbox recovers by itself
once space returns, and every row it had stored reaches the cloud. An outbox damaged where SQLite says
nothing (a zero-length file, a garbage -wal) is a corruption event, and what could be salvaged is sent."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config import BUNDLED_MODELS_DIR
from agent.mqtt.localbroker import MosquittoProcess, free_port
from agent.tools.client import DeviceClient
from agent.upstream.outbox import Outbox
from tests.fixtures.agents import AgentProcess, agent_overrides, write_config
from tests.fixtures.disks import fill_disk
from tests.fixtures.brokers import CloudSide
from tests.test_cloud_sync import _cloud, _responses
from tests.test_outbox_damage import _crashed_copy
from tests.test_hostile_peers import EXAMPLE, PROCESS_MEMORY_MB, _still_serving
from tests.test_outbox_store import wait_until

INFER = {"model": "vibration-anomaly", "inputs": EXAMPLE}
METRICS_PORT = free_port()


def _config(
    tmp_path: Path, disk: Path, local: MosquittoProcess, cloud: MosquittoProcess, reserve: int, *, batch: bool = False
) -> Path:
    values = agent_overrides(
        local, BUNDLED_MODELS_DIR, disk / "data", cloud=_cloud(cloud, batch=batch),
        outbox={"reserve_bytes": reserve}, metrics={"port": METRICS_PORT},
        limits={"process_memory_mb": PROCESS_MEMORY_MB},
    )  # fmt: skip
    return write_config(tmp_path / "agent.toml", values)  # the config and the log stay off the small disk


def _metric(name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def _stored_msg_ids(disk: Path) -> set[str]:
    """What the running agent's outbox holds, read as `edge-agent outbox peek` reads it."""
    with Outbox(disk / "data" / "outbox.db", read_only=True) as outbox:
        return {entry.msg_id for entry in outbox.peek(1_000_000)}


@pytest.mark.parametrize("reserve", [512 * 1024, 0], ids=["reserve", "no-reserve"])
def test_an_agent_restarted_on_a_full_disk_serves_and_its_outbox_catches_up_once_space_returns(
    tmp_path: Path, small_filesystem: Path, local_broker: MosquittoProcess, cloud_broker: MosquittoProcess,
    cloud_side: CloudSide, client_factory: Callable[..., DeviceClient], reserve: int,
) -> None:  # fmt: skip
    cloud_broker.stop()
    config_path = _config(tmp_path, small_filesystem, local_broker, cloud_broker, reserve)
    first = AgentProcess(config_path, local_broker).start()
    client = client_factory("alice")
    answered_before = [client.call("infer", INFER)["id"] for _ in range(20)]
    first.stop()
    assert first.proc is not None and first.proc.returncode == 0
    filler = fill_disk(small_filesystem)
    # Restarting on the full disk used to exit 1: the outbox could not open. Now it comes online and serves.
    agent = AgentProcess(config_path, local_broker).start()
    try:
        assert client.call("infer", INFER)["result"]["top"][0]["label"] == "normal"
        assert _metric("edge_agent_outbox_degraded") == 1
        filler.unlink()
        cloud_broker.start()
        assert cloud_side.wait_for(
            lambda records: {r["body"]["reply"]["id"] for r in _responses(records)} >= {*answered_before}, timeout=60
        ), "rows stored before the full disk did not all reach the cloud"
        wait_until(lambda: _metric("edge_agent_outbox_degraded") == 0, timeout=30)
        _still_serving(agent, client)
    finally:
        agent.stop()


# Batched: the drain's first claim after the outage wants a whole window of batches (over a thousand rows),
# a transaction the full disk has no room for; it failed again every second, for good, until claims halved.
@pytest.mark.parametrize("batch", [False, True], ids=["single", "batched"])
def test_an_outbox_that_fills_the_disk_during_a_run_delivers_every_stored_row_when_the_cloud_returns(
    tmp_path: Path, small_filesystem: Path, local_broker: MosquittoProcess, cloud_broker: MosquittoProcess,
    cloud_side: CloudSide, client_factory: Callable[..., DeviceClient], batch: bool,
) -> None:  # fmt: skip
    # The issue's run: the cloud down, requests' upstream copies fill the disk, then the cloud returns and the
    # outbox delivered 0 of 1,210 rows, for good. Other files leave it 1.5 MiB, so a few thousand requests fill it.
    cloud_broker.stop()
    fill_disk(small_filesystem, leave_bytes=1536 * 1024)
    config = _config(tmp_path, small_filesystem, local_broker, cloud_broker, 256 * 1024, batch=batch)
    agent = AgentProcess(config, local_broker)
    agent.start()
    try:
        client = client_factory("alice")
        for _ in range(60):  # batches of 100 in flight; local answers must go on throughout
            replies = [future.result(60) for future in [client.send("infer", INFER) for _ in range(100)]]
            assert all(reply["result"]["top"][0]["label"] == "normal" for reply in replies)
            if _metric("edge_agent_outbox_degraded") == 1:
                break
        else:
            raise AssertionError("the disk never filled")
        stored = _stored_msg_ids(small_filesystem)
        assert len(stored) > 500
        cloud_broker.start()
        assert cloud_side.wait_for(lambda records: {r["msg_id"] for r in records} >= stored, timeout=120), (
            f"{len(stored - {r['msg_id'] for r in cloud_side.records})} of {len(stored)} stored rows never arrived"
        )
        _still_serving(agent, client)
    finally:
        agent.stop()


@pytest.mark.parametrize("damage", ["zero_length_database", "garbage_wal"])
def test_an_agent_started_on_a_damaged_outbox_counts_it_sends_what_was_salvaged_and_serves(
    tmp_path: Path, local_broker: MosquittoProcess, cloud_broker: MosquittoProcess, cloud_side: CloudSide,
    client_factory: Callable[..., DeviceClient], damage: str,
) -> None:  # fmt: skip
    # The finding: either damage lost rows with no corruption event. Rows 0-24 are in the main file,
    # 25-39 only in the -wal, as a power cut leaves them.
    crashed, bodies = _crashed_copy(tmp_path / "crash", 40, in_main_file=25)
    data = tmp_path / "data"
    data.mkdir()
    if damage == "zero_length_database":
        (data / "outbox.db").touch()
        (data / "outbox.db-wal").write_bytes(Path(f"{crashed}-wal").read_bytes())
        salvaged = set(list(bodies)[25:])  # the -wal's commits; the main file's rows went with it
    else:
        (data / "outbox.db").write_bytes(crashed.read_bytes())
        (data / "outbox.db-wal").write_bytes(b"not a write-ahead log " * 500)
        salvaged = set(list(bodies)[:25])  # the main file's; the -wal's stay in the moved-aside copy
    config = _config(tmp_path, tmp_path, local_broker, cloud_broker, 0)
    agent = AgentProcess(config, local_broker).start()
    try:
        assert _metric("edge_agent_outbox_corruption_events_total") == 1
        assert cloud_side.wait_for(lambda records: {r["msg_id"] for r in records} >= salvaged, timeout=60)
        assert list(data.glob("outbox.db.corrupt-*")), "the damaged files were not kept for recovery by hand"
        _still_serving(agent, client_factory("alice"))
    finally:
        agent.stop()
