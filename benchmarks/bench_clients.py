"""Memory under many clients: one request from each of 50,000 distinct client ids to a real agent process.

Run: ``python -m benchmarks.bench_clients``. A client id is the last segment of the request topic, chosen by
the client, so this is what a client cycling through ids costs the agent. The agent runs with its shipped
defaults (no signing, no cloud); one MQTT connection publishes ``ping`` requests at QoS 1 to
``mcp/req/{device}/c-N`` and counts the replies on ``mcp/res/{device}/#``. The agent's resident memory
(VmRSS) is read after 5,000 and after 50,000 answered clients: the difference is what the other 45,000 cost.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.mqtt import topics
from agent.mqtt.localbroker import MosquittoProcess
from agent.mqtt.transport import new_client
from benchmarks.harness import AgentUnderTest

DEVICE_ID = "bench-clients"
CHECKPOINTS = (5_000, 10_000, 20_000, 30_000, 40_000, 50_000)
PING = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'


class _Replies:
    """Counts replies on every client's reply topic."""

    def __init__(self, broker: MosquittoProcess) -> None:
        self.count = 0
        self._cond = threading.Condition()
        subscribed = threading.Event()
        self._client = new_client("bench-clients-replies")
        self._client.on_connect = lambda c, u, f, r, p: c.subscribe(f"{topics.REPLY_PREFIX}/{DEVICE_ID}/#", qos=0)
        self._client.on_subscribe = lambda *args: subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count >= count, timeout)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def run(clients: int = CHECKPOINTS[-1], **extra: str) -> dict[str, Any]:
    """RSS of the agent after each checkpoint of distinct clients answered."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-clients-"))
    broker = MosquittoProcess(workdir / "broker").start()
    agent = AgentUnderTest(
        broker, DEVICE_ID, {"signing__backend": "none", "metrics__port": "0", "data_dir": str(workdir / "data"), **extra},
        workdir / "agent.log",
    )  # fmt: skip
    replies = _Replies(broker)
    publisher = new_client("bench-clients-publisher")
    publisher.max_inflight_messages_set(64)
    publisher.connect(broker.host, broker.port)
    publisher.loop_start()
    memory: dict[str, dict[str, float]] = {}
    try:
        agent.start()
        memory["idle"] = agent.memory_mb()
        started = time.monotonic()
        sent = 0
        for checkpoint in CHECKPOINTS:
            while sent < min(checkpoint, clients):
                publisher.publish(topics.request_topic(DEVICE_ID, f"c-{sent}"), PING, qos=1)
                sent += 1
                if sent % 500 == 0:  # keep paho's own queue short: the agent is measured, not the publisher
                    replies.wait_for(sent - 1000, 60)
            if not replies.wait_for(sent, 120):
                raise RuntimeError(f"only {replies.count} of {sent} requests answered")
            memory[f"after_{sent}_clients"] = agent.memory_mb()
        elapsed = time.monotonic() - started
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        replies.close()
        agent.stop()
        broker.close()
        shutil.rmtree(workdir, ignore_errors=True)
    first, last = (f"after_{n}_clients" for n in (CHECKPOINTS[0], CHECKPOINTS[-1]))
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "memory_mb": memory,
        "rss_growth_mb_5k_to_50k": round(memory[last]["VmRSS"] - memory[first]["VmRSS"], 1),
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"one ping from each of {result['clients']:,} distinct client ids in {result['seconds']} s")
    print(f"  {'state':<28}{'RSS MB':>8}{'peak MB':>9}")
    for state, figures in result["memory_mb"].items():
        print(f"  {state:<28}{figures['VmRSS']:>8.1f}{figures['VmHWM']:>9.1f}")
    print(f"  RSS after 50,000 minus after 5,000: {result['rss_growth_mb_5k_to_50k']} MB (target < 5 MB)")


if __name__ == "__main__":
    outcome = run()
    print_table(outcome)
