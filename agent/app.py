"""The running agent: wires config, models, the request service and the local MQTT link; owns start and stop.

Threads: paho's network thread sorts incoming messages (:mod:`agent.local_link`); ``workers`` threads
parse, run, sign and reply (:mod:`agent.serving`); the outbox writer publishes replies once their upstream
copy is committed; watchdogs, the uplink and the metrics server run beside them. This module builds them
all and owns start, stop and the retained status.

Every message is signed when ``[signing]`` names a backend (docs/signing.md): replies as they are
published, the status document at start (and, when messages reference the delegation certificate by
thumbprint, again at each rotation), the Last Will by the device key at start.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections import Counter
from dataclasses import replace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sdnotify import SystemdNotifier

from agent import __version__, topics
from agent.audit import AuditEvent, AuditTrail
from agent.config import Settings
from agent.errors import (
    AgentError,
    SigningError,
)
from agent.fallback import CloudFallback
from agent.health import Probes, collect_health
from agent.inference import RUNTIME
from agent.local_link import OFFLINE, InboundRequest, LocalLinkMixin, PendingReply
from agent.memory import MemoryWatchdog, memory_cgroup_report
from agent.metrics import AgentMetrics, MetricsServer
from agent.model_manager import ModelManager
from agent.model_watch import ModelWatcher
from agent.outgoing import encode_record
from agent.ratelimit import RateLimiter
from agent.replay import ReplayCache
from agent.service import RequestService
from agent.serving import RequestServingMixin
from agent.signing import Signer, StrictSigner, create_signer
from agent.transport import (
    AckSequencer,
    configure_broker_access,
    connect_properties,
    new_client,
)
from agent.upstream import Upstream

log = logging.getLogger(__name__)


class Agent(RequestServingMixin, LocalLinkMixin):
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
        # How many refusals each client is answered (LocalLinkMixin._refuse_rate_limited says why).
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
        self._awaiting_puback: dict[int, PendingReply | None] = {}
        self._early_pubacks: set[int] = set()
        self._in_flight = 0  # requests queued for a worker or being served
        signing = settings.signing
        # Strict TPM signing costs a TPM operation per reply: too slow for the network thread.
        self._inline_allowed = settings.limits.inline_max_ms > 0 and not (
            signing.backend == "tpm" and signing.mode == "strict"
        )
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

