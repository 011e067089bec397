"""Prometheus metrics on ``[metrics] host:port`` (default 127.0.0.1:9108), served off the request path.

The request path only increments counters and observes histograms (a lock and an add each). Everything
else — intake depth, outbox figures, cloud link state, peak memory — is read by a collector when
Prometheus scrapes, on the HTTP server's own thread. The registry is the agent's own, not the library's
global one, so two agents in one process (tests) do not collide.

Label values a client controls are bounded: a method or model the agent does not know is counted as
``other``, so a client cannot create series at will.

Series (all prefixed ``edge_agent_``):

* ``requests_total{method,model,outcome}``: requests answered by a worker; ``outcome`` is ``ok``,
  ``replayed`` or the JSON-RPC error name.
* ``request_duration_seconds{stage}``: histograms of ``queue`` (arrival to a worker), ``inference`` and
  ``total`` (arrival to the reply handed to the broker).
* ``requests_rejected_total{reason}``: refused without being served: ``buffer_full`` (shed from the
  client holding the most of a full intake), ``memory`` (over the soft limit), ``deadline`` (its deadline
  is earlier than the expected wait), ``rate_limited_client`` / ``rate_limited_global`` (the optional hard
  caps), ``oversized``.
* ``intake_depth`` (requests waiting), ``intake_bytes``, ``intake_expected_wait_seconds`` (for a request
  from a new client now); ``outbox_messages``, ``outbox_bytes``, ``outbox_oldest_age_seconds``,
  ``outbox_dead_messages``, ``outbox_dropped_total{reason,cls}``, ``outbox_delivered_total``,
  ``outbox_degraded`` (1 while new upstream records cannot be stored: disk full, or the file cannot be opened),
  ``outbox_write_errors_total``, ``outbox_corruption_events_total``;
  ``cloud_link_state{state}`` (1 for the current state).
* ``model_loads_total{model}``, ``model_evictions_total{model}``.
* ``internal_errors_total{where}``: exceptions nothing expected, caught where a thread or callback would
  have died (a fixed set of places, :data:`agent.faults.WHERE`); each cost at most one request its answer.
* ``process_peak_resident_memory_bytes`` (VmHWM) beside the standard ``process_*`` series (RSS, CPU,
  file descriptors, start time); ``signing_info{backend,mode}``; ``build_info{version,runtime,profile}``;
  ``model_accelerator{model,accelerator}`` (1 per loaded model: cpu, gpu, gpu+cpu, delegate:<library>).
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
from collections.abc import Callable, Collection, Iterator
from typing import Any, Literal
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.errors import AgentError
from agent.faults import INTERNAL_ERRORS
from agent.observe.health import Probes, read_process_memory

log = logging.getLogger(__name__)

PREFIX = "edge_agent"
# From a tenth of a millisecond (a cached replay, a tiny model) to ten seconds (a large model on a Pi).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
CLOUD_STATES = ("connected", "disconnected", "backoff")
Rejection = Literal["buffer_full", "memory", "deadline", "rate_limited_client", "rate_limited_global", "oversized"]
REJECTIONS: tuple[Rejection, ...] = (
    "buffer_full", "memory", "deadline", "rate_limited_client", "rate_limited_global", "oversized"
)
OTHER = "other"
NONE = "none"


class AgentMetrics:
    """The agent's metrics registry and the calls the request path makes to update it."""

    def __init__(
        self,
        probes: Probes,
        *,
        methods: Collection[str],
        models: Callable[[], Collection[str]],
        signing_backend: str,
        signing_mode: str,
        version: str,
        runtime: str,
        profile: str,
    ) -> None:
        self.registry = CollectorRegistry()
        self._methods = frozenset(methods)
        self._models = models
        self.requests = Counter(
            f"{PREFIX}_requests", "Requests answered", ["method", "model", "outcome"], registry=self.registry
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Request latency by stage: queue, inference, total",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # labels() takes a lock and builds a key on every call; the request path reuses the children.
        self._stage_durations = {stage: self.duration.labels(stage) for stage in ("queue", "inference", "total")}
        self._request_counts: dict[tuple[str, str, str], Any] = {}
        self.rejected = Counter(
            f"{PREFIX}_requests_rejected", "Requests refused on arrival, never queued", ["reason"], registry=self.registry
        )
        for reason in REJECTIONS:
            self.rejected.labels(reason)
        self.model_loads = Counter(f"{PREFIX}_model_loads", "Models loaded", ["model"], registry=self.registry)
        self.model_evictions = Counter(
            f"{PREFIX}_model_evictions", "Models unloaded to make room", ["model"], registry=self.registry
        )
        Info(f"{PREFIX}_signing", "How published messages are signed", registry=self.registry).info(
            {"backend": signing_backend, "mode": signing_mode}
        )
        Info(f"{PREFIX}_build", "Agent version, inference runtime and hardware profile", registry=self.registry).info(
            {"version": version, "runtime": runtime, "profile": profile}
        )
        ProcessCollector(registry=self.registry)
        self.registry.register(LiveCollector(probes))

    def observe_request(
        self,
        *,
        method: str | None,
        model: str | None,
        outcome: str,
        queue_s: float | None = None,
        inference_s: float | None = None,
        total_s: float | None = None,
    ) -> None:
        """Count one answered request and its latencies (None for a stage it did not reach)."""
        key = (self._method_label(method), self._model_label(model), outcome)
        counter = self._request_counts.get(key)
        if counter is None:
            counter = self._request_counts.setdefault(key, self.requests.labels(*key))
        counter.inc()
        for stage, seconds in (("queue", queue_s), ("inference", inference_s), ("total", total_s)):
            if seconds is not None:
                self._stage_durations[stage].observe(seconds)

    def count_rejection(self, reason: Rejection) -> None:
        """Count one request refused on arrival (network thread)."""
        self.rejected.labels(reason).inc()

    def model_loaded(self, model_id: str) -> None:
        self.model_loads.labels(self._model_label(model_id)).inc()

    def model_evicted(self, model_id: str) -> None:
        self.model_evictions.labels(self._model_label(model_id)).inc()

    def _method_label(self, method: str | None) -> str:
        if method is None:
            return NONE
        return method if method in self._methods else OTHER

    def _model_label(self, model: str | None) -> str:
        if model is None:
            return NONE
        return model if model in self._models() else OTHER


class LiveCollector:
    """Readings taken at scrape time from the agent's :class:`~agent.health.Probes`."""

    def __init__(self, probes: Probes) -> None:
        self.probes = probes

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(f"{PREFIX}_intake_depth", "Requests waiting for a worker", value=self.probes.intake_depth())
        if self.probes.intake_bytes is not None:
            yield GaugeMetricFamily(f"{PREFIX}_intake_bytes", "Bytes held by waiting requests", value=self.probes.intake_bytes())
        if self.probes.expected_wait_s is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_intake_expected_wait_seconds", "Expected wait of a new client's request",
                value=self.probes.expected_wait_s(),
            )  # fmt: skip
        memory = read_process_memory()
        if memory is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_process_peak_resident_memory_bytes", "Peak resident memory (VmHWM)", value=memory.peak_rss_bytes
            )
        internal = CounterMetricFamily(
            f"{PREFIX}_internal_errors", "Unexpected exceptions caught at a thread's boundary", labels=["where"]
        )
        for where, count in INTERNAL_ERRORS.counts().items():
            internal.add_metric([where], count)
        yield internal
        outbox = self.probes.read_outbox()
        if outbox is not None:
            yield GaugeMetricFamily(f"{PREFIX}_outbox_messages", "Messages waiting in the outbox", value=outbox.messages)
            yield GaugeMetricFamily(f"{PREFIX}_outbox_bytes", "Body bytes waiting in the outbox", value=outbox.bytes)
            yield GaugeMetricFamily(
                f"{PREFIX}_outbox_dead_messages", "Outbox messages refused by the cloud", value=outbox.dead
            )
            if outbox.oldest_age_s is not None:
                yield GaugeMetricFamily(
                    f"{PREFIX}_outbox_oldest_age_seconds", "Age of the oldest waiting message", value=outbox.oldest_age_s
                )
            dropped = CounterMetricFamily(
                f"{PREFIX}_outbox_dropped", "Outbox messages dropped, by reason and class", labels=["reason", "cls"]
            )
            for reason, by_class in outbox.drops.items():
                for cls, count in by_class.items():
                    dropped.add_metric([reason, cls], count)
            yield dropped
            yield CounterMetricFamily(
                f"{PREFIX}_outbox_delivered", "Outbox messages acknowledged by the cloud", value=outbox.delivered
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_outbox_degraded",
                "1 while the outbox cannot store new messages (disk full, or it cannot be opened); local answers go on",
                value=int(outbox.problem is not None),
            )
            yield CounterMetricFamily(
                f"{PREFIX}_outbox_write_errors", "Outbox write transactions that failed", value=outbox.write_errors
            )
            yield CounterMetricFamily(
                f"{PREFIX}_outbox_corruption_events",
                "Corrupt outbox files moved aside and salvaged, ever",
                value=outbox.corruption_events,
            )
        if self.probes.model_accelerators is not None:
            accelerators = GaugeMetricFamily(
                f"{PREFIX}_model_accelerator", "What each loaded model runs on (1: in use)", labels=["model", "accelerator"]
            )
            for model_id, accelerator in self.probes.model_accelerators().items():
                accelerators.add_metric([model_id, accelerator], 1.0)
            yield accelerators
        if self.probes.cloud_state is not None:
            current = self.probes.cloud_state()
            state = GaugeMetricFamily(f"{PREFIX}_cloud_link_state", "Cloud link state (1: current)", labels=["state"])
            for name in dict.fromkeys((*CLOUD_STATES, current)):
                state.add_metric([name], 1.0 if name == current else 0.0)
            yield state


class _QuietHandler(WSGIRequestHandler):
    """Logs nothing per request: a scraper every few seconds would flood the journal."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's parameter name)
        pass


class BoundedWSGIServer(WSGIServer):
    """A WSGI server with a thread per connection, at most ``max_connections`` of them at once.

    prometheus_client's own server starts a thread per connection without a cap: idle or half-open
    connections could take every file descriptor, and then the agent could not even reconnect to its broker.
    Here a connection beyond the cap is closed as soon as it is accepted, and a connection that sends nothing
    for ``timeout_s`` is dropped, so a scraper that comes back finds a free slot.
    """

    # socketserver's listen backlog of 5 made the sixth of a burst of connections wait for the kernel's SYN
    # retry (1 s, then 3 s, ...) before it was even accepted, let alone refused.
    request_queue_size = 128

    def __init__(self, host: str, port: int, *, max_connections: int, timeout_s: float) -> None:
        # Set before binding: TCPServer.__init__ creates the socket from it.
        self.address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self._slots = threading.BoundedSemaphore(max_connections)
        self._timeout_s = timeout_s
        super().__init__((host, port), _QuietHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve ``request`` on its own thread if a slot is free, else close it at once (accept thread)."""
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        request.settimeout(self._timeout_s)
        try:
            threading.Thread(
                target=self._serve_one, args=(request, client_address), name="metrics-http-connection", daemon=True
            ).start()
        except RuntimeError:  # no thread to be had: give the slot back rather than leak it
            self._slots.release()
            self.shutdown_request(request)

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except OSError as exc:  # the scraper went away mid-answer
            log.debug("metrics connection from %s ended: %s", client_address, exc)
        finally:
            self.shutdown_request(request)
            self._slots.release()


class MetricsServer:
    """Serves a registry at ``/metrics`` over HTTP from a daemon thread; ``start()``, then ``stop()``."""

    def __init__(
        self, registry: CollectorRegistry, host: str, port: int, *, max_connections: int = 8, timeout_s: float = 10.0
    ) -> None:
        self.registry = registry
        self.host = host
        self._requested_port = port
        self._max_connections = max_connections
        self._timeout_s = timeout_s
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None  # (the serving thread's end, stop()'s end)

    @property
    def port(self) -> int:
        """The port being served (the one chosen by the system when configured as 0)."""
        if self._server is None:
            raise AgentError("the metrics server is not running")
        return int(self._server.server_port)

    def start(self) -> None:
        """Bind and serve; raises :class:`AgentError` if the address cannot be bound."""
        try:
            server = BoundedWSGIServer(
                self.host, self._requested_port, max_connections=self._max_connections, timeout_s=self._timeout_s
            )
        except OSError as exc:
            raise AgentError(f"cannot serve metrics on {self.host}:{self._requested_port}: {exc.strerror or exc}") from None
        server.set_app(make_wsgi_app(self.registry))
        self._server = server
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, args=(server, self._wake[0]), name="metrics-http", daemon=True)
        self._thread.start()
        log.info("serving metrics on http://%s:%d/metrics", self.host, self.port)

    @staticmethod
    def _serve(server: WSGIServer, wake: socket.socket) -> None:
        """Accept connections until ``wake`` is readable.

        socketserver's ``serve_forever`` looks for its shutdown flag only between polls (every 0.5 s), and
        ``shutdown()`` waits for the next one: every stop of the agent (SIGTERM, a restart) took that long.
        """
        with selectors.DefaultSelector() as selector:
            selector.register(server.socket, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if wake in ready:
                    return
                server.handle_request()  # the listening socket is readable: accepts without waiting

    def stop(self) -> None:
        """Stop serving and close the socket; scrapes in progress finish on their own threads."""
        if self._server is None:
            return
        assert self._wake is not None and self._thread is not None
        self._wake[1].send(b"x")
        self._thread.join()
        self._server.server_close()
        for end in self._wake:
            end.close()
        self._server = self._thread = self._wake = None
