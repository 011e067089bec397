"""The benchmark scenarios, all in one run over one private mosquitto so their ratios hold on a noisy machine.

Every responder and agent under test is started at once and stays idle while another is measured, so
the comparisons at 32 in flight can be interleaved round by round (ceiling, baseline, agent, agent without
signing) instead of being minutes apart. Numbers are medians over the rounds.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agent.config import BUNDLED_MODELS_DIR, LocalBroker
from agent.models.devmodels import FACE_INPUT_SHAPE, FACE_MODEL_FILE, add_face_detector, copy_bundled_models
from agent.mqtt.localbroker import MosquittoProcess
from agent.signing.swtpm import SwtpmProcess
from agent.tools.client import DeviceClient
from benchmarks.harness import (
    AgentUnderTest,
    Responder,
    TopicWatcher,
    context_switches,
    load_result,
    process_cpu_s,
    raw_invoke_rate,
    run_load,
    start_load,
)
from benchmarks.placement import (
    NOT_PINNED,
    PinnedOrchestrator,
    Placement,
    allowed_cpus,
    child_processes,
    process_name,
)

TINY_MODEL = "vibration-anomaly"
FACE_MODEL = "face-detector"
# The same detector as MediaPipe serves it: a picture in (letterboxed), detections out.
FACE_IMAGE_MODEL = "faces"
CAMERA_FRAME = (640, 480)
CAMERA_JPEG_QUALITY = 85
TINY_REQUEST = {
    "method": "infer",
    "params": {"model": TINY_MODEL, "inputs": {"features": [[0.2, 0.62, 3.1, 3.0, 0.5, 0.35, 0.15, 41.0]]}},
}
SWEEP = (1, 8, 32, 128)
COMPARE_INFLIGHT = 32
FACE_INFLIGHT = 4
FAIR_RATE = 50.0  # a paced client: 300 samples in a 6 s window, so p99 is not one of the two largest
FLOOD_RATE = 2000.0  # requests/s open loop, above the agent's full-path throughput: the intake must shed it
FAIRNESS_ROUNDS = 5
FLOOD_INFLIGHT = 1024  # open loop: the cap only bounds the generator, abandon_after frees it


@dataclass
class Timings:
    """How long each measurement runs; the defaults keep ``make bench`` under 5 minutes on 2 cores."""

    duration_s: float = 4.0
    warmup_s: float = 1.0
    rounds: int = 3
    raw_invoke_s: float = 4.0
    fairness_s: float = 6.0
    extra_startups: int = 2


@dataclass
class Bench:
    """One run's brokers, working directory, payload files and the processes started so far."""

    timings: Timings
    placement: Placement = NOT_PINNED
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="edge-agent-bench-")))
    broker: MosquittoProcess = field(init=False)
    cloud: MosquittoProcess = field(init=False)
    tpm: SwtpmProcess | None = field(init=False, default=None)
    responders: list[Responder] = field(init=False, default_factory=list)
    models_dir: Path = field(init=False)
    tiny_payload: Path = field(init=False)
    face_payload: Path = field(init=False)
    face_image_payload: Path = field(init=False)
    face_picture_b64: Path = field(init=False)  # the JPEG of face_image_payload alone, for the no-serving ceiling
    face_image_entry: dict[str, Any] = field(init=False)  # its model's manifest entry, as the agent reads it
    agents: list[AgentUnderTest] = field(init=False, default_factory=list)
    server_pids: dict[str, int] = field(init=False, default_factory=dict)  # device id -> responding process
    notes: list[str] = field(init=False, default_factory=list)
    load_generator_cpus: list[int] | None = field(init=False, default=None)
    _orchestrator: PinnedOrchestrator = field(init=False)

    def __post_init__(self) -> None:
        # First, so that the brokers, swtpm and every load generator started from here inherit the CPUs.
        self._orchestrator = PinnedOrchestrator(self.placement)
        self.broker = MosquittoProcess(self.workdir / "broker", persistence=False)
        self.cloud = MosquittoProcess(self.workdir / "cloud", persistence=False)
        try:
            self._prepare()
        except BaseException:
            self.close()
            raise

    def _prepare(self) -> None:
        self.broker.start()
        self.cloud.start()
        self.models_dir = copy_bundled_models(self.workdir / "models")
        add_face_detector(self.models_dir, FACE_MODEL)
        self.face_image_entry = add_face_detector(self.models_dir, FACE_IMAGE_MODEL, head=True)
        self.tiny_payload = self.workdir / "tiny.json"
        self.tiny_payload.write_text(json.dumps(TINY_REQUEST))
        image = np.random.default_rng(7).uniform(-1, 1, FACE_INPUT_SHAPE).astype("<f4")
        image_b64 = base64.b64encode(image.tobytes()).decode()
        face_input = {"b64": image_b64, "dtype": "float32", "shape": list(FACE_INPUT_SHAPE)}
        # Raw tensors both ways (b64), as a vision client would send them; nested JSON lists of 15k output
        # floats would measure the JSON encoder, not the agent.
        face_request = {
            "method": "infer",
            "params": {"model": FACE_MODEL, "inputs": {"image": face_input}, "output_encoding": "b64"},
        }
        self.face_payload = self.workdir / "face.json"
        self.face_payload.write_text(json.dumps(face_request))
        picture_b64 = camera_frame_b64()
        self.face_picture_b64 = self.workdir / "face-image.b64"
        self.face_picture_b64.write_text(picture_b64)
        image_request = {"method": "infer", "params": {"model": FACE_IMAGE_MODEL, "image": {"b64": picture_b64}}}
        self.face_image_payload = self.workdir / "face-image.json"
        self.face_image_payload.write_text(json.dumps(image_request))
        if shutil.which("swtpm") is not None:
            self.tpm = SwtpmProcess(self.workdir / "swtpm").start()
        else:
            self.notes.append("swtpm not installed: the full configuration signs with a software key")

    def close(self) -> None:
        """Stop every process this run started and remove its working directory."""
        for responder in self.responders:
            responder.stop()
        for agent in self.agents:
            agent.stop()
        if self.tpm is not None:
            self.tpm.close()
        self.broker.close()
        self.cloud.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        self._orchestrator.close()

    def process_cpus(self) -> dict[str, str | None]:
        """The CPUs the kernel lets each process of this run use, by role, read from ``/proc`` now."""
        roles = {pid: device_id for device_id, pid in self.server_pids.items()}
        for broker, role in ((self.broker, "local broker"), (self.cloud, "cloud broker")):
            if broker.pid is not None:
                roles[broker.pid] = role
        cpus = {"benchmark runner": allowed_cpus(os.getpid())}
        for pid in child_processes(os.getpid()):
            cpus[roles.get(pid) or f"{process_name(pid)} ({pid})"] = allowed_cpus(pid)
        if self.load_generator_cpus is not None:
            cpus["load generator"] = ",".join(str(cpu) for cpu in self.load_generator_cpus)
        return cpus

    # ---- configurations ---------------------------------------------------------------------------

    def full_settings(self, name: str) -> dict[str, str]:
        """Shipped defaults plus what a deployed device has: a TPM-rooted signer and a cloud broker."""
        return {**self.signed_settings(name), "cloud__host": self.cloud.host, "cloud__port": str(self.cloud.port)}

    def signed_settings(self, name: str) -> dict[str, str]:
        """Shipped defaults with the TPM-rooted signer but no cloud broker: signing's cost without the outbox."""
        settings = {
            "models_dir": str(self.models_dir),
            "data_dir": str(self.workdir / name),
            "rate_limit__enabled": "false",
            "metrics__port": "0",
        }
        if self.tpm is not None:
            settings.update({"signing__backend": "tpm", "signing__tcti": self.tpm.tcti})
        else:
            settings.update({"signing__backend": "software"})
        return settings

    def bare_settings(self, name: str) -> dict[str, str]:
        """Shipped defaults without signing and without a cloud broker (so nothing to keep in an outbox)."""
        return {
            "models_dir": str(self.models_dir),
            "data_dir": str(self.workdir / name),
            "signing__backend": "none",
            "rate_limit__enabled": "false",
            "metrics__port": "0",
        }

    def start_agent(self, device_id: str, settings: dict[str, str]) -> AgentUnderTest:
        agent = AgentUnderTest(self.broker, device_id, settings, self.workdir / f"{device_id}.log", self.placement)
        self.agents.append(agent)
        agent.start()
        self.server_pids[device_id] = agent.pid
        return agent

    def describe_agent(self, agent: AgentUnderTest) -> dict[str, Any]:
        """The effective configuration measured and what a reply really carries (signature, size)."""
        config = agent.effective_config()
        with DeviceClient(LocalBroker(host=self.broker.host, port=self.broker.port), agent.device_id) as client:
            reply = client.call("infer", TINY_REQUEST["params"], timeout=30)
        meta = reply.get("result", {}).get("_meta", {})
        signing = config["signing"]
        signs = signing["backend"] != "none"
        return {
            "device_id": agent.device_id,
            "startup_s": round(agent.startup_s or 0.0, 3),
            "workers": config["limits"]["workers"],
            "num_threads": config["limits"]["num_threads"],
            "intake_queue": config["limits"]["intake_queue"],
            "receive_maximum": config["limits"]["receive_maximum"],
            "rate_limit_enabled": config["rate_limit"]["enabled"],
            "signing_backend": signing["backend"],
            "signing_mode": signing["mode"] if signs else None,
            "certificate_header": signing["certificate_header"] if signs else None,
            "cloud": f"{config['cloud']['host']}:{config['cloud']['port']}" if config.get("cloud") else None,
            "replies_signed": "sig" in meta,
            "reply_ok": "result" in reply,
            "reply_bytes": len(json.dumps(reply, separators=(",", ":"))),
        }

    # ---- measurements -----------------------------------------------------------------------------

    def load(self, device_id: str, payload: Path, inflight: int) -> dict[str, Any]:
        """One load run against ``device_id``, with the CPU its responding process spent per reply."""
        pid = self.server_pids[device_id]
        cpu_before, switches_before = process_cpu_s(pid), context_switches(pid)
        timings = self.timings
        result = run_load(
            self.broker, device_id, payload, inflight=inflight, duration=timings.duration_s, warmup=timings.warmup_s
        )
        cpu_us = (process_cpu_s(pid) - cpu_before) * 1e6
        replies = max(1, result["replies_total"])
        result["server_cpu_us_per_reply"] = round(cpu_us / replies, 1)
        result["server_context_switches_per_reply"] = round((context_switches(pid) - switches_before) / replies, 2)
        self.load_generator_cpus = result.get("cpus")
        return result

    def interleaved(self, targets: dict[str, str], inflight: int) -> dict[str, dict[str, Any]]:
        """Each target measured once per round, rounds back to back; the median of every figure is kept."""
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for _ in range(self.timings.rounds):
            for name, device_id in targets.items():
                runs[name].append(self.load(device_id, self.tiny_payload, inflight))
        return {name: median_of(results) for name, results in runs.items()}

    def sweep(self, device_id: str, levels: tuple[int, ...], payload: Path | None = None) -> dict[str, dict[str, Any]]:
        return {str(level): self.load(device_id, payload or self.tiny_payload, level) for level in levels}

    def face(self, device_id: str) -> dict[str, Any]:
        return self.load(device_id, self.face_payload, FACE_INFLIGHT)

    def face_image(self, device_id: str) -> dict[str, Any]:
        """The face detector fed 640 x 480 JPEGs, answering detections, at the raw-tensor run's in-flight count."""
        return self.load(device_id, self.face_image_payload, FACE_INFLIGHT)

    def face_request_bytes(self) -> dict[str, int]:
        """Request sizes on the wire (without the id) of the raw-tensor and the JPEG face requests."""
        return {"tensor": self.face_payload.stat().st_size, "image": self.face_image_payload.stat().st_size}

    def raw_face(self, threads: int, num_threads: int) -> dict[str, Any]:
        model = self.models_dir / FACE_MODEL_FILE
        return raw_invoke_rate(
            model, threads=threads, num_threads=num_threads, duration=self.timings.raw_invoke_s,
            placement=self.placement,
        )

    def face_image_ceiling(self, threads: int, num_threads: int) -> dict[str, Any]:
        """The JPEG path with no serving: the raw invoke loop doing, per iteration, what the agent must do for
        one picture request (decode, preprocess, run, detection head), on the same CPUs as :meth:`raw_face`."""
        return raw_invoke_rate(
            self.models_dir / FACE_MODEL_FILE, threads=threads, num_threads=num_threads,
            duration=self.timings.raw_invoke_s, placement=self.placement,
            picture_b64=self.face_picture_b64, manifest_entry=self.face_image_entry,
        )

    def fairness(self, device_id: str, rounds: int = FAIRNESS_ROUNDS) -> dict[str, Any]:
        """A paced client's p99 beside a flood over its p99 alone, ``rounds`` times: the round with the median
        ratio (its three loads reported as the scenario's rows), and every round's ratio for the spread."""
        measured = [self.fairness_round(device_id) for _ in range(rounds)]
        for round_ in measured:
            alone, beside = round_["normal_alone"]["p99_ms"], round_["normal_beside_flood"]["p99_ms"]
            # No p99 beside the flood: the paced client got no answer at all (reported, not hidden).
            round_["ratio"] = round(beside / alone, 3) if alone and beside is not None else None
        ratios = sorted(r["ratio"] for r in measured if r["ratio"] is not None)
        median_round = sorted(measured, key=lambda r: r["ratio"] if r["ratio"] is not None else float("inf"))[
            (len(ratios) - 1) // 2
        ]
        return {
            **{key: median_round[key] for key in ("normal_alone", "normal_beside_flood", "flooder")},
            "ratios": ratios,
            "ratio_median": statistics.median(ratios) if ratios else None,
        }

    def fairness_round(self, device_id: str) -> dict[str, Any]:
        """A well-behaved client's latency alone, then beside a client flooding the same agent."""
        seconds = self.timings.fairness_s
        normal = {"inflight": 4, "rate": FAIR_RATE, "duration": seconds, "warmup": 0.5}
        alone = run_load(self.broker, device_id, self.tiny_payload, **normal)
        # An open-loop flood at a fixed rate: a closed loop would slow itself down whenever the agent leaves
        # its excess unanswered, and flatter the agent.
        flood = start_load(
            self.broker, device_id, self.tiny_payload, inflight=FLOOD_INFLIGHT, duration=seconds + 1.0, warmup=0.5,
            rate=FLOOD_RATE, abandon_after=0.5,
        )
        time.sleep(1.0)  # the flood is running (and past its warm-up) before the normal client's window opens
        beside = run_load(self.broker, device_id, self.tiny_payload, **normal)
        flooder = load_result(flood)
        return {"normal_alone": alone, "normal_beside_flood": beside, "flooder": flooder}

    def startups(self, settings: dict[str, str], count: int) -> list[float]:
        """Seconds from spawning the agent to its live ``online`` status, for ``count`` fresh processes."""
        samples = []
        for index in range(count):
            agent = AgentUnderTest(
                self.broker, f"startup-{index}", settings, self.workdir / "startup.log", self.placement
            )
            try:
                samples.append(round(agent.start(), 3))
            finally:
                agent.stop()
        return samples

    def cloud_watcher(self) -> TopicWatcher:
        return TopicWatcher(self.cloud, "#")


def median_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-figure medians of repeated load runs; errors are summed, every run is kept under ``runs``."""
    merged: dict[str, Any] = {"inflight": results[0]["inflight"], "rounds": len(results)}
    medians = ("req_per_s", "p50_ms", "p99_ms", "p999_ms", "mean_ms", "signed_fraction", "mean_reply_bytes",
               "server_cpu_us_per_reply", "server_context_switches_per_reply", "client_cpu_us_per_reply")
    for key in medians:
        values = [result[key] for result in results if result[key] is not None]
        merged[key] = round(statistics.median(values), 3) if values else None
    for key in ("completed", "errors", "lost"):
        merged[key] = sum(result[key] for result in results)
    reasons: dict[str, int] = {}
    for result in results:
        for reason, count in result["error_reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    merged["error_reasons"] = reasons
    merged["runs"] = [{key: result[key] for key in ("req_per_s", "p50_ms", "p99_ms", "errors")} for result in results]
    return merged


def _tiny_model_entry() -> dict[str, Any]:
    manifest = json.loads((BUNDLED_MODELS_DIR / "manifest.json").read_text())
    return next(model for model in manifest["models"] if model["id"] == TINY_MODEL)


def bundled_model_labels() -> str:
    """The tiny model's labels, comma-separated, for the baseline responder."""
    return ",".join(_tiny_model_entry()["labels"])


def start_reference_responders(bench: Bench) -> tuple[Responder, Responder]:
    """The ceiling (echo) and the baseline (plain paho + LiteRT) responders, both idle until measured."""
    echo = Responder(bench.broker, "echo", "ceiling", placement=bench.placement)
    model_file = BUNDLED_MODELS_DIR / _tiny_model_entry()["file"]
    baseline = Responder(
        bench.broker, "baseline", "baseline", "--model", str(model_file), "--labels", bundled_model_labels(),
        placement=bench.placement,
    )
    bench.responders += [echo, baseline]
    bench.server_pids.update({"ceiling": echo.pid, "baseline": baseline.pid})
    return echo, baseline


def camera_frame_b64() -> str:
    """A 640 x 480 JPEG (quality 85) of a real photograph with a face (scikit-image's astronaut), as base64."""
    photo = Path(__import__("skimage").__file__).parent / "data" / "astronaut.png"
    buffer = io.BytesIO()
    Image.open(photo).convert("RGB").resize(CAMERA_FRAME).save(buffer, "JPEG", quality=CAMERA_JPEG_QUALITY)
    return base64.b64encode(buffer.getvalue()).decode()
