"""The benchmark tooling measures what it claims: real requests answered over a real broker, correctly counted.

No timing is asserted here; figures belong to ``make bench``.
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.models.accelerators import load_runtime
from agent.models.catalog import load_manifest, verified_model_bytes
from agent.models.devmodels import FACE_MODEL_FILE, add_face_detector, copy_bundled_models
from agent.models.inference import LoadedModel
from agent.mqtt.localbroker import MosquittoProcess
from benchmarks import bench_swap
from benchmarks.bench_uplink_bytes import Responder as ReplyMaker
from benchmarks.harness import AgentUnderTest, Responder, raw_invoke_rate, run_load
from benchmarks.load import request_template
from benchmarks.profile import classify
from benchmarks.rawinvoke import Picture, picture_step
from benchmarks.scenarios import TINY_REQUEST, bundled_model_labels, camera_frame_b64

MODEL_FILE = Path(__file__).resolve().parents[1] / "models" / "vibration_anomaly.tflite"


def test_face_detector_directory_is_a_servable_catalogue(tmp_path: Path) -> None:
    models = copy_bundled_models(tmp_path / "models")
    entry = add_face_detector(models, "faces")
    manifest = load_manifest(models)
    face = next(model for model in manifest.models if model.id == "faces")
    loaded = LoadedModel(face, verified_model_bytes(models, face), runtime=load_runtime())
    assert entry["file"] == FACE_MODEL_FILE
    assert [info.shape for info in loaded.inputs] == [(1, 128, 128, 3)]
    assert {model.id for model in manifest.models} >= {"vibration-anomaly", "faces"}


def test_no_serving_ceiling_step_finds_the_one_face_in_the_camera_frame_every_iteration(tmp_path: Path) -> None:
    models = copy_bundled_models(tmp_path / "models")
    add_face_detector(models, "faces", head=True)
    entry = next(model for model in load_manifest(models).models if model.id == "faces")
    step = picture_step(verified_model_bytes(models, entry), 1, Picture(camera_frame_b64(), entry))
    found = step()
    assert isinstance(found, list) and [face["label"] for face in found] == ["face"]
    assert step() == found  # every iteration does the whole request again, to the same answer


def test_raw_invoke_process_times_the_picture_path_with_the_manifest_entry(tmp_path: Path) -> None:
    entry = add_face_detector(tmp_path, "faces", head=True)
    picture = tmp_path / "frame.b64"
    picture.write_text(camera_frame_b64())
    model = tmp_path / FACE_MODEL_FILE
    raw = raw_invoke_rate(model, threads=1, num_threads=1, duration=0.2)
    ceiling = raw_invoke_rate(
        model, threads=1, num_threads=1, duration=0.2, picture_b64=picture, manifest_entry=entry
    )
    assert raw["path"] == "raw invoke" and ceiling["path"] == "picture->detections, no serving"
    assert ceiling["invokes_per_s"] > 0 and ceiling["cpu_us_per_invoke"] > 0


def test_request_template_splices_integer_ids_into_valid_json() -> None:
    before, after = request_template(TINY_REQUEST)
    document = json.loads(before + b"4711" + after)
    assert document == {"jsonrpc": "2.0", "id": 4711, **TINY_REQUEST}


def _payload(tmp_path: Path) -> Path:
    path = tmp_path / "request.json"
    path.write_text(json.dumps(TINY_REQUEST))
    return path


def test_load_generator_counts_every_echoed_request(local_broker: MosquittoProcess, tmp_path: Path) -> None:
    payload = _payload(tmp_path)
    with Responder(local_broker, "echo", "echo-device"):
        stats = run_load(local_broker, "echo-device", payload, inflight=4, duration=0.5, warmup=0.2)
    assert stats["completed"] > 0
    assert (stats["errors"], stats["lost"], stats["error_reasons"]) == (0, 0, {})
    assert stats["replies_total"] >= stats["completed"]
    # The bytes on the wire per reply (issue #16's before/after figures): an echo is the request plus its id.
    assert payload.stat().st_size < stats["mean_reply_bytes"] <= payload.stat().st_size + 32


def test_load_generator_counts_agent_replies_and_overload_errors(
    local_broker: MosquittoProcess, tmp_path: Path
) -> None:
    models = copy_bundled_models(tmp_path / "models")
    settings = {
        "models_dir": str(models),
        "data_dir": str(tmp_path / "data"),
        "limits__intake_queue": "1",
        "limits__receive_maximum": "256",  # the broker may send more than the intake holds
        "limits__inline_max_ms": "0",  # every request through the one-slot queue, so some are refused
        "limits__refusal_replies_per_s": "100000",  # and every refusal answered, so none look lost
        "limits__refusal_replies_burst": "100000",
        "signing__backend": "none",
        "rate_limit__enabled": "false",
        "metrics__port": "0",
    }
    agent = AgentUnderTest(local_broker, "bench-dev", settings, tmp_path / "agent.log")
    agent.start()
    try:
        stats = run_load(local_broker, "bench-dev", _payload(tmp_path), inflight=64, duration=0.5, warmup=0.2)
        memory = agent.memory_mb()
    finally:
        agent.stop()
    assert stats["completed"] > 0
    assert stats["lost"] == 0
    assert set(stats["error_reasons"]) == {"overloaded"}
    assert memory["VmHWM"] >= memory["VmRSS"] > 0


def test_baseline_responder_answers_with_the_models_label(local_broker: MosquittoProcess, tmp_path: Path) -> None:
    labels = bundled_model_labels()
    with Responder(local_broker, "baseline", "base-dev", "--model", str(MODEL_FILE), "--labels", labels):
        stats = run_load(local_broker, "base-dev", _payload(tmp_path), inflight=2, duration=0.3, warmup=0.1)
    assert stats["completed"] > 0 and stats["errors"] == 0


def test_profile_stages_attribute_a_sample_to_the_first_matching_stage() -> None:
    signing = ["Dispatcher._work (agent/serving/dispatcher.py:1)", "RequestPipeline.answer (agent/serving/pipeline.py:2)",
               "encode_reply (agent/signing/outgoing.py:3)",
               "sign_reply (agent/signing/message.py:4)", "_serialize_float (rfc8785/_impl.py:5)"]
    network = ["Client.loop_forever (paho/mqtt/client.py:1)", "Client._packet_read (paho/mqtt/client.py:2)"]
    assert classify(signing) == "normalise + JCS + sign"
    assert classify(network) == "MQTT network I/O (paho loop)"
    inline_parse = ["Client.loop_forever (paho/mqtt/client.py:1)", "LocalLink._on_message (agent/mqtt/local_link.py:2)",
                    "RequestPipeline.serve (agent/serving/pipeline.py:3)", "parse_request (agent/serving/protocol.py:4)"]
    assert classify(inline_parse) == "parse + validate request"
    assert classify(["Thread.run (threading.py:1)"]) == "other"


def test_uplink_bytes_responder_builds_replies_bound_to_their_request() -> None:
    reply = json.loads(ReplyMaker().reply(None))
    assert reply["result"]["model"] == "vibration-anomaly" and reply["id"] == 1


def test_swap_benchmark_puts_every_version_in_with_no_failed_request() -> None:
    results = bench_swap.run(rounds=1)
    assert set(results["models"]) == set(bench_swap.MODELS)
    for figures in results["models"].values():
        assert set(figures["modes"]) == set(bench_swap.MODES)
        assert all(row["failed"] == 0 and row["longest_gap_ms_max"] > 0 for row in figures["modes"].values())
