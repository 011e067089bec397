"""The replay cache: repeats get the exact bytes sent before, within the window and the byte bound."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import Replay
from agent.exchange import payload_digest
from agent.serving.replay import ENTRY_OVERHEAD_BYTES, ReplayCache


class ManualClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def cache(clock: ManualClock, **values: object) -> ReplayCache:
    return ReplayCache(Replay(**values), clock=clock)


REQUEST = b'{"jsonrpc":"2.0","id":7,"method":"infer","params":{"model":"m","inputs":{"x":[1]}}}'
OTHER_REQUEST = b'{"jsonrpc":"2.0","id":7,"method":"infer","params":{"model":"m","inputs":{"x":[2]}}}'


def test_a_repeat_gets_the_exact_reply_bytes() -> None:
    replies = cache(ManualClock())
    digest = payload_digest(REQUEST)
    assert replies.lookup("alice", 7, digest) is None
    replies.store("alice", 7, digest, b'{"id":7,"result":{},"sig":"x"}')
    assert replies.lookup("alice", 7, digest) == b'{"id":7,"result":{},"sig":"x"}'
    assert replies.hits == 1


def test_same_id_with_another_payload_is_a_new_request_whose_answer_replaces_the_old() -> None:
    replies = cache(ManualClock())
    first, second = payload_digest(REQUEST), payload_digest(OTHER_REQUEST)
    replies.store("alice", 7, first, b"first")
    assert replies.lookup("alice", 7, second) is None
    replies.store("alice", 7, second, b"second")
    assert replies.lookup("alice", 7, second) == b"second"
    assert replies.lookup("alice", 7, first) is None
    assert len(replies) == 1


def test_clients_and_id_types_do_not_share_answers() -> None:
    replies = cache(ManualClock())
    digest = payload_digest(REQUEST)
    replies.store("alice", 7, digest, b"alice's")
    assert replies.lookup("bob", 7, digest) is None
    assert replies.lookup("alice", "7", digest) is None


def test_answers_expire_after_the_window() -> None:
    clock = ManualClock()
    replies = cache(clock, window_s=10.0)
    digest = payload_digest(REQUEST)
    replies.store("alice", 7, digest, b"reply")
    clock.now += 10.0
    assert replies.lookup("alice", 7, digest) == b"reply"
    clock.now += 0.001
    assert replies.lookup("alice", 7, digest) is None
    assert len(replies) == 0 and replies.stored_bytes == 0


def test_notifications_and_a_disabled_cache_keep_nothing() -> None:
    digest = payload_digest(REQUEST)
    replies = cache(ManualClock())
    replies.store("alice", None, digest, b"reply")
    assert len(replies) == 0 and replies.lookup("alice", None, digest) is None
    disabled = cache(ManualClock(), enabled=False)
    disabled.store("alice", 7, digest, b"reply")
    assert disabled.lookup("alice", 7, digest) is None


def test_least_recently_used_goes_first_and_an_oversized_reply_is_not_kept() -> None:
    digest = payload_digest(REQUEST)
    cost = 1000 + len("c") + len(digest) + ENTRY_OVERHEAD_BYTES
    replies = cache(ManualClock(), max_bytes=3 * cost)
    for request_id in (1, 2, 3):
        replies.store("c", request_id, digest, b"x" * 1000)
    assert replies.lookup("c", 1, digest) is not None  # 1 is now the most recently used
    replies.store("c", 4, digest, b"x" * 1000)
    assert replies.lookup("c", 2, digest) is None
    assert all(replies.lookup("c", n, digest) is not None for n in (1, 3, 4))
    replies.store("c", 5, digest, b"x" * (3 * cost))
    assert replies.lookup("c", 5, digest) is None and len(replies) == 3


operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("store"),
            st.sampled_from(["a", "b"]),
            st.integers(0, 5),
            st.integers(0, 2),
            st.integers(0, 3000),
        ),
        st.tuples(st.just("lookup"), st.sampled_from(["a", "b"]), st.integers(0, 5), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("wait"), st.just(""), st.just(0), st.just(0), st.integers(0, 40)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(operations=operations, max_bytes=st.integers(0, 12_000), window_s=st.floats(1.0, 100.0))
def test_never_over_the_byte_bound_and_never_a_wrong_or_stale_answer(
    operations: list[tuple[str, str, int, int, int]], max_bytes: int, window_s: float
) -> None:
    clock = ManualClock()
    replies = cache(clock, max_bytes=max_bytes, window_s=window_s)
    latest: dict[tuple[str, int], tuple[bytes, bytes, float]] = {}  # what was last stored, and when
    for serial, (op, client, request_id, variant, size) in enumerate(operations):
        digest = payload_digest(bytes([variant]))
        if op == "store":
            reply = serial.to_bytes(4, "big") * (size // 4 + 1)
            replies.store(client, request_id, digest, reply)
            latest[(client, request_id)] = (digest, reply, clock.now)
        elif op == "lookup":
            found = replies.lookup(client, request_id, digest)
            if found is not None:
                stored_digest, stored_reply, stored_at = latest[(client, request_id)]
                assert (stored_digest, stored_reply) == (digest, found)
                assert clock.now - stored_at <= window_s
        else:
            clock.now += size
        assert replies.stored_bytes <= max_bytes


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 500), max_size=50))
def test_with_room_enough_every_fresh_answer_is_found(sizes: list[int]) -> None:
    replies = cache(ManualClock(), max_bytes=10**6)
    digest = payload_digest(REQUEST)
    for request_id, size in enumerate(sizes):
        replies.store("a", request_id, digest, b"r" * size)
    assert [replies.lookup("a", n, digest) for n in range(len(sizes))] == [b"r" * size for size in sizes]
