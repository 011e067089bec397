"""What serves a request: the model it names, the best model for the task it names, or an ensemble.

Task routing ranks the servable models and ensembles of the task by, in order:

1. fitting this device: a model whose measured memory (or, before it is measured, whose file) exceeds the
   model memory budget left beside the pinned models is skipped, and so is an ensemble with such a member;
2. the highest ``accuracy`` declared in the manifest (none declared ranks below any declared);
3. the highest ``priority``;
4. the lowest latency measured on this device (an average over its recent runs; unmeasured ranks last);
5. the smallest measured memory (unmeasured ranks last); then the id, so the choice is deterministic.

Ensembles (``ensembles`` in the manifest) combine models of one task:

* ``fastest`` runs one member: the one with the lowest latency measured on this device. Members never
  measured yet are run first, in declared order, so that every member gets measured.
* ``weighted_vote`` runs every member on the same inputs and returns, for each label, the weighted mean of
  the members' probabilities (soft voting): ``p(label) = sum(w_i * p_i(label)) / sum(w_i)``, where
  ``p_i`` is member i's first output, dequantized. The manifest guarantees the members share their labels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.errors import InferenceFailed, InvalidParams, ModelTooLarge, ModelUnavailable
from agent.models.catalog import Catalog, EnsembleEntry, EnsembleMember, ModelEntry
from agent.models.images import Frame, image_tensor
from agent.models.inference import LoadedModel, decode_output, prepare_input
from agent.models.manager import ModelManager
from agent.models.streams import StreamReport, StreamTable

VOTE_OUTPUT = "probabilities"
_WHOLE_FRAME = Frame()  # tensor coordinates are the picture's (frozen, so one serves every request)


# Not frozen: built for every inference, and a frozen dataclass's __init__ costs ~0.4 us more.
@dataclass(slots=True)
class Call:
    """What a request brings beside its tensors: who sent it and when (streams are per client, in arrival
    order), its stream, and a picture for the model's image input."""

    client_id: str = ""
    received: float = 0.0
    stream: str = ""
    reset: bool = False
    image_b64: str | None = None


@dataclass
class ModelRun:
    """One model's run: the version that served, its (decoded) outputs and its inference time (with the
    image decode, ``preprocess_ms``); where the picture landed in the input, and the stream's report."""

    entry: ModelEntry
    outputs: dict[str, np.ndarray]
    inference_ms: float
    preprocess_ms: float = 0.0
    frame: Frame = field(default_factory=Frame)
    input_hw: tuple[int, int] = (0, 0)
    stream: StreamReport | None = None


@dataclass
class Served:
    """The answer to an ``infer`` request, from a single model or an ensemble."""

    id: str
    version: str
    labels: list[str]
    outputs: dict[str, np.ndarray]
    inference_ms: float
    strategy: str | None = None
    members: list[tuple[ModelRun, float]] = field(default_factory=list)  # ensembles: (run, weight)
    run: ModelRun | None = None  # the one model run whose outputs these are (None for a vote)


class Router:
    """Resolves ``model``/``task`` to something servable and runs it."""

    def __init__(self, models: ModelManager, *, max_input_elements: int, max_image_pixels: int) -> None:
        self.models = models
        self.max_input_elements = max_input_elements
        self.max_image_pixels = max_image_pixels
        self.streams = StreamTable()

    def resolve(self, model: str | None, task: str | None) -> str:
        """The id of the model or ensemble to run; ``model`` wins, and must then be of ``task`` if both are given."""
        catalog = self.models.catalog
        if model is not None:
            target = catalog.models.get(model) or catalog.ensembles.get(model)
            if target is None:
                self.models.entry(model)  # raises the "unknown model" error listing what is served
            assert target is not None
            if task is not None and target.task != task:
                raise InvalidParams(f"model {model!r} does {target.task!r}, not task {task!r}")
            return model
        if task is None:
            raise InvalidParams("params.model or params.task is required (see models/list)")
        servable = set(catalog.servable_ids)
        targets: list[ModelEntry | EnsembleEntry] = [*catalog.models.values(), *catalog.ensembles.values()]
        candidates = [target for target in targets if target.task == task and target.id in servable]
        if not candidates:
            tasks = sorted({target.task for target in catalog.models.values() if target.id in servable})
            raise InvalidParams(f"no model here does task {task!r}; tasks served: {', '.join(tasks) or 'none'}")
        fitting = [target for target in candidates if self._fits(target, catalog)]
        if not fitting:
            raise ModelTooLarge(
                f"no model for task {task!r} fits this device's model memory budget "
                f"({', '.join(target.id for target in candidates)} are all too large)"
            )
        return min(fitting, key=self._rank).id

    def _fits(self, target: ModelEntry | EnsembleEntry, catalog: Catalog) -> bool:
        if isinstance(target, ModelEntry):
            return self.models.stats(target).fits
        fitting = [self.models.stats(catalog.models[member.model]).fits for member in target.members]
        return any(fitting) if target.strategy == "fastest" else all(fitting)

    def _rank(self, target: ModelEntry | EnsembleEntry) -> tuple[Any, ...]:
        if isinstance(target, ModelEntry):
            stats = self.models.stats(target)
            latency, memory = stats.latency_ms, stats.memory_bytes
        else:
            latency, memory = self.models.measurements.latency_ms(target.id, _ensemble_version(target)), None
        return (
            target.accuracy is None,
            -(target.accuracy or 0.0),
            -target.priority,
            latency is None,
            latency or 0.0,
            memory is None,
            memory or 0,
            target.id,
        )

    def serve(self, target_id: str, inputs: dict[str, Any], *, raw: bool, call: Call | None = None) -> Served:
        """Run the model or ensemble ``target_id`` on the client's inputs."""
        call = call or Call()
        ensemble = self.models.catalog.ensembles.get(target_id)
        if ensemble is not None:
            return self._serve_ensemble(ensemble, inputs, raw=raw, call=call)
        run = self.run_model(target_id, inputs, raw=raw, call=call)
        return Served(run.entry.id, run.entry.version, run.entry.labels, run.outputs, run.inference_ms, run=run)

    def run_model(self, model_id: str, inputs: dict[str, Any], *, raw: bool, call: Call | None = None) -> ModelRun:
        """Validate inputs (and decode the picture) against the model, run it on a leased interpreter (a stateful
        model: on the stream's own), and decode its outputs.

        The latency recorded for the model includes the picture's decode: it is what routing and the choice
        to serve a request inline on the network thread must weigh.
        """
        call = call or Call()
        if self.models.entry(model_id).stateful:
            # Before the lease: an earlier request may be loading a model that needs this one unloaded.
            self.streams.order.wait_for_earlier(call.client_id, call.received)
        version = self.models.entry(model_id).sha256
        try:
            with self.models.lease(model_id) as loaded:
                version = loaded.entry.sha256
                feeds, frame, input_hw, preprocess_ms = self._feeds(loaded, inputs, raw=raw, call=call)
                started = time.monotonic()
                report = None
                if loaded.entry.stateful:
                    raw_outputs, report = self.streams.run(
                        loaded, call.client_id, call.stream, feeds, received=call.received, reset=call.reset
                    )
                else:
                    self.streams.order.placed(call.client_id, call.received)  # no stream: later requests need not wait
                    raw_outputs = loaded.run(feeds)
                elapsed_ms = (time.monotonic() - started) * 1000
        except (InferenceFailed, ModelUnavailable):
            # The version's own failures (it would not load, its interpreter raised), which a deployment's
            # probation weighs; a client's invalid inputs or a full budget are not the version's doing.
            self.models.measurements.record_failure(model_id, version)
            raise
        self.models.measurements.record_run(model_id, loaded.entry.sha256, elapsed_ms + preprocess_ms)
        outputs = {info.name: decode_output(info, raw_outputs[info.name], raw=raw) for info in loaded.outputs}
        return ModelRun(loaded.entry, outputs, elapsed_ms, preprocess_ms, frame, input_hw, report)

    def _feeds(
        self, loaded: LoadedModel, inputs: dict[str, Any], *, raw: bool, call: Call
    ) -> tuple[dict[str, np.ndarray], Frame, tuple[int, int], float]:
        """The input tensors, where the picture (if any) landed in its input, that input's height and width, and
        how long the picture took to decode (ms)."""
        model_id = loaded.entry.id
        image_spec = None
        image_input = None
        if call.image_b64 is not None:  # looked up only for a picture: without one, every input is a tensor
            image_spec = next((spec for spec in loaded.entry.inputs if spec.preprocess is not None), None)
            if image_spec is None:
                raise InvalidParams(f"model {model_id!r} takes no image (no input has preprocess in its manifest)")
            # The picture feeds the image input unless that input is also given as a tensor.
            image_input = image_spec.name
        missing = [info.name for info in loaded.inputs if info.name not in inputs and info.name != image_input]
        if missing:
            raise InvalidParams(f"model {model_id!r} needs input(s) {missing}")
        for name in inputs:
            loaded.input_info(name)
        feeds, frame, input_hw, decode_ms = {}, _WHOLE_FRAME, (0, 0), 0.0
        for info in loaded.inputs:
            if info.name in inputs:
                feeds[info.name] = prepare_input(info, inputs[info.name], raw=raw, max_elements=self.max_input_elements)
            else:
                assert image_spec is not None and image_spec.preprocess is not None
                started = time.monotonic()
                feeds[info.name], frame = image_tensor(
                    info, image_spec.preprocess, call.image_b64, max_pixels=self.max_image_pixels
                )
                decode_ms = (time.monotonic() - started) * 1000
            if len(info.shape) == 4:
                input_hw = (info.shape[1], info.shape[2])
        return feeds, frame, input_hw, decode_ms

    def _serve_ensemble(self, ensemble: EnsembleEntry, inputs: dict[str, Any], *, raw: bool, call: Call) -> Served:
        if ensemble.strategy == "fastest":
            member = self._fastest_member(ensemble)
            run = self.run_model(member.model, inputs, raw=raw, call=call)
            served = Served(
                ensemble.id, ensemble.version, run.entry.labels, run.outputs, run.inference_ms,
                ensemble.strategy, [(run, member.weight)], run,
            )
        else:
            if raw:
                raise InvalidParams(f"ensemble {ensemble.id!r} votes on probabilities; raw outputs cannot be combined")
            # One member at a time: each lease ends before the next begins, so members that do not fit in
            # memory together still vote (one evicting the other) and two ensembles never wait on each other.
            runs = [
                (self.run_model(member.model, inputs, raw=False, call=call), member.weight) for member in ensemble.members
            ]
            labels = runs[0][0].entry.labels
            served = Served(
                ensemble.id, ensemble.version, labels, {VOTE_OUTPUT: weighted_vote(ensemble.id, labels, runs)},
                sum(run.inference_ms for run, _ in runs), ensemble.strategy, runs,
            )
        self.models.measurements.record_latency(ensemble.id, _ensemble_version(ensemble), served.inference_ms)
        return served

    def _fastest_member(self, ensemble: EnsembleEntry) -> EnsembleMember:
        catalog = self.models.catalog
        stats = {member.model: self.models.stats(catalog.models[member.model]) for member in ensemble.members}
        usable = [
            member for member in ensemble.members if member.model not in catalog.refused and stats[member.model].fits
        ]
        if not usable:
            raise ModelTooLarge(f"no member of ensemble {ensemble.id!r} can be served within this device's model memory budget")
        for member in usable:
            if stats[member.model].latency_ms is None:
                return member
        return min(usable, key=lambda member: stats[member.model].latency_ms or 0.0)


def weighted_vote(ensemble_id: str, labels: list[str], runs: list[tuple[ModelRun, float]]) -> np.ndarray:
    """Per label, the weighted mean of the members' probabilities, shaped ``[1, len(labels)]``."""
    vectors = []
    for run, _ in runs:
        vector = np.asarray(next(iter(run.outputs.values())), dtype=np.float64).reshape(-1)
        if vector.size != len(labels):
            raise InferenceFailed(
                f"ensemble {ensemble_id!r}: member {run.entry.id!r} gave {vector.size} values for {len(labels)} labels"
            )
        vectors.append(vector)
    weights = np.asarray([weight for _, weight in runs], dtype=np.float64)
    return (weights @ np.stack(vectors) / weights.sum()).reshape(1, -1)


def _ensemble_version(ensemble: EnsembleEntry) -> str:
    """Latency averages restart when an ensemble's definition changes."""
    return ensemble.model_dump_json()
