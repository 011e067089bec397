"""One interpreter state per (model, client, stream) for stateful models.

A model holding resource variables (a streaming wake-word detector) computes each output from its previous
invocations, so sharing pooled interpreters between clients mixes their audio. Such a model gets one
interpreter of its own per stream (:meth:`~agent.models.inference.LoadedModel.open_state`, created fresh,
so its state starts from the model's initial values, and counted in the model's measured memory and hence
in the model budget). A stream's requests run one at a time, in the order they arrived (their monotonic
``received`` time), whichever worker serves them: a request first waits for its client's earlier requests
still on their way through the agent (:class:`ArrivalOrder`), then lines up in its stream's queue.

A stream ends when it has been idle ``idle_timeout_s``, when its client sends ``reset: true`` (it starts
over), and when the model version it ran on is no longer the one loaded (a model update, or an unload to
make room). The agent keeps no state across restarts. Each reply says whether its run started from a
fresh state, and why (:class:`StreamReport`).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from agent.errors import Overloaded
from agent.models.inference import LoadedModel
from agent.periodic import PeriodicTask

ResetReason = Literal["new", "requested", "expired", "model_updated", "model_reloaded"]
# Streams that ended by idling out, remembered so that their next request is told "expired", not "new".
EXPIRED_REMEMBERED = 1024
# How often idle streams are looked for when no stream request does it (their interpreters hold memory).
SWEEP_INTERVAL_S = 10.0


@dataclass(frozen=True)
class StreamReport:
    """What a reply says about its stream: its name, whether this run started from a fresh state and why,
    and how many runs the current state has seen (this one included)."""

    name: str
    reset: bool
    reason: ResetReason | None
    runs: int

    def as_result(self) -> dict[str, Any]:
        result: dict[str, Any] = {"id": self.name, "reset": self.reset, "runs": self.runs}
        if self.reason is not None:
            result["reason"] = self.reason
        return result


@dataclass(eq=False)
class _Stream:
    loaded: LoadedModel | None = None
    state: Any = None
    runs: int = 0
    last_used: float = 0.0
    busy: bool = False
    waiting: list[tuple[float, int]] = field(default_factory=list)  # (received, tiebreak), a heap


StreamKey = tuple[str, str, str]  # model id, client id, stream name


class ArrivalOrder:
    """Which requests of each client are being served and have not yet reached their place (a stream's queue,
    or a stateless model): a stream request waits for those that arrived before it, so two workers that
    took a client's consecutive requests cannot run them out of arrival order.

    The intake reports every request a worker takes (:meth:`taken`) and finishes (:meth:`finished`); the
    serving path reports when one has reached its place (:meth:`placed`). A request served inline on the
    network thread is never reported: it is only served so while nothing else is in flight.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[str, list[list[Any]]] = {}  # client -> [received, placed] of each taken request

    def taken(self, client_id: str, received: float) -> None:
        with self._cond:
            self._pending.setdefault(client_id, []).append([received, False])

    def placed(self, client_id: str, received: float) -> None:
        if client_id not in self._pending:
            # Nearly every request: served inline, or its client has nothing else taken. The request itself was
            # recorded by taken() before it ran, on this thread's side of the lock, so nothing is missed.
            return
        with self._cond:
            for request in self._pending.get(client_id, ()):
                if request[0] == received and not request[1]:
                    request[1] = True
                    self._cond.notify_all()
                    return

    def finished(self, client_id: str, received: float) -> None:
        with self._cond:
            requests = self._pending.get(client_id, [])
            for request in requests:
                if request[0] == received:
                    requests.remove(request)
                    if not requests:
                        del self._pending[client_id]
                    self._cond.notify_all()
                    return

    def wait_for_earlier(self, client_id: str, received: float) -> None:
        """Return once every request of ``client_id`` that arrived before ``received`` is placed or finished."""
        with self._cond:
            self._cond.wait_for(lambda: not any(
                earlier < received and not placed for earlier, placed in self._pending.get(client_id, ())
            ))


class StreamTable:
    """Every live stream of every stateful model; safe to use from every worker thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, order: ArrivalOrder | None = None) -> None:
        self._clock = clock
        self.order = order or ArrivalOrder()
        self._cond = threading.Condition()
        self._streams: dict[StreamKey, _Stream] = {}
        self._expired: OrderedDict[StreamKey, None] = OrderedDict()
        self._tiebreak = itertools.count()
        self._sweeper = PeriodicTask("stream-sweeper", "stream_sweeper", SWEEP_INTERVAL_S, self.sweep)

    def start(self) -> None:
        """Sweep idle streams every ``SWEEP_INTERVAL_S`` on a thread of its own, until :meth:`stop`."""
        self._sweeper.start()

    def stop(self) -> None:
        self._sweeper.stop()

    def __len__(self) -> int:
        with self._cond:
            return len(self._streams)

    def run(
        self, loaded: LoadedModel, client_id: str, name: str, feeds: dict[str, np.ndarray], *, received: float,
        reset: bool = False,
    ) -> tuple[dict[str, np.ndarray], StreamReport]:
        """Run ``feeds`` on the stream's own interpreter, after the stream's earlier arrivals, and report on it.

        The caller first waits for its client's earlier requests (``order.wait_for_earlier``), before it
        holds anything they might need (a model lease).
        """
        key = (loaded.entry.id, client_id, name)
        stream = self._enter(key, loaded, received)
        try:
            reason = self._prepare(key, stream, loaded, reset)
            outputs = loaded.run_state(stream.state, feeds)
            stream.runs += 1
            return outputs, StreamReport(name, reason is not None, reason, stream.runs)
        finally:
            self._leave(key, stream)

    def sweep(self) -> int:
        """Drop every stream idle longer than its model's ``idle_timeout_s`` (how many were dropped), and the
        states of streams whose model was unloaded."""
        with self._cond:
            return self._expire_idle()

    def _enter(self, key: StreamKey, loaded: LoadedModel, received: float) -> _Stream:
        with self._cond:
            self._expire_idle()
            stream = self._streams.get(key)
            if stream is None:
                limit = loaded.entry.streams.max_streams
                held = sum(1 for model_id, _, _ in self._streams if model_id == key[0])
                if held >= limit:
                    raise Overloaded(
                        f"model {key[0]!r} holds its maximum of {limit} streams; one frees when it has been idle "
                        f"{loaded.entry.streams.idle_timeout_s:g} s",
                        data={"retry_after_ms": int(loaded.entry.streams.idle_timeout_s * 1000)},
                    )
                stream = self._streams[key] = _Stream(last_used=self._clock())
            ticket = (received, next(self._tiebreak))
            heapq.heappush(stream.waiting, ticket)
            # In the stream's queue now: later requests of the client may come in and line up behind it.
            self.order.placed(key[1], received)
            while stream.busy or stream.waiting[0] != ticket:
                self._cond.wait()
            heapq.heappop(stream.waiting)
            stream.busy = True
            return stream

    def _prepare(self, key: StreamKey, stream: _Stream, loaded: LoadedModel, reset: bool) -> ResetReason | None:
        """Give the stream a state on ``loaded``, fresh if it has none, asked for one, or ran on another version."""
        reason: ResetReason | None = None
        # A stream whose model was unloaded keeps ``loaded`` (its state already released by a sweep) for this.
        if stream.loaded is not None and stream.loaded is not loaded:
            reason = "model_reloaded" if stream.loaded.entry == loaded.entry else "model_updated"
            self._drop_state(stream)
        elif stream.state is not None and reset:
            reason = "requested"
            self._drop_state(stream)
        if stream.state is None:
            state = loaded.open_state()
            if state is None:
                raise Overloaded(f"model {key[0]!r}: no memory left in the model budget for another stream's state")
            stream.state, stream.loaded, stream.runs = state, loaded, 0
            if reason is None:
                with self._cond:
                    reason = "expired" if key in self._expired else "new"
                    self._expired.pop(key, None)
        return reason

    def _leave(self, key: StreamKey, stream: _Stream) -> None:
        with self._cond:
            stream.busy = False
            stream.last_used = self._clock()
            if stream.state is None and not stream.waiting:
                self._streams.pop(key, None)  # its state could not be made: it holds no place
            self._cond.notify_all()

    def _drop_state(self, stream: _Stream) -> None:
        if stream.loaded is not None and stream.state is not None:
            stream.loaded.close_state(stream.state)
        stream.state, stream.runs = None, 0

    def _expire_idle(self) -> int:
        # A model unloaded (to make room, or replaced) no longer counts in the budget: its streams' interpreters
        # must go with it, not linger until each stream's next request or its idle timeout.
        for stream in self._streams.values():
            if not stream.busy and stream.state is not None and stream.loaded is not None and stream.loaded.closed:
                self._drop_state(stream)
        now = self._clock()
        idle = [
            key for key, stream in self._streams.items()
            if not stream.busy and not stream.waiting and stream.loaded is not None
            and now - stream.last_used > stream.loaded.entry.streams.idle_timeout_s
        ]
        for key in idle:
            self._drop_state(self._streams.pop(key))
            self._expired[key] = None
            if len(self._expired) > EXPIRED_REMEMBERED:
                self._expired.popitem(last=False)
        return len(idle)
