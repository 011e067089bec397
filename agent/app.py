"""The running agent: wires config, models, the request service and the local MQTT link; owns start and stop.

Threads: paho's network thread only sorts incoming messages (topic checks, size check, expiry stamp,
hand-off to the bounded intake queue, or an immediate "overloaded" reply); ``workers`` threads parse,
run, sign and reply. A request's PUBACK goes out only after the broker acknowledged its reply, and in the
order the requests arrived (:class:`~agent.transport.AckSequencer`).

Every message is signed when ``[signing]`` names a backend (docs/signing.md): replies as they are
published, the status document at start (and, when messages reference the delegation certificate by
thumbprint, again at each rotation), the Last Will by the device key at start.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from paho.mqtt.subscribeoptions import SubscribeOptions
from sdnotify import SystemdNotifier

from agent import __version__, topics
from agent.audit import AuditEvent, AuditTrail
from agent.config import Settings
from agent.errors import (
    AgentError,
    InternalError,
    InvalidRequest,
    ModelTooLarge,
    Overloaded,
    RateLimited,
    RequestError,
    ResponseTopicRefused,
    SigningError,
)
from agent.health import Probes, collect_health
from agent.inference import RUNTIME
from agent.metrics import AgentMetrics, MetricsServer, Rejection
from agent.memory import MB, MemoryWatchdog, memory_cgroup_report
from agent.model_manager import ModelManager
from agent.model_watch import ModelWatcher
from agent.fallback import CloudFallback
from agent.outgoing import encode_record, encode_reply
from agent.protocol import InferParams, Request, RequestId, error_reply, parse_request, result_reply, validate_params
from agent.service import RequestService, Timing
from agent.ratelimit import RateLimiter, RateLimitRefusal
from agent.replay import ReplayCache, payload_digest
from agent.signing import Signer, StrictSigner, create_signer
from agent.upstream import Upstream
from agent.transport import AckSequencer, configure_broker_access, connect_properties, new_client, publish_properties

log = logging.getLogger(__name__)
_ID_PROBE_MAX_BYTES = 65_536
_ID_PROBE_HEAD_BYTES = 512
OFFLINE: dict[str, Any] = {"status": "offline"}
# The "id" member among the leading simple members of the top-level object (before any nested value).
_LEADING_ID = re.compile(rb'\s*\{(?:\s*"[^"\\]*"\s*:\s*(?:"(?:[^"\\]|\\.)*"|[-\w.]+)\s*,)*?\s*"id"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)\s*[,}]')


@dataclass
class InboundRequest:
    """A request as it arrived, before parsing."""

    client_id: str
    payload: bytes
    mid: int
    qos: int
    generation: int
    received: float
    expires: float | None
    response_topic: str | None
    correlation_data: bytes | None


@dataclass
class _PendingReply:
    mid: int
    qos: int
    generation: int


class Agent:
    """One agent process's worth of state; ``start()``, then ``stop()`` (or ``run_until_signalled()``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        self.models = ModelManager.for_limits(settings.models_dir, settings.limits)
        self.memory_watchdog = MemoryWatchdog(settings.limits.process_soft_limit_mb, relieve=self.models.unload_idle)
        self.model_watcher = ModelWatcher(self.models, settings.models_poll_s) if settings.models_poll_s > 0 else None
        self.service = RequestService(self.models, settings.limits, device_id=self.device_id, profile=settings.profile)
        self.counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self._intake: queue.Queue[InboundRequest | None] = queue.Queue(maxsize=settings.limits.intake_queue)
        self._workers: list[threading.Thread] = []
        self.upstream: Upstream | None = None
        self.fallback: CloudFallback | None = None
        self.rate_limiter = RateLimiter(settings.rate_limit)
        # Each refusal is a signed reply: a flood's refusals are answered at the client's own admitted rate
        # (the rest are acknowledged unanswered and counted), so a flooder cannot buy the network thread.
        self._refusal_replies = RateLimiter(settings.rate_limit)
        self.replies = ReplayCache(settings.replay)
        self.audit = AuditTrail(self.device_id, self._send_audit_upstream)
        self.models.on_event = self._on_model_event
        self.probes: Probes | None = None
        self.metrics: AgentMetrics | None = None
        self._metrics_server: MetricsServer | None = None
        self._started_clock = time.monotonic()
        self._accepting = threading.Event()
        self._subscribed = threading.Event()
        self._stopped = threading.Event()
        self._publish_lock = threading.Lock()
        self._awaiting_puback: dict[int, _PendingReply | None] = {}
        self._early_pubacks: set[int] = set()
        self._in_flight = 0
        self._idle = threading.Condition()
        self._awaiting_commit = 0
        self.started_at = time.time()
        self.signer: Signer | None = None
        self._status_payload: bytes | None = None
        self._will_payload: bytes | None = None
        self._certificate_pem: bytes | None = None
        self.client = new_client(f"edge-agent-{self.device_id}", manual_ack=True)
        self._acks = AckSequencer(self.client)
        self._configure_client()

    def count(self, name: str, amount: int = 1) -> None:
        with self._counter_lock:
            self.counters[name] += amount

    def _configure_client(self) -> None:
        client = self.client
        configure_broker_access(client, self.settings.local)
        client.max_inflight_messages_set(max(20, self.settings.limits.receive_maximum))
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self, ready_timeout: float = 30.0) -> None:
        """Open the signing key, verify models, start workers, connect and subscribe; returns once serving.

        An unusable signing key raises :class:`SigningError` before anything connects: the agent never
        comes online with unsigned answers.
        """
        self.signer = self._open_signer()
        try:
            refused = self.models.verify_all()
            for model_id, reason in refused.items():
                log.error("model %s will answer with errors: %s", model_id, reason)
            self.models.load_pinned()
            self._status_payload = encode_record(self.status_document(), self.signer)
            self._set_will()
        except BaseException:
            if self.signer is not None:
                self.signer.close()
            raise
        cgroup = memory_cgroup_report()
        log.log(logging.WARNING if cgroup.controller_enabled is False else logging.INFO, "memory: %s", cgroup.describe())
        self.memory_watchdog.start()
        if self.model_watcher is not None:
            self.model_watcher.start()
        for index in range(self.settings.limits.workers):
            worker = threading.Thread(target=self._work, name=f"inference-worker-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self._start_upstream()
        self._start_observability()
        self._accepting.set()
        local = self.settings.local
        self.client.connect_async(
            local.host,
            local.port,
            keepalive=local.keepalive,
            clean_start=False,
            properties=connect_properties(local.session_expiry, self.settings.limits.receive_maximum),
        )
        self.client.loop_start()
        if not self._subscribed.wait(ready_timeout):
            self.stop()
            raise AgentError(f"could not subscribe on the local broker {local.host}:{local.port} within {ready_timeout:.0f} s")
        log.info(
            "serving device %s on %s:%d with %d workers, models: %s",
            self.device_id, local.host, local.port, len(self._workers), ", ".join(self.models.servable_ids) or "none",
        )

    def stop(self) -> None:
        """Graceful stop: stop taking requests, finish those in flight, publish offline, disconnect."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        # No UNSUBSCRIBE: that would delete the subscription from our persistent session, and requests sent
        # while the agent is down would be lost. New arrivals are left unacknowledged instead (redelivered later).
        self._accepting.clear()
        deadline = time.monotonic() + self.settings.limits.drain_timeout_s
        with self._idle:
            while (
                self._in_flight or self._awaiting_commit or not self._intake.empty() or self._awaiting_puback
            ) and time.monotonic() < deadline:
                self._idle.wait(0.05)
        for _ in self._workers:
            self._intake.put(None)
        for worker in self._workers:
            worker.join(timeout=5)
        if self.model_watcher is not None:
            self.model_watcher.stop()
        self.memory_watchdog.stop()
        if self.fallback is not None:
            self.fallback.stop()
        self.audit.close()  # its queued events reach the outbox before it closes
        if self.upstream is not None:
            self.upstream.stop()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        if self.client.is_connected():
            offline = self._will_payload
            try:
                offline = encode_record(OFFLINE, self.signer)
            except SigningError as exc:
                log.error("could not sign the offline status, publishing the will instead: %s", exc)
            info = self.client.publish(topics.status_topic(self.device_id), offline, qos=1, retain=True)
            info.wait_for_publish(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()
        if self.signer is not None:
            self.signer.close()
        log.info("stopped; counters: %s", dict(self.counters))

    def _start_upstream(self) -> None:
        cloud = self.settings.cloud
        if cloud is None:
            log.warning("no [cloud] section: running local-only, nothing is recorded or sent upstream")
            return
        upstream = self.upstream = Upstream(self.settings, self.signer, self.count)
        if cloud.fallback_models:
            self.fallback = CloudFallback(
                cloud.fallback_models,
                enqueue=lambda body, ttl_s: upstream.enqueue("fallback", body, ttl_s=ttl_s),
                relay=self._relay_cloud_answer,
                count=self.count,
            )
            upstream.subscribe(topics.cloud_reply_topic(self.device_id), self.fallback.on_cloud_message)
        upstream.start()
        log.info("cloud link to %s:%d; outbox at %s", cloud.host, cloud.port, upstream.outbox.path)

    def _start_observability(self) -> None:
        """Health readings, the metrics registry and its HTTP server; then re-sign the status with health."""
        upstream = self.upstream
        self.probes = Probes(
            started=self._started_clock,
            intake_depth=self._intake.qsize,
            outbox_stats=upstream.outbox.stats if upstream is not None else None,
            cloud_state=(lambda: upstream.uplink.state) if upstream is not None else None,
        )
        self.metrics = AgentMetrics(
            self.probes,
            methods=self.service.methods,
            models=lambda: self.models.servable_ids,
            signing_backend=self.settings.signing.backend,
            signing_mode=self.signer.mode if self.signer is not None else "none",
            version=__version__,
            runtime=RUNTIME,
            profile=self.settings.profile,
        )
        self._status_payload = encode_record(self.status_document(), self.signer)
        config = self.settings.metrics
        if config.enabled:
            server = MetricsServer(self.metrics.registry, config.host, config.port)
            try:
                server.start()
            except AgentError as exc:
                # Metrics are for watching the agent; failing to serve them must not stop it serving requests.
                log.error("%s; running without /metrics", exc)
            else:
                self._metrics_server = server

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on, None when it is not served."""
        return self._metrics_server.port if self._metrics_server is not None else None

    def _send_audit_upstream(self, event: AuditEvent) -> None:
        if self.upstream is not None:
            self.upstream.enqueue("audit", event.model_dump(mode="json", exclude={"device_id"}))

    def _on_model_event(self, kind: str, **detail: Any) -> None:
        if self.metrics is not None and kind == "model_loaded":
            self.metrics.model_loaded(detail["model"])
        elif self.metrics is not None and kind == "model_unloaded":
            self.metrics.model_evicted(detail["model"])
        elif kind in ("model_swapped", "model_removed", "model_refused"):
            self.audit.record(kind, **detail)

    def refresh_status(self) -> None:
        """Re-sign the retained status with fresh health figures and publish it; send the same upstream."""
        document = self.status_document()
        if self.upstream is not None:
            self.upstream.enqueue("telemetry", {"health": document.get("health"), "counters": dict(self.counters)})
        try:
            self._status_payload = encode_record(document, self.signer)
        except SigningError as exc:
            log.error("could not sign the status, keeping the previous one: %s", exc)
            return
        if self.client.is_connected():
            self._publish_tracked(topics.status_topic(self.device_id), self._status_payload, None, retain=True)

    def _relay_cloud_answer(self, inbound: InboundRequest, reply: dict[str, Any]) -> None:
        # The request was acknowledged once it was durably forwarded; the relayed answer acknowledges nothing.
        self._reply(replace(inbound, qos=0), reply)

    def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully."""
        stop_requested = threading.Event()

        def request_stop(signum: int, frame: Any) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            stop_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        systemd = SystemdNotifier()
        systemd.notify(f"READY=1\nSTATUS=serving {len(self.models.servable_ids)} models")
        health_due = time.monotonic() + self.settings.metrics.health_interval_s
        while not stop_requested.wait(1.0):
            # The watchdog is fed only while every thread that serves requests is alive, so systemd
            # restarts an agent whose network loop or workers died instead of leaving it deaf.
            if self.threads_alive():
                systemd.notify("WATCHDOG=1")
            if time.monotonic() >= health_due:
                health_due = time.monotonic() + self.settings.metrics.health_interval_s
                self.refresh_status()
        systemd.notify("STOPPING=1")
        self.stop()

    def threads_alive(self) -> bool:
        """Whether the MQTT network thread and every inference worker are still running."""
        network = getattr(self.client, "_thread", None)
        return network is not None and network.is_alive() and all(worker.is_alive() for worker in self._workers)

    def status_document(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "status": "online",
            "device_id": self.device_id,
            "version": __version__,
            "runtime": RUNTIME,
            "profile": self.settings.profile,
            "models": self.models.servable_ids,
            "started_at": round(self.started_at, 3),
        }
        if self.probes is not None:
            document["health"] = collect_health(self.probes).model_dump(mode="json")
        return document

    # ---- signing ------------------------------------------------------------------------------

    def _open_signer(self) -> Signer | None:
        signing = self.settings.signing
        by_reference = signing.mode == "delegated" and signing.certificate_header == "x5t#S256"
        try:
            return create_signer(
                signing,
                self.device_id,
                self.settings.data_dir,
                on_rotate=self._on_certificate_rotated if by_reference else self._audit_rotation,
            )
        except SigningError as exc:
            raise SigningError(f"signing backend {signing.backend!r} is unusable, not starting: {exc}") from None

    def _set_will(self) -> None:
        # The broker publishes the will at some later disconnect, perhaps after the delegation certificate
        # it would carry has been replaced: signed by the device key itself, it verifies with that key alone.
        signer = self.signer
        if signer is not None and signer.mode != "strict":
            signer = StrictSigner(signer.root, self.device_id)  # shares the root; closed with self.signer
        self._will_payload = encode_record(OFFLINE, signer)
        self.client.will_set(topics.status_topic(self.device_id), self._will_payload, qos=1, retain=True)

    def _on_certificate_rotated(self, certificate: x509.Certificate) -> None:
        """A new delegated key whose messages name their certificate by thumbprint: retain it, re-sign the status.

        Runs on whichever thread rotated: the one creating the signer, the rotation thread, or a worker
        whose message outlived the certificate. Until start() has signed the first status, only remember it.
        """
        self._audit_rotation(certificate)
        self._certificate_pem = certificate.public_bytes(Encoding.PEM)
        if self._status_payload is None or self._stopped.is_set():
            return
        self._status_payload = encode_record(self.status_document(), self.signer)
        if self.client.is_connected():
            self._publish_identity_and_status()

    def _audit_rotation(self, certificate: x509.Certificate) -> None:
        self.audit.record(
            "signing_key_rotated",
            serial=format(certificate.serial_number, "x"),
            not_after=certificate.not_valid_after_utc.isoformat(),
        )

    def _publish_identity_and_status(self) -> None:
        # The certificate first, so that a verifier that sees the new status can already find it.
        if self._certificate_pem is not None:
            self._publish_tracked(topics.identity_topic(self.device_id), self._certificate_pem, None, retain=True)
        assert self._status_payload is not None, "start() signs the status before connecting"
        self._publish_tracked(topics.status_topic(self.device_id), self._status_payload, None, retain=True)

    # ---- paho callbacks (network thread) --------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("local broker refused the connection: %s", reason)
            return
        log.info("connected to local broker (session present: %s)", flags.session_present)
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        client.subscribe(topics.request_filter(self.device_id), options=options)
        self._publish_identity_and_status()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if any(reason.is_failure for reason in reasons):
            log.error("subscription refused by the local broker: %s", reasons)
            return
        self._subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._acks.reset()
        if not self._stopped.is_set():
            log.warning("disconnected from local broker (%s); reconnecting", reason)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        # paho calls this holding its outgoing-message lock, so nothing here may wait on a thread that is
        # inside client.publish(); _publish_lock is therefore never held across a paho call.
        with self._publish_lock:
            if mid in self._awaiting_puback:
                pending = self._awaiting_puback.pop(mid)
            else:
                self._early_pubacks.add(mid)
                pending = None
        if pending is not None:
            self._finish(pending.mid, pending.qos, pending.generation)
        with self._idle:
            self._idle.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        generation = self._acks.generation
        if message.qos > 0:
            self._acks.received(message.mid)
        client_id = topics.client_id_from_request_topic(message.topic, self.device_id)
        if client_id is None:
            self.count("ignored_topic")
            self._finish(message.mid, message.qos, generation)
            return
        props = message.properties
        now = time.monotonic()
        expiry = getattr(props, "MessageExpiryInterval", None)
        inbound = InboundRequest(
            client_id=client_id,
            payload=message.payload,
            mid=message.mid,
            qos=message.qos,
            generation=generation,
            received=now,
            expires=now + expiry if expiry is not None else None,
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
        )
        if len(message.payload) > self.settings.limits.max_payload_bytes:
            self.count("oversized")
            self._count_rejection("oversized")
            error = InvalidRequest(
                f"payload of {len(message.payload)} bytes exceeds the limit of {self.settings.limits.max_payload_bytes}"
            )
            self._reply(inbound, error_reply(None, error), to_default_topic=True)
            return
        if not self._accepting.is_set():
            # Not acknowledged: the broker keeps it in our session and redelivers it after a restart.
            return
        refusal = self.rate_limiter.check(client_id)
        if refusal is not None:
            self._refuse_rate_limited(inbound, refusal)
            return
        if self.memory_watchdog.should_shed():
            self.count("overloaded_memory")
            self._count_rejection("overloaded")
            error = Overloaded(
                f"agent memory {self.memory_watchdog.last_rss_bytes / MB:.0f} MB is above its soft limit of "
                f"{self.settings.limits.process_soft_limit_mb} MB; retry later"
            )
            self._reply(inbound, error_reply(_probe_request_id(inbound.payload), error))
            return
        try:
            self._intake.put_nowait(inbound)
        except queue.Full:
            self.count("overloaded")
            self._count_rejection("overloaded")
            error = Overloaded(f"intake queue full ({self._intake.maxsize} waiting); retry later")
            self._reply(inbound, error_reply(_probe_request_id(inbound.payload), error))

    def _refuse_rate_limited(self, inbound: InboundRequest, refusal: RateLimitRefusal) -> None:
        """Answer a request over its client's or the global rate at once, without queueing it."""
        retry_after_ms = max(1, math.ceil(refusal.retry_after_s * 1000))
        self.count(f"rate_limited_{refusal.scope}")
        self._count_rejection("rate_limited_client" if refusal.scope == "client" else "rate_limited_global")
        self.audit.record("rate_limited", client_id=inbound.client_id, scope=refusal.scope, retry_after_ms=retry_after_ms)
        if self._refusal_replies.check(inbound.client_id) is not None:
            self.count("rate_limited_unanswered")
            self._finish(inbound.mid, inbound.qos, inbound.generation)
            return
        error = RateLimited(
            f"rate limit exceeded ({refusal.scope}); retry after {retry_after_ms} ms",
            data={"retry_after_ms": retry_after_ms, "scope": refusal.scope},
        )
        self._reply(inbound, error_reply(_probe_request_id(inbound.payload), error))

    def _count_rejection(self, reason: Rejection) -> None:
        if self.metrics is not None:
            self.metrics.count_rejection(reason)

    # ---- workers ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            inbound = self._intake.get()
            if inbound is None:
                return
            with self._idle:
                self._in_flight += 1
            try:
                self._serve(inbound)
            except Exception:  # a bug must cost one reply, never the worker
                log.exception("unexpected error serving a request from %s", inbound.client_id)
                self._reply(inbound, error_reply(None, InternalError("internal error; see the agent log")))
            finally:
                with self._idle:
                    self._in_flight -= 1
                    self._idle.notify_all()

    def _serve(self, inbound: InboundRequest) -> None:
        timing = Timing(received=inbound.received, started=time.monotonic())
        request: Request | None = None
        outcome = "internal_error"  # what an unexpected exception leaves it at
        try:
            if inbound.expires is not None and timing.started > inbound.expires:
                outcome = "expired"
                self.count("expired")
                self._finish(inbound.mid, inbound.qos, inbound.generation)
                return
            limits = self.settings.limits
            digest = payload_digest(inbound.payload) if self.replies.enabled else b""
            try:
                request = parse_request(
                    inbound.payload, max_depth=limits.max_nesting_depth, max_values=limits.max_json_values
                )
                self._check_response_topic(inbound)
                cached = self.replies.lookup(inbound.client_id, request.id, digest)
                if cached is not None:
                    # The same signed bytes: they are bound to this very request, so they answer the repeat.
                    outcome = "replayed"
                    self.count("replayed")
                    self._send(inbound, cached)
                    return
                if self._forward_to_cloud(inbound, request, too_large=False):
                    outcome = "forwarded"
                    return
                reply = result_reply(request.id, self.service.handle(request, timing))
                outcome = "ok"
            except ModelTooLarge as error:
                if self._forward_to_cloud(inbound, request, too_large=True):
                    outcome = "forwarded"
                    return
                outcome = error.name
                self.count(f"error_{error.name}")
                reply = error_reply(request.id if request else None, error)
            except RequestError as error:
                outcome = error.name
                self.count(f"error_{error.name}")
                reply = error_reply(request.id if request else None, error)
                refused_topic = isinstance(error, ResponseTopicRefused)
                if refused_topic:
                    self.audit.record(
                        "response_topic_refused", client_id=inbound.client_id, topic=inbound.response_topic,
                        reason=error.message,
                    )  # fmt: skip
                if refused_topic or request is None:
                    self._reply(inbound, reply, to_default_topic=refused_topic)
                    return
            if request.is_notification:
                self._finish(inbound.mid, inbound.qos, inbound.generation)
                return
            if outcome == "ok":
                self.count("ok")
            payload = self._encode(inbound, reply)
            if payload is None:
                return
            cache_key = (inbound.client_id, request.id, digest) if outcome == "ok" else None
            if self.upstream is None or not self.upstream.records(request.method):
                self._deliver(inbound, payload, cache_key)
                return
            # The client is answered only once the upstream copy is on disk; the worker does not wait for
            # that commit, so many replies share one fsync (group commit).
            with self._idle:
                self._awaiting_commit += 1
            stored = self.upstream.record_response(inbound.client_id, request.method, payload)
            stored.add_done_callback(lambda _: self._deliver(inbound, payload, cache_key, committed=True))
        finally:
            self._observe(inbound, request, outcome, timing)

    def _observe(self, inbound: InboundRequest, request: Request | None, outcome: str, timing: Timing) -> None:
        if self.metrics is None:
            return
        self.metrics.observe_request(
            method=request.method if request is not None else None,
            model=_model_of(request),
            outcome=outcome,
            queue_s=timing.started - inbound.received,
            inference_s=timing.inference_ms / 1000 if timing.inference_ms else None,
            total_s=time.monotonic() - inbound.received,
        )

    def _forward_to_cloud(self, inbound: InboundRequest, request: Request | None, *, too_large: bool) -> bool:
        """Hand a request this device should not serve to the cloud; True once it is durably forwarded."""
        if self.fallback is None or request is None:
            return False
        if not self.fallback.wants(request, set(self.models.servable_ids), too_large=too_large):
            return False
        params = validate_params(InferParams, request.params)
        self.fallback.forward(inbound.client_id, request, params, inbound)
        self._finish(inbound.mid, inbound.qos, inbound.generation)
        return True

    def _check_response_topic(self, inbound: InboundRequest) -> None:
        limits = self.settings.limits
        if inbound.response_topic is not None and not topics.response_topic_allowed(
            inbound.response_topic, self.device_id, inbound.client_id, limits.max_response_topic_bytes
        ):
            self.count("response_topic_refused")
            raise ResponseTopicRefused(
                f"response topic must be {topics.reply_topic(self.device_id, inbound.client_id)} or below it, "
                f"without wildcards, at most {limits.max_response_topic_bytes} bytes"
            )
        if inbound.correlation_data is not None and len(inbound.correlation_data) > limits.max_correlation_data_bytes:
            self.count("response_topic_refused")
            raise ResponseTopicRefused(
                f"correlation data of {len(inbound.correlation_data)} bytes exceeds {limits.max_correlation_data_bytes}"
            )

    # ---- replies and acknowledgements -----------------------------------------------------------

    def _reply(self, inbound: InboundRequest, reply: dict[str, Any], *, to_default_topic: bool = False) -> None:
        """Sign and publish a reply (one that gets no upstream copy)."""
        payload = self._encode(inbound, reply)
        if payload is not None:
            self._send(inbound, payload, to_default_topic=to_default_topic)

    def _encode(self, inbound: InboundRequest, reply: dict[str, Any]) -> bytes | None:
        """The signed reply bytes; None (request acknowledged, nothing sent) if signing failed."""
        try:
            return encode_reply(reply, self.signer, client_id=inbound.client_id, request_payload=inbound.payload)
        except SigningError as exc:
            # An unsigned answer would break the promise that every answer is signed; the client times out.
            log.error("could not sign the reply to %s, not answering: %s", inbound.client_id, exc)
            self.count("signing_failed")
            self._finish(inbound.mid, inbound.qos, inbound.generation)
            return None

    def _deliver(
        self, inbound: InboundRequest, payload: bytes, cache_key: tuple[str, RequestId, bytes] | None, *, committed: bool = False
    ) -> None:
        """Publish a served request's reply and remember it for repeats (runs on the outbox writer after a commit)."""
        if self._send(inbound, payload) and cache_key is not None:
            self.replies.store(*cache_key, payload)
        if committed:
            with self._idle:
                self._awaiting_commit -= 1
                self._idle.notify_all()

    def _send(self, inbound: InboundRequest, payload: bytes, *, to_default_topic: bool = False) -> bool:
        """Publish an encoded reply where ``inbound`` asked for it; acknowledges the request on PUBACK."""
        use_response_topic = inbound.response_topic is not None and not to_default_topic
        topic = inbound.response_topic if use_response_topic else topics.reply_topic(self.device_id, inbound.client_id)
        props = publish_properties(correlation_data=inbound.correlation_data if use_response_topic else None)
        pending = _PendingReply(inbound.mid, inbound.qos, inbound.generation) if inbound.qos > 0 else None
        if not self._publish_tracked(topic, payload, pending, properties=props):
            self._finish(inbound.mid, inbound.qos, inbound.generation)
            return False
        return True

    def _publish_tracked(
        self, topic: str, payload: bytes | str, pending: _PendingReply | None, *, retain: bool = False, properties: Any = None
    ) -> bool:
        """Publish at QoS 1; ``pending`` (a request to acknowledge) is finished when the broker's PUBACK arrives.

        Every QoS 1 publish goes through here so that each PUBACK finds its message id registered, even when
        it arrives before ``publish()`` has returned.
        """
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error("could not publish to %s: %s", topic, mqtt.error_string(info.rc))
            return False
        with self._publish_lock:
            acknowledged_already = info.mid in self._early_pubacks
            if acknowledged_already:
                self._early_pubacks.discard(info.mid)
            else:
                self._awaiting_puback[info.mid] = pending
        if acknowledged_already and pending is not None:
            self._finish(pending.mid, pending.qos, pending.generation)
        return True

    def _finish(self, mid: int, qos: int, generation: int) -> None:
        if qos > 0:
            self._acks.done(mid, generation)


def _model_of(request: Request | None) -> str | None:
    """The model a request names (``infer``: ``model``, ``tools/call``: ``name``), for metrics labels."""
    if request is None or not isinstance(request.params, dict):
        return None
    model = request.params.get("name" if request.method == "tools/call" else "model")
    return model if isinstance(model, str) else None


def _probe_request_id(payload: bytes) -> RequestId:
    """Best-effort id of a request that will not be parsed further, so the overload reply correlates.

    Runs on the network thread under overload, so it must stay cheap: an ``"id"`` member near the start
    (where clients put it) is read directly; otherwise only a small payload is parsed whole.
    """
    head = _LEADING_ID.match(payload[:_ID_PROBE_HEAD_BYTES])
    if head is not None:
        try:
            request_id = json.loads(head.group(1))
        except ValueError:
            return None
    elif len(payload) <= _ID_PROBE_MAX_BYTES:
        try:
            document = json.loads(payload)
        except ValueError:
            return None
        request_id = document.get("id") if isinstance(document, dict) else None
    else:
        return None
    return request_id if isinstance(request_id, (str, int)) and not isinstance(request_id, bool) else None
