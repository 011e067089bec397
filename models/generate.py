"""Build the two bundled TFLite models and their manifest from hand-designed weights.

Run `make models` (or `.venv/bin/python models/generate.py`) to rewrite `models/*.tflite` and
`models/manifest.json`. The output is byte-for-byte reproducible: weights are constants below,
the evaluation set comes from a seeded `random.Random`, and flatbuffers are packed in a fixed order.
No TensorFlow is needed; the flatbuffers are built with the TFLite schema's object API.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from tflite_graph import NO_ACTIVATION, RELU, GraphBuilder, range_quantization, schema

MODELS_DIR = Path(__file__).resolve().parent
MANIFEST_NAME = "manifest.json"
EVALUATION_SAMPLES_PER_LABEL = 300
EVALUATION_SEED = 20240601

VIBRATION_LABELS = ["normal", "imbalance", "bearing_wear"]
VIBRATION_FEATURES = [
    "rms_g", "peak_g", "crest_factor", "kurtosis",
    "band_low", "band_mid", "band_high", "temperature_c",
]
# Five hand-built fault detectors (rows) over the eight features (columns). Each row is a
# ReLU "evidence" unit that stays at zero on a healthy machine:
#   energy      - overall vibration level: 2*rms + 0.1*peak above 1 g
#   impulsive   - spiky signal from rolling-element defects: (kurtosis + crest)/4 above 2
#   one_x       - energy concentrated in the low band (1x running speed) rather than mid/high
#   high_band   - more than 25 % of the energy above 1 kHz (bearing resonances)
#   hot         - housing temperature above 60 degC
VIBRATION_DETECTOR_WEIGHTS = [
    [2.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 5.0, -2.5, -2.5, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1],
]
VIBRATION_DETECTOR_BIAS = [-1.0, -2.0, -1.5, -1.25, -6.0]
# Labels (rows) from detector evidence (columns: energy, impulsive, one_x, high_band, hot).
# "normal" is the default (positive bias) and every detector argues against it.
VIBRATION_CLASSIFIER_WEIGHTS = [
    [-2.0, -2.0, -1.0, -2.0, -2.0],
    [2.0, -1.0, 2.0, -0.5, 0.0],
    [0.5, 2.0, -1.0, 2.0, 1.5],
]
VIBRATION_CLASSIFIER_BIAS = [2.5, 0.0, 0.0]

SENSOR_LABELS = ["idle", "occupied", "ventilate", "fault"]
SENSOR_READINGS = ["temperature_c", "humidity_pct", "co2_hppm", "motion_pct"]
# Every reading is expressed so that its useful indoor range lies in 0..100, which lets one
# per-tensor input scale cover all four (CO2 in hundreds of ppm: 8.5 means 850 ppm).
SENSOR_INPUT_RANGE = (0.0, 100.0)
# Six ReLU detectors (rows) over the readings (columns follow SENSOR_READINGS):
#   motion_any    - motion during more than 20 % of the last minute
#   motion_busy   - more than 50 %; subtracting it caps the motion evidence, so a busy room
#                   cannot outvote a CO2 or humidity alarm
#   co2_high      - CO2 above 1050 ppm
#   humid         - relative humidity above 68 %
#   hot           - temperature above 38 degC: an overheating enclosure or a failing sensor
#   humidity_dead - relative humidity below 5 %, which no occupied building reads
SENSOR_DETECTOR_WEIGHTS = [
    [0.0, 0.0, 0.0, 0.1],
    [0.0, 0.0, 0.0, 0.1],
    [0.0, 0.0, 1.0, 0.0],
    [0.0, 0.25, 0.0, 0.0],
    [1.0, 0.0, 0.0, 0.0],
    [0.0, -1.0, 0.0, 0.0],
]
SENSOR_DETECTOR_BIAS = [-2.0, -5.0, -10.5, -17.0, -38.0, 5.0]
# Detector evidence above 16 saturates; by then the state is unambiguous.
SENSOR_EVIDENCE_RANGE = (0.0, 16.0)
# Labels (rows) from detector evidence. "idle" is the default (constant logit 2); a CO2 or
# humidity alarm outweighs the largest motion evidence, and a fault outweighs everything.
SENSOR_CLASSIFIER_WEIGHTS = [
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [2.5, -2.5, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 4.0, 4.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 3.0, 3.0],
]
SENSOR_CLASSIFIER_BIAS = [2.0, -0.5, -1.0, -3.0]
# Logits beyond +-32 saturate; the winning class is already certain long before that.
SENSOR_LOGIT_SCALE = 0.25
SENSOR_LOGIT_ZERO_POINT = 0


def run_model(
    model: bytes,
    rows: Sequence[Sequence[float]],
    resolver: OpResolverType = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
) -> np.ndarray:
    """Run a batch of real-valued rows through a model; quantizes int8 input, dequantizes output."""
    interpreter = Interpreter(model_content=model, experimental_op_resolver_type=resolver)
    values = np.asarray(rows, dtype=np.float32)
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], list(values.shape))
    interpreter.allocate_tensors()
    input_detail = interpreter.get_input_details()[0]
    output_detail = interpreter.get_output_details()[0]
    if input_detail["dtype"] == np.int8:
        scale, zero_point = input_detail["quantization"]
        values = np.clip(np.round(values / scale) + zero_point, -128, 127).astype(np.int8)
    interpreter.set_tensor(input_detail["index"], values)
    interpreter.invoke()
    output = interpreter.get_tensor(output_detail["index"])
    if output_detail["dtype"] == np.int8:
        scale, zero_point = output_detail["quantization"]
        return (output.astype(np.float32) - zero_point) * scale
    return output

def build_vibration_anomaly() -> bytes:
    """Float32 model: features[1,8] -> FC(5, ReLU) -> FC(3) -> SOFTMAX -> probabilities[1,3]."""
    graph = GraphBuilder()
    features = graph.add_tensor("features", [1, len(VIBRATION_FEATURES)], schema.TensorType.FLOAT32)
    evidence = graph.add_float_fully_connected(
        "detectors", features, VIBRATION_DETECTOR_WEIGHTS, VIBRATION_DETECTOR_BIAS,
        "detectors/evidence", RELU,
    )
    logits = graph.add_float_fully_connected(
        "classifier", evidence, VIBRATION_CLASSIFIER_WEIGHTS, VIBRATION_CLASSIFIER_BIAS,
        "classifier/logits", NO_ACTIVATION,
    )
    probabilities = graph.add_softmax(logits, "probabilities")
    return graph.finish("edge-agent vibration-anomaly 1.0.0 (hand-designed weights)",
                        features, probabilities)


def sensor_input_quantization() -> tuple[float, int]:
    """Scale and zero point of the sensor-state `readings` tensor."""
    return range_quantization(*SENSOR_INPUT_RANGE)


def build_sensor_state() -> bytes:
    """Fully int8 model: readings[1,4] -> FC(6, ReLU) -> FC(4) -> SOFTMAX -> probabilities[1,4]."""
    graph = GraphBuilder()
    readings = graph.add_tensor("readings", [1, len(SENSOR_READINGS)], schema.TensorType.INT8,
                                quantization=sensor_input_quantization())
    evidence = graph.add_int8_fully_connected(
        "detectors", readings, SENSOR_DETECTOR_WEIGHTS, SENSOR_DETECTOR_BIAS,
        "detectors/evidence", range_quantization(*SENSOR_EVIDENCE_RANGE), RELU,
    )
    logits = graph.add_int8_fully_connected(
        "classifier", evidence, SENSOR_CLASSIFIER_WEIGHTS, SENSOR_CLASSIFIER_BIAS,
        "classifier/logits", (SENSOR_LOGIT_SCALE, SENSOR_LOGIT_ZERO_POINT), NO_ACTIVATION,
    )
    probabilities = graph.add_softmax(logits, "probabilities")
    return graph.finish("edge-agent sensor-state 1.0.0 (hand-designed int8 weights)",
                        readings, probabilities)


def _vibration_sample(rng: random.Random, label: str) -> list[float]:
    """One synthetic feature vector for a machine in the given condition."""
    if label == "normal":
        rms, crest, kurt = rng.uniform(0.05, 0.45), rng.uniform(2.2, 4.0), rng.uniform(2.5, 4.0)
        low, high, temp = rng.uniform(0.35, 0.65), rng.uniform(0.05, 0.25), rng.uniform(25, 55)
    elif label == "imbalance":
        rms, crest, kurt = rng.uniform(0.4, 2.0), rng.uniform(1.4, 2.5), rng.uniform(1.5, 3.0)
        low, high, temp = rng.uniform(0.6, 0.95), rng.uniform(0.01, 0.1), rng.uniform(30, 65)
    else:
        rms, crest, kurt = rng.uniform(0.15, 1.0), rng.uniform(3.5, 9.0), rng.uniform(4.0, 15.0)
        low, high, temp = rng.uniform(0.1, 0.5), rng.uniform(0.25, 0.6), rng.uniform(40, 90)
    mid = max(0.0, 1.0 - low - high)
    return [rms, rms * crest, crest, kurt, low, mid, high, temp]


def _sensor_sample(rng: random.Random, label: str) -> list[float]:
    """One synthetic reading vector for a room in the given state."""
    u = rng.uniform
    if label == "idle":
        return [u(17, 27), u(30, 60), u(4, 9), u(0, 20)]
    if label == "occupied":
        return [u(19, 28), u(35, 65), u(5, 12), u(25, 100)]
    if label == "ventilate":
        if rng.random() < 0.5:
            return [u(19, 29), u(35, 65), u(13, 30), u(0, 100)]
        return [u(19, 29), u(78, 95), u(5, 10), u(0, 100)]
    if rng.random() < 0.5:
        return [u(42, 70), u(5, 40), u(4, 12), u(0, 100)]
    return [u(17, 28), u(0, 1), u(4, 10), u(0, 100)]


def evaluate_accuracy(model: bytes, labels: Sequence[str],
                      sample: Callable[[random.Random, str], list[float]]) -> float:
    """Fraction of a seeded synthetic evaluation set that the model labels correctly."""
    rng = random.Random(EVALUATION_SEED)
    rows, truth = [], []
    for label_index, label in enumerate(labels):
        for _ in range(EVALUATION_SAMPLES_PER_LABEL):
            rows.append(sample(rng, label))
            truth.append(label_index)
    predicted = np.argmax(run_model(model, rows), axis=1)
    return round(float(np.mean(predicted == np.asarray(truth))), 2)


def _vibration_entry(model: bytes) -> dict:
    return {
        "id": "vibration-anomaly",
        "version": "1.0.0",
        "task": "vibration-anomaly",
        "file": "vibration_anomaly.tflite",
        "sha256": hashlib.sha256(model).hexdigest(),
        "description": "Classifies a rotating machine's vibration summary as normal, "
                       "imbalance or bearing wear.",
        "labels": VIBRATION_LABELS,
        "inputs": [{
            "name": "features",
            "description": "8 float32 values from one accelerometer window: rms_g (RMS acceleration, "
                           "g, 0.05-3), peak_g (peak acceleration, g, 0.1-20), crest_factor "
                           "(peak/rms, 1.4-12), kurtosis (3 for Gaussian noise, 1.5-20), band_low, "
                           "band_mid, band_high (fractions of spectral energy below 100 Hz, "
                           "100 Hz-1 kHz and above 1 kHz, each 0-1, summing to ~1), temperature_c "
                           "(bearing housing temperature, degC, 10-100).",
            "shape": [1, 8],
            "dtype": "float32",
        }],
        "outputs": [{
            "name": "probabilities",
            "description": "Softmax probabilities in label order: normal, imbalance, bearing_wear.",
            "shape": [1, 3],
            "dtype": "float32",
        }],
        "examples": [
            {"title": "healthy motor",
             "inputs": {"features": [[0.2, 0.62, 3.1, 3.0, 0.5, 0.35, 0.15, 41.0]]},
             "expect": "normal"},
            {"title": "unbalanced fan rotor",
             "inputs": {"features": [[1.1, 1.9, 1.7, 1.9, 0.86, 0.1, 0.04, 52.0]]},
             "expect": "imbalance"},
            {"title": "worn bearing running hot",
             "inputs": {"features": [[0.5, 3.1, 6.2, 8.5, 0.2, 0.3, 0.5, 71.0]]},
             "expect": "bearing_wear"},
            {"title": "early bearing wear, still quiet",
             "inputs": {"features": [[0.25, 1.5, 6.0, 6.0, 0.4, 0.3, 0.3, 45.0]]},
             "expect": "bearing_wear"},
        ],
        "pinned": False,
        "priority": 10,
        "accuracy": evaluate_accuracy(model, VIBRATION_LABELS, _vibration_sample),
    }


def _sensor_entry(model: bytes) -> dict:
    scale, zero_point = sensor_input_quantization()
    return {
        "id": "sensor-state",
        "version": "1.0.0",
        "task": "sensor-state",
        "file": "sensor_state.tflite",
        "sha256": hashlib.sha256(model).hexdigest(),
        "description": "Infers a room's state (idle, occupied, needs ventilation, or fault: "
                       "overheating or a dead humidity sensor) from temperature, humidity, CO2 "
                       "and motion readings.",
        "labels": SENSOR_LABELS,
        "inputs": [{
            "name": "readings",
            "description": "4 real values, each valid in 0-100: temperature_c (degC), humidity_pct "
                           "(% relative humidity), co2_hppm (CO2 in hundreds of ppm, 8.5 = 850 ppm), "
                           "motion_pct (% of the last minute with motion detected). The tensor is "
                           f"int8: quantize with scale {scale!r} and zero point {zero_point}.",
            "shape": [1, 4],
            "dtype": "int8",
        }],
        "outputs": [{
            "name": "probabilities",
            "description": "int8 softmax probabilities in label order: idle, occupied, ventilate, "
                           "fault; dequantize with scale 1/256 and zero point -128.",
            "shape": [1, 4],
            "dtype": "int8",
        }],
        "examples": [
            {"title": "empty office at night",
             "inputs": {"readings": [[21.0, 45.0, 4.5, 0.0]]}, "expect": "idle"},
            {"title": "meeting in progress",
             "inputs": {"readings": [[23.5, 48.0, 8.5, 65.0]]}, "expect": "occupied"},
            {"title": "stuffy meeting room, CO2 1600 ppm",
             "inputs": {"readings": [[24.0, 52.0, 16.0, 40.0]]}, "expect": "ventilate"},
            {"title": "steamy bathroom",
             "inputs": {"readings": [[26.0, 88.0, 6.0, 10.0]]}, "expect": "ventilate"},
            {"title": "overheating sensor enclosure",
             "inputs": {"readings": [[58.0, 20.0, 5.0, 0.0]]}, "expect": "fault"},
            {"title": "humidity sensor disconnected",
             "inputs": {"readings": [[22.0, 0.0, 6.0, 30.0]]}, "expect": "fault"},
        ],
        "pinned": False,
        "priority": 10,
        "accuracy": evaluate_accuracy(model, SENSOR_LABELS, _sensor_sample),
    }


def write_models(out_dir: Path) -> list[Path]:
    """Write both .tflite files and manifest.json into `out_dir`; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vibration = build_vibration_anomaly()
    sensor = build_sensor_state()
    entries = [_vibration_entry(vibration), _sensor_entry(sensor)]
    written = []
    for entry, model in zip(entries, (vibration, sensor), strict=True):
        path = out_dir / entry["file"]
        path.write_bytes(model)
        written.append(path)
    manifest = out_dir / MANIFEST_NAME
    manifest.write_text(json.dumps({"models": entries}, indent=2) + "\n", encoding="utf-8")
    written.append(manifest)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the bundled models into the directory given as argument (default: models/)."""
    args = list(sys.argv[1:] if argv is None else argv)
    out_dir = Path(args[0]) if args else MODELS_DIR
    for path in write_models(out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
