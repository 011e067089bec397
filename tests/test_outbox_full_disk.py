"""A full disk on a real small filesystem: the outbox never stops for good, and nothing it stored is lost.

Opening is retried while the disk is full; a write that fails for space gives back the outbox's reserve so the
WAL can be checkpointed and every stored row delivered; new messages wait outside until space returns.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import OutboxSettings
from agent.errors import OutboxError
from agent.upstream.outbox import Outbox
from tests.fixtures.disks import fill_disk
from tests.test_outbox_faults import _fill_until_refused, drain, padded
from tests.test_outbox_store import wait_until

RESERVE = OutboxSettings(reserve_bytes=512 * 1024)


def _stores_again(store: Outbox) -> str:
    """Enqueue until the outbox takes a message again (it looks at the disk at most once a second)."""
    stored: list[str] = []

    def attempt() -> bool:
        try:
            stored.append(store.enqueue("audit", b'{"after":"space"}'))
        except OutboxError:
            return False
        return True

    wait_until(attempt, timeout=30)
    return stored[0]


def test_an_outbox_that_cannot_open_on_a_full_disk_opens_by_itself_once_space_returns(small_filesystem: Path) -> None:
    path = small_filesystem / "outbox.db"
    without_reserve = OutboxSettings(reserve_bytes=0)
    with Outbox(path, without_reserve) as store:
        before = [store.enqueue("res", padded(i)) for i in range(30)]
    filler = fill_disk(small_filesystem)
    store = Outbox(path, without_reserve)  # used to raise OutboxError: the agent exited 1
    try:
        assert store.stats().problem is not None and "disk full" in store.stats().problem
        with pytest.raises(OutboxError, match="disk full"):
            store.enqueue("res", b"{}")
        filler.unlink()
        after = _stores_again(store)
        assert store.stats().problem is None
        assert [msg_id for _, msg_id, _ in drain(store)] == [*before, after]
    finally:
        store.close()


def test_reopening_on_a_disk_others_filled_gives_back_the_reserve_and_delivers_everything(
    small_filesystem: Path,
) -> None:
    path = small_filesystem / "outbox.db"
    with Outbox(path, RESERVE) as store:
        before = [store.enqueue("res", padded(i)) for i in range(30)]
    assert Path(f"{path}.reserve").stat().st_size == RESERVE.reserve_bytes
    filler = fill_disk(small_filesystem)
    with Outbox(path, RESERVE) as store:
        assert "disk full" in (store.stats().problem or "")
        with pytest.raises(OutboxError, match="new messages refused"):
            store.enqueue("telemetry", b"{}")
        assert [msg_id for _, msg_id, _ in drain(store)] == before  # deliveries go on
        filler.unlink()
        after = _stores_again(store)
        assert Path(f"{path}.reserve").exists() and store.stats().problem is None
        assert [msg_id for _, msg_id, _ in drain(store)] == [after]


def test_an_outbox_whose_own_files_filled_the_disk_delivers_every_row_then_stores_again(small_filesystem: Path) -> None:
    # The case: the outbox filled the disk itself (its WAL, 4 MiB by default, was as large as the disk),
    # and could then neither delete a delivered row nor checkpoint: 0 of 1,210 rows left after the cloud returned.
    path = small_filesystem / "outbox.db"
    store = Outbox(path, RESERVE)
    try:
        stored, error = _fill_until_refused(store)
        assert "disk full" in str(error) and len(stored) > 1000
        assert not Path(f"{path}.reserve").exists()  # given back, so the WAL could be checkpointed
        assert [msg_id for _, msg_id, _ in drain(store)] == stored  # every row, in order
        after = _stores_again(store)  # the emptied file is compacted, the reserve taken back
        assert Path(f"{path}.reserve").exists()
        assert [msg_id for _, msg_id, _ in drain(store)] == [after]
    finally:
        store.close()
