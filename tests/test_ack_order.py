"""Acknowledgement ordering (MQTT 5 §4.6): acknowledgements leave in arrival order, each only once its request is
done; a QoS 2 message's is its PUBCOMP."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.mqtt.transport import AckSequencer


class RecordingClient:
    """Stands in for paho's ``ack`` only: records what would go on the wire, in order."""

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.qos: list[int] = []

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)
        self.qos.append(qos)


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


@given(st.lists(st.sampled_from([1, 2]), min_size=1, max_size=20), st.randoms(use_true_random=False))
def test_each_message_is_acknowledged_at_its_own_qos(kinds: list[int], rand) -> None:
    client = RecordingClient()
    sequencer = AckSequencer(client)  # type: ignore[arg-type]
    for mid, qos in enumerate(kinds, start=1):
        sequencer.received(mid, qos)
    completion = list(range(1, len(kinds) + 1))
    rand.shuffle(completion)
    for mid in completion:
        sequencer.done(mid, sequencer.generation)
    assert client.acked == list(range(1, len(kinds) + 1)) and client.qos == kinds


def test_a_qos2_message_of_an_old_connection_is_not_completed_on_the_new_one() -> None:
    client = RecordingClient()
    sequencer = AckSequencer(client)  # type: ignore[arg-type]
    sequencer.received(1, 2)
    old = sequencer.generation
    sequencer.reset()
    sequencer.received(1, 1)  # the id reused for a QoS 1 message of the new connection
    sequencer.done(1, old)
    assert client.acked == []
    sequencer.done(1, sequencer.generation)
    assert (client.acked, client.qos) == ([1], [1])
