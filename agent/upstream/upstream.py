"""Everything the device owes the cloud: the outbox, the uplink that drains it, and the records put in it.

A response's upstream copy is committed durably before the reply is published to the client, so whatever a
client was answered, the cloud will get. With no ``[cloud]`` section the agent runs local-only: nothing is
recorded, and it says so at start.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any


from agent.config import MessageClass, Settings
from agent.errors import OutboxError, SigningError
from agent.signing import Signer
from agent.signing.outgoing import encode_record
from agent.upstream.outbox import Outbox
from agent.upstream.message_ids import new_msg_id
from agent.upstream.uplink import CloudMessage, Uplink

log = logging.getLogger(__name__)
OUTBOX_FILE = "outbox.db"
_RECORDED_METHODS = frozenset({"infer", "tools/call"})


def open_outbox(settings: Settings) -> Outbox:
    """The device's outbox, ``data_dir/outbox.db`` (created, with its folder, if missing)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Outbox(settings.data_dir / OUTBOX_FILE, settings.outbox)


class Upstream:
    """The outbox and its uplink, and the one place that turns upstream records into signed outbox rows."""

    def __init__(
        self, settings: Settings, signer: Signer | None, count: Callable[[str], None], outbox: Outbox | None = None
    ) -> None:
        """``outbox``: the one :func:`open_outbox` opened already (the agent opens it while its key opens)."""
        assert settings.cloud is not None
        self.device_id = settings.device_id
        self.signer = signer
        self._count = count
        self.outbox = outbox if outbox is not None else open_outbox(settings)
        self.uplink = Uplink(
            self.outbox, settings.cloud, self.device_id, client_id=f"edge-agent-{self.device_id}", count=count
        )
        self._failure_logged_at = 0.0
        self._failure_lock = threading.Lock()

    def start(self) -> None:
        self.uplink.start()

    def stop(self) -> None:
        self.uplink.stop()
        self.outbox.close()

    def subscribe(self, topic_filter: str, handler: Callable[[CloudMessage], None]) -> None:
        self.uplink.subscribe(topic_filter, handler)

    def publish_transient(self, topic: str, payload: bytes) -> bool:
        """Publish on the cloud link without storing (QoS 0); False when the link is down."""
        return self.uplink.publish_transient(topic, payload)

    def enqueue(self, cls: MessageClass, record: dict[str, Any], *, ttl_s: float | None = None) -> str | None:
        """Sign and durably store one record; returns its msg-id, or None if it could not be stored.

        A failure (disk full, outbox over its bounds with nothing older to drop, signer down) is counted and
        logged — at most once a minute — and never stops the agent from answering local requests.
        """
        msg_id = new_msg_id()
        body = {"msg_id": msg_id, "device_id": self.device_id, "class": cls, **record}
        try:
            self.outbox.enqueue(cls, encode_record(body, self.signer), ttl_s=ttl_s, msg_id=msg_id)
        except (OutboxError, SigningError) as exc:
            self._count(f"outbox_write_failed_{cls}")
            self._log_failure(exc)
            return None
        return msg_id

    @staticmethod
    def records(method: str) -> bool:
        """Whether replies to ``method`` get an upstream copy (inference replies do, results and errors)."""
        return method in _RECORDED_METHODS

    def store_reply(self, client_id: str, method: str, reply: bytes, then: Callable[[], None]) -> None:
        """Store the upstream copy of a reply, exactly the (signed) bytes the client will get, then call
        ``then()`` (on the outbox writer, right after the commit): once the copy is durable, or once storing
        it failed (counted and logged; local answers go on). Returns at once.

        The reply's own signature covers it, bound to device, client, request and request digest, so the
        copy is not signed again; the few fields around it only index it. The copy's commit is shared
        fairly between clients (see :meth:`Outbox.enqueue_then`).
        """

        def stored(error: OutboxError | None) -> None:
            try:
                if error is not None:
                    self._count("outbox_write_failed_res")
                    self._log_failure(error)
            finally:
                then()

        self.outbox.enqueue_then("res", reply_copy(client_id, method, reply), source=client_id, then=stored)

    def _log_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        with self._failure_lock:
            if now - self._failure_logged_at < 60:
                return
            self._failure_logged_at = now
        log.error("cannot store upstream records (still answering local requests): %s", exc)


def reply_copy(client_id: str, method: str, reply: bytes) -> bytes:
    """The body of a reply's upstream copy: ``{"client_id", "method", "reply"}``, the reply spliced in as is.

    The two strings go through ``json.dumps`` with its defaults, whose shared encoder has a C fast path for
    a lone string (custom separators would build a new encoder per call).
    """
    return f'{{"client_id":{json.dumps(client_id)},"method":{json.dumps(method)},"reply":'.encode() + reply + b"}"
