"""Signed deployment documents: allocated a fleet-wide sequence, committed, then published retained.

A device accepts a document only if its ``sequence`` is above every sequence it accepted before, whatever the
topic, so the sequence is allocated in the fleet database (:class:`~provisioning.rollout.schema.IssuedDocument`)
as the larger of the highest issued so far plus one and the current time in milliseconds (a database restored
from an old backup still issues sequences above what devices have seen). A document is committed before it is
published; :meth:`Issuer.publish_pending` publishes what is not yet, so a crash in between costs nothing.
Only the newest document per topic is retained: an older one is never published over a newer one.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import peewee
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from agent.config import CloudBroker
from agent.deploy.documents import DeploymentDocument, SignedEnvelope
from agent.deploy.trust import sign_document
from agent.errors import ProvisioningError
from agent.mqtt import topics
from agent.mqtt.transport import configure_broker_access, new_client
from provisioning.rollout.schema import IssuedDocument, transaction

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 30.0


class RetainedPublisher:
    """A connection to the cloud broker that publishes retained documents at QoS 1 and waits for each PUBACK."""

    def __init__(self, broker: CloudBroker, client_id: str) -> None:
        self._connected = threading.Event()
        self._client = new_client(client_id)
        configure_broker_access(self._client, broker)
        self._client.on_connect = lambda c, u, f, reason, p: None if reason.is_failure else self._connected.set()
        self._client.on_disconnect = lambda *args: self._connected.clear()
        self._client.connect_async(broker.host, broker.port)
        self._client.loop_start()
        self._where = f"{broker.host}:{broker.port}"

    def retain(self, topic: str, payload: bytes) -> None:
        """Publish ``payload`` retained on ``topic``; ProvisioningError unless the broker acknowledged it."""
        if not self._connected.wait(PUBLISH_TIMEOUT_S):
            raise ProvisioningError(f"not connected to the broker at {self._where}")
        info = self._client.publish(topic, payload, qos=1, retain=True)
        try:
            info.wait_for_publish(PUBLISH_TIMEOUT_S)
        except (RuntimeError, ValueError) as exc:
            raise ProvisioningError(f"publishing on {topic} failed: {exc}") from None
        if not info.is_published():
            raise ProvisioningError(f"the broker did not acknowledge the document on {topic}")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class Issuer:
    """Signs, records and publishes deployment documents for one rollout."""

    def __init__(self, database: peewee.Database, key: ec.EllipticCurvePrivateKey, publisher: RetainedPublisher) -> None:
        self.database = database
        self._key = key
        self._publisher = publisher

    def issue(
        self, deployment_id: str, device_id: str, purpose: str, document_id: str, fields: dict[str, Any]
    ) -> IssuedDocument:
        """Sign a document for ``device_id`` (``fields``: action, bundle, deadlines ...) and commit it; the
        caller's transaction, if any, includes it. Returns the row (published later)."""
        now = time.time()
        for attempt in range(5):
            try:
                with transaction(self.database):
                    highest = IssuedDocument.select(peewee.fn.MAX(IssuedDocument.sequence)).scalar() or 0
                    sequence = max(highest + 1, int(now * 1000))
                    payload = {"type": "deployment", "deployment_id": document_id, "target": {"device": device_id},
                               "sequence": sequence, "issued_at": now, **fields}  # fmt: skip
                    try:
                        DeploymentDocument.model_validate(payload)
                    except ValidationError as exc:
                        raise ProvisioningError(f"the document for {device_id} would be refused: {exc}") from None
                    envelope: SignedEnvelope = sign_document(payload, self._key, "deployment")
                    return IssuedDocument.create(
                        sequence=sequence, deployment_id=deployment_id, document_id=document_id,
                        device_id=device_id, purpose=purpose, topic=topics.device_deployment_topic(device_id),
                        payload=envelope.model_dump_json(), issued_at=now, published=False,
                    )  # fmt: skip
            except peewee.IntegrityError:
                # Another operator process took this sequence first: take the next one.
                time.sleep(0.01 * (attempt + 1))
        raise ProvisioningError("could not allocate a document sequence (the database keeps refusing it)")

    def publish_pending(self, deployment_id: str | None = None) -> int:
        """Publish the newest unpublished document of each topic (of one rollout, or all); returns how many."""
        query = IssuedDocument.select(IssuedDocument.topic).where(IssuedDocument.published == False)  # noqa: E712
        if deployment_id is not None:
            query = query.where(IssuedDocument.deployment_id == deployment_id)
        published = 0
        for topic in sorted({row.topic for row in query}):
            published += self._publish_newest(topic)
        return published

    def _publish_newest(self, topic: str) -> int:
        sent: list[int] = []
        while True:
            newest = (IssuedDocument.select().where(IssuedDocument.topic == topic)
                      .order_by(IssuedDocument.sequence.desc()).first())  # fmt: skip
            if newest is None or (sent and newest.sequence == sent[-1]) or (newest.published and not sent):
                return len(sent)
            # Once this call published anything, a newer document is published again even if another process
            # already did: that process may have done so before this one's older publish replaced it.
            self._publisher.retain(topic, newest.payload.encode())
            sent.append(newest.sequence)
            with transaction(self.database):
                IssuedDocument.update(published=True).where(
                    (IssuedDocument.topic == topic) & (IssuedDocument.sequence <= newest.sequence)
                ).execute()
