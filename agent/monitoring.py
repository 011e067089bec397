"""The running agent as watched from outside: health readings, Prometheus metrics and ``/metrics``, systemd.

:class:`Monitoring` is built with the agent (requests and rejections are counted from the first one), reads
the components through :class:`~agent.observe.health.Probes` once the dispatcher exists, serves the registry
over HTTP when ``[metrics] enabled``, and while the agent serves feeds systemd's watchdog and refreshes the
status on ``[metrics] health_interval_s``. :mod:`agent.app` owns the order these happen in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sdnotify import SystemdNotifier

from agent import __version__
from agent.config import Settings
from agent.errors import AgentError
from agent.faults import HEARTBEATS, stall_limit_s
from agent.models.manager import ModelManager
from agent.observe.health import Probes, collect_health
from agent.observe.metrics import AgentMetrics, MetricsServer, Rejection
from agent.serving.dispatcher import Dispatcher
from agent.serving.service import RequestService
from agent.signing import Signer
from agent.upstream.upstream import Upstream

if TYPE_CHECKING:
    from agent.deploy.service import Deployments

# The name these lines had in agent/app.py, so filters and alerts on the agent's stall and /metrics logs keep matching.
log = logging.getLogger("agent.app")


class Monitoring:
    """Owns the health probes, the metrics registry and its HTTP server; feeds systemd's watchdog."""

    def __init__(self, settings: Settings, models: ModelManager, service: RequestService) -> None:
        self._settings = settings
        self._models = models
        self._service = service
        self._started_clock = time.monotonic()
        # Built by build(), once the dispatcher exists; until then nothing is observed.
        self.probes: Probes | None = None
        self.metrics: AgentMetrics | None = None
        self._server: MetricsServer | None = None

    def build(
        self, dispatcher: Dispatcher, upstream: Upstream | None, signer: Signer | None, deployments: Deployments | None
    ) -> None:
        """Health readings and the metrics registry over the started components (``/metrics`` is :meth:`serve`)."""
        self.probes = Probes(
            started=self._started_clock,
            intake_depth=dispatcher.queue_depth,
            intake_bytes=dispatcher.queued_bytes,
            expected_wait_s=dispatcher.expected_wait_s,
            outbox_stats=upstream.outbox.stats if upstream is not None else None,
            cloud_state=(lambda: upstream.uplink.state) if upstream is not None else None,
            model_accelerators=self._models.accelerators_in_use,
        )
        self.metrics = AgentMetrics(
            self.probes,
            methods=self._service.methods,
            models=lambda: self._models.servable_ids,
            signing_backend=self._settings.signing.backend,
            signing_mode=signer.mode if signer is not None else "none",
            version=__version__,
            runtime=self._models.runtime.name,
            profile=self._settings.profile,
        )
        if deployments is not None:
            self.metrics.registry.register(deployments.collector())

    def serve(self) -> None:
        """Start the ``/metrics`` HTTP server when enabled; a server that cannot start is logged, not raised."""
        config = self._settings.metrics
        if config.enabled and self.metrics is not None:
            server = MetricsServer(
                self.metrics.registry, config.host, config.port,
                max_connections=config.max_connections, timeout_s=config.connection_timeout_s,
            )  # fmt: skip
            try:
                server.start()
            except AgentError as exc:
                # Metrics are for watching the agent; failing to serve them must not stop it serving requests.
                log.error("%s; running without /metrics", exc)
            else:
                self._server = server

    def stop(self) -> None:
        """Stop serving ``/metrics``."""
        if self._server is not None:
            self._server.stop()

    @property
    def port(self) -> int | None:
        """The port /metrics is served on, None when it is not served."""
        return self._server.port if self._server is not None else None

    def health(self) -> dict[str, Any] | None:
        """The health figures the retained status carries, None before :meth:`build`."""
        return collect_health(self.probes).model_dump(mode="json") if self.probes is not None else None

    def observe_request(
        self, *, method: str | None, model: str | None, outcome: str, queue_s: float, inference_s: float | None,
        total_s: float,
    ) -> None:  # fmt: skip
        """Record one answered request's outcome and timings (the pipeline's ``observe``)."""
        if self.metrics is not None:
            self.metrics.observe_request(
                method=method, model=model, outcome=outcome, queue_s=queue_s, inference_s=inference_s, total_s=total_s
            )

    def count_rejection(self, reason: Rejection) -> None:
        """Count one request refused before it ran (admission's and the dispatcher's ``count_rejection``)."""
        if self.metrics is not None:
            self.metrics.count_rejection(reason)

    def watch_until(
        self, stop_requested: threading.Event, threads_alive: Callable[[], bool], refresh_status: Callable[[], None]
    ) -> None:
        """Tell systemd the agent is ready, then until ``stop_requested`` feed its watchdog and refresh the status
        every ``health_interval_s``; tell systemd the agent is stopping when it returns."""
        systemd = SystemdNotifier()
        systemd.notify(f"READY=1\nSTATUS=serving {len(self._models.servable_ids)} models")
        health_due = time.monotonic() + self._settings.metrics.health_interval_s
        stall_s = stall_limit_s()
        reported: list[str] = []
        while not stop_requested.wait(1.0):
            # The watchdog is fed only while every thread that serves requests is alive and no loop is
            # stuck in one round, so systemd restarts an agent that went deaf instead of leaving it so.
            stalled = HEARTBEATS.stalled(stall_s)
            if stalled != reported:
                reported = stalled
                if stalled:
                    log.error("stalled for over %.0f s: %s; no longer feeding the watchdog", stall_s, ", ".join(stalled))
                    systemd.notify(f"STATUS=stalled: {', '.join(stalled)}")
                else:
                    log.info("no loop is stalled any more; feeding the watchdog again")
                    systemd.notify("STATUS=serving")
            if not stalled and threads_alive():
                systemd.notify("WATCHDOG=1")
            if time.monotonic() >= health_due:
                health_due = time.monotonic() + self._settings.metrics.health_interval_s
                refresh_status()
        systemd.notify("STOPPING=1")
