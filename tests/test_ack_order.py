"""PUBACK ordering (MQTT 5 §4.6): acknowledgements leave in arrival order, each only once its request is done."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.mqtt.transport import AckSequencer


class RecordingClient:
    """Stands in for paho's ``ack`` only: records what would go on the wire, in order."""

    def __init__(self) -> None:
        self.acked: list[int] = []

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)


@given(st.permutations(list(range(1, 30))))
def test_any_completion_order_acknowledges_in_arrival_order(completion: list[int]) -> None:
    client = RecordingClient()
    sequencer = AckSequencer(client)  # type: ignore[arg-type]
    for mid in range(1, 30):
        sequencer.received(mid)
    finished: set[int] = set()
    for mid in completion:
        sequencer.done(mid, sequencer.generation)
        finished.add(mid)
        assert set(client.acked) <= finished
        assert client.acked == list(range(1, len(client.acked) + 1))
    assert client.acked == list(range(1, 30)) and sequencer.pending() == 0


def test_reconnect_forgets_pending_acks_of_the_old_connection() -> None:
    client = RecordingClient()
    sequencer = AckSequencer(client)  # type: ignore[arg-type]
    sequencer.received(1)
    sequencer.received(2)
    old = sequencer.generation
    sequencer.reset()
    sequencer.done(1, old)
    sequencer.received(1)
    sequencer.done(1, sequencer.generation)
    assert client.acked == [1]
