"""The running agent: builds every component, starts and stops them in order (the retained status: agent/status.py).

Components and the threads each owns:
- :class:`~agent.mqtt.local_link.LocalLink`: the paho client and its network thread (where requests arrive);
- :class:`~agent.serving.dispatcher.Dispatcher`: the intake queue and the ``inference-worker-N`` threads,
  running each request through the :class:`~agent.serving.pipeline.RequestPipeline`;
- :class:`~agent.upstream.upstream.Upstream`: the outbox writer and the cloud uplink;
  :class:`~agent.serving.fallback.CloudFallback` its expiry thread;
- the model manager's watcher, the memory watchdog and the audit trail;
- :class:`~agent.monitoring.Monitoring`: health readings, the metrics server and systemd's watchdog.
This module knows the concrete classes; they know each other only through what is passed to them here.

Every message is signed when ``[signing]`` names a backend (docs/signing.md): replies as they are
published, the status document at start (and, when messages reference the delegation certificate by
thumbprint, again at each rotation), the Last Will by the device key at start.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from cryptography import x509

from agent import __version__
from agent.config import Settings
from agent.errors import DeployError, SigningError
from agent.exchange import InboundRequest
from agent.models.manager import ModelManager
from agent.models.watcher import ModelWatcher
from agent.monitoring import Monitoring
from agent.mqtt import topics
from agent.mqtt.local_link import LocalLink
from agent.observe.audit import AuditEvent, AuditTrail
from agent.observe.memory import MemoryWatchdog, memory_cgroup_report
from agent.observe.metrics import AgentMetrics
from agent.serving.admission import Admission
from agent.serving.dispatcher import Dispatcher
from agent.serving.pipeline import RequestPipeline
from agent.serving.replay import ReplayCache
from agent.serving.service import RequestService
from agent.signing import DelegatedSigner, Signer, create_signer
from agent.status import RetainedStatus, delegation_certificate_event
from agent.upstream.outbox import Outbox
from agent.upstream.upstream import Upstream, open_outbox

if TYPE_CHECKING:
    from agent.deploy.service import Deployments
    from agent.serving.fallback import CloudFallback

log = logging.getLogger(__name__)


class Agent:
    """One agent process's worth of components; ``start()``, then ``stop()`` (or ``run_until_signalled()``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        self.counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self.models = ModelManager.for_limits(
            settings.models_dir, settings.limits, settings.inference, state_dir=settings.data_dir
        )
        self.models.on_event = self._on_model_event
        self.memory_watchdog = MemoryWatchdog(settings.limits.process_soft_limit_mb, relieve=self.models.unload_idle)
        self.model_watcher = ModelWatcher(self.models, settings.models_poll_s) if settings.models_poll_s > 0 else None
        self.service = RequestService(self.models, settings.limits, device_id=self.device_id, profile=settings.profile)
        self.replies = ReplayCache(settings.replay)
        self.audit = AuditTrail(self.device_id, self._send_audit_upstream)
        self.link = LocalLink(
            settings.local,
            self.device_id,
            receive_maximum=settings.limits.receive_maximum,
            max_packet_bytes=settings.limits.max_packet_bytes,
            on_connected=lambda: self.status.publish(),
            count=self.count,
        )
        # Built by start(), once the signer is open and the outbox exists.
        self.signer: Signer | None = None
        self.upstream: Upstream | None = None
        self.fallback: CloudFallback | None = None
        self.deployments: Deployments | None = None
        self.dispatcher: Dispatcher | None = None
        self.monitoring = Monitoring(settings, self.models, self.service)
        self.started_at = time.time()
        self._stopped = threading.Event()
        self.status = RetainedStatus(self.device_id, self.link, self.status_document)

    def count(self, name: str, amount: int = 1) -> None:
        """Add to a named event counter (reported in the status, telemetry and the stop log)."""
        with self._counter_lock:
            self.counters[name] += amount

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self, ready_timeout: float = 30.0) -> None:
        """Open the signing key, verify models, start workers, connect and subscribe; returns once serving.

        An unusable signing key raises :class:`SigningError` before anything connects: the agent never
        comes online with unsigned answers.
        """
        # The key opens on its own thread while the model files are hashed, pinned models load and the outbox
        # opens: the TPM's round trips (milliseconds on swtpm, far more on a chip) overlap them and SQLite's
        # fsyncs. A key error is raised first, as if the key had opened first.
        opening: Future[Signer | None] = Future()
        threading.Thread(target=self._open_signer, args=(opening,), name="signer-open", daemon=True).start()
        outbox: Outbox | None = None
        try:
            try:
                refused = self.models.verify_all()
                for model_id, reason in refused.items():
                    log.error("model %s will answer with errors: %s", model_id, reason)
                self.models.load_pinned()
                if self.settings.inference.required:
                    self.models.load_accelerated()
                # Nothing is stored in it before the key is open.
                outbox = open_outbox(self.settings) if self.settings.cloud is not None else None
            finally:
                self.signer = opening.result()
            self.status.sign_first(self.signer)
        except BaseException:
            if outbox is not None:
                outbox.close()
            if self.signer is not None:
                self.signer.close()
            raise
        cgroup = memory_cgroup_report()
        log.log(logging.WARNING if cgroup.controller_enabled is False else logging.INFO, "memory: %s", cgroup.describe())
        self.memory_watchdog.start()
        if self.model_watcher is not None:
            self.model_watcher.start()
        self.service.router.streams.start()
        self._start_upstream(outbox)
        dispatcher = self.dispatcher = self._build_dispatcher()
        dispatcher.start()
        self.monitoring.build(dispatcher, self.upstream, self.signer, self.deployments)
        self.status.refresh()  # now with health figures; not yet connected, so only signed
        self.monitoring.serve()
        try:
            self.link.start(dispatcher, ready_timeout)
        except BaseException:
            self.stop()
            raise
        local = self.settings.local
        log.info(
            "serving device %s on %s:%d with %d workers, models: %s",
            self.device_id, local.host, local.port, dispatcher.worker_count,
            ", ".join(self.models.servable_ids) or "none",
        )  # fmt: skip

    def _build_dispatcher(self) -> Dispatcher:
        settings = self.settings
        pipeline = RequestPipeline(
            device_id=self.device_id,
            limits=settings.limits,
            service=self.service,
            replies=self.replies,
            signer=self.signer,
            upstream=self.upstream,
            fallback=self.fallback,
            audit=self.audit,
            count=self.count,
            observe=self.monitoring.observe_request,
        )
        admission = Admission(
            settings.limits,
            settings.rate_limit,
            self.memory_watchdog,
            self.audit,
            count=self.count,
            count_rejection=self.monitoring.count_rejection,
        )
        signing = settings.signing
        return Dispatcher(
            settings.limits,
            pipeline,
            admission,
            self.link,
            runs_within=self.models.runs_within,
            unread_bytes=self.link.unread_bytes,
            # Strict TPM signing costs a TPM operation per reply: too slow for the network thread.
            inline_allowed=not (signing.backend == "tpm" and signing.mode == "strict"),
            count=self.count,
            count_rejection=self.monitoring.count_rejection,
            arrivals=self.service.router.streams.order,
        )

    def stop(self) -> None:
        """Graceful stop: stop taking requests, finish those in flight, publish offline, disconnect."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.link.stop_accepting()
        deadline = time.monotonic() + self.settings.limits.drain_timeout_s
        if self.dispatcher is not None:
            self.dispatcher.drain(deadline)
        self.link.wait_published(deadline)
        if self.dispatcher is not None:
            self.dispatcher.stop()
        if self.model_watcher is not None:
            self.model_watcher.stop()
        self.service.router.streams.stop()
        self.memory_watchdog.stop()
        if self.fallback is not None:
            self.fallback.stop()
        if self.deployments is not None:
            self.deployments.stop()
        self.audit.close()  # its queued events reach the outbox before it closes
        if self.upstream is not None:
            self.upstream.stop()
        self.monitoring.stop()
        self.link.close(self.status.offline_message())
        if self.signer is not None:
            self.signer.close()
        log.info("stopped; counters: %s", dict(self.counters))

    def _start_upstream(self, outbox: Outbox | None) -> None:
        cloud = self.settings.cloud
        if cloud is None or outbox is None:  # the outbox is open exactly when there is a [cloud]
            log.warning("no [cloud] section: running local-only, nothing is recorded or sent upstream")
            return
        upstream = self.upstream = Upstream(self.settings, self.signer, self.count, outbox)
        # Replies whose upstream copies one commit made durable are published together from its callbacks.
        upstream.outbox.run_callbacks_within(self.link.publishing_together)
        # Its corruption events reach the audit trail, those found while opening too (replayed now).
        upstream.outbox.add_corruption_listener(
            lambda event: self.audit.record("outbox_corrupt", **event.model_dump(mode="json"))
        )
        if cloud.fallback_models:
            from agent.serving.fallback import CloudFallback  # only with fallback models: not on every start

            self.fallback = CloudFallback(
                cloud.fallback_models,
                enqueue=lambda body, ttl_s: upstream.enqueue("fallback", body, ttl_s=ttl_s),
                relay=self._relay_cloud_answer,
                count=self.count,
                max_pending_bytes=cloud.fallback_max_pending_bytes,
                max_answer_bytes=cloud.fallback_max_answer_bytes,
            )
            upstream.subscribe(topics.cloud_reply_topic(self.device_id), self.fallback.on_cloud_message)
        if self.settings.deploy.trusted_keys:
            self._build_deployments(upstream)
        upstream.start()
        if self.deployments is not None:
            self.deployments.start()
        if self.status.certificate_pem is not None and isinstance(self.signer, DelegatedSigner):
            self._send_certificate_upstream(self.signer.certificate)
        log.info("cloud link to %s:%d; outbox at %s", cloud.host, cloud.port, upstream.outbox.path)

    def _build_deployments(self, upstream: Upstream) -> None:
        # Imported here: without [deploy] trusted_keys (the default) the deploy package's modules and pydantic
        # documents would cost every start about 20 ms of CPU and 1 MB for nothing.
        from agent.deploy.service import Deployments, disabled_reason

        off = disabled_reason(self.settings)
        if off is not None:
            log.error("%s", off)
            return
        try:
            self.deployments = Deployments(
                self.settings, upstream, self.models, on_change=lambda: self.refresh_status(telemetry=False)
            )
        except DeployError as exc:  # a bad key must not keep the device from serving what it has
            log.error("deployments are off: %s", exc)

    @property
    def metrics(self) -> AgentMetrics | None:
        """The metrics registry's owner, once started."""
        return self.monitoring.metrics

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on, None when it is not served."""
        return self.monitoring.port

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

    def refresh_status(self, telemetry: bool = True) -> None:
        """Re-sign the retained status with fresh health figures and publish it; send the same upstream."""
        if self.upstream is not None and telemetry:
            health = self.status_document().get("health")
            self.upstream.enqueue("telemetry", {"health": health, "counters": dict(self.counters)})
        self.status.refresh()

    def _relay_cloud_answer(self, inbound: InboundRequest, reply: dict[str, Any]) -> None:
        if self.dispatcher is not None:
            self.dispatcher.relay(inbound, reply)

    def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully."""
        stop_requested = threading.Event()

        def request_stop(signum: int, frame: Any) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            stop_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        self.monitoring.watch_until(stop_requested, self.threads_alive, self.refresh_status)
        self.stop()

    def threads_alive(self) -> bool:
        """Whether the MQTT network thread and every inference worker are still running."""
        return self.link.network_thread_alive() and self.dispatcher is not None and self.dispatcher.workers_alive()

    def status_document(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "status": "online",
            "device_id": self.device_id,
            "version": __version__,
            "runtime": self.models.runtime.name,
            "profile": self.settings.profile,
            "models": self.models.servable_ids,
            "accelerators": self.models.accelerators_in_use(),
            "started_at": round(self.started_at, 3),
        }
        health = self.monitoring.health()
        if health is not None:
            document["health"] = health
        if self.deployments is not None:
            document["deployments"] = self.deployments.status()
        return document

    # ---- signing ------------------------------------------------------------------------------

    def _open_signer(self, opening: Future[Signer | None]) -> None:
        signing = self.settings.signing
        by_reference = signing.mode == "delegated" and signing.certificate_header == "x5t#S256"
        try:
            signer = create_signer(
                signing,
                self.device_id,
                self.settings.data_dir,
                on_rotate=self._on_certificate_rotated if by_reference else self._audit_rotation,
            )
        except SigningError as exc:
            opening.set_exception(
                SigningError(f"signing backend {signing.backend!r} is unusable, not starting: {exc}")
            )
        except BaseException as exc:
            opening.set_exception(exc)
        else:
            opening.set_result(signer)

    def _on_certificate_rotated(self, certificate: x509.Certificate) -> None:
        """A new delegated key whose messages name their certificate by thumbprint: audit it, retain it,
        re-sign the status and send the certificate upstream. Runs on whichever thread rotated: the one
        creating the signer, the rotation thread, or a worker whose message outlived the certificate."""
        self._audit_rotation(certificate)
        self.status.certificate_rotated(certificate)
        self._send_certificate_upstream(certificate)

    def _send_certificate_upstream(self, certificate: x509.Certificate) -> None:
        """Queue the certificate durably for the cloud (an audit record; classes are sent in their own order, so
        the cloud may see records signed with the key first). At each rotation and once the outbox exists."""
        if self.upstream is not None and not self._stopped.is_set():
            event = delegation_certificate_event(self.device_id, certificate)
            self.upstream.enqueue("audit", event.model_dump(mode="json", exclude={"device_id"}))

    def _audit_rotation(self, certificate: x509.Certificate) -> None:
        self.audit.record(
            "signing_key_rotated",
            serial=format(certificate.serial_number, "x"),
            not_after=certificate.not_valid_after_utc.isoformat(),
        )
