"""Task heads against reference computations: a real ``TFLite_Detection_PostProcess`` model (built here, run
by the runtime) decoded into detections, MediaPipe-style SSD anchors, box decoding and non-maximum
suppression, and the MediaPipe face detector on a real photograph shipped by scikit-image."""

from __future__ import annotations

import base64
import io
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from agent.config import Limits
from agent.models.devmodels import FACE_DETECTION_HEAD, add_face_detector
from agent.models.heads import detections, iou, ssd_anchors, top_labels
from agent.models.images import Frame
from agent.models.manager import ModelManager
from agent.models.taskspec import AnchorConfig, DetectionHead
from agent.serving.protocol import Request
from agent.serving.service import RequestService, Timing
from tests.fixtures.generated_models import add_model, constant_classifier, detection_postprocess_model
from tests.fixtures.real_models import ASTRONAUT, ASTRONAUT_FACE, box_iou, face_detector_outputs, face_detector_pictures

LABELS = ["cat", "dog", "bird"]


def _service(models: Path) -> RequestService:
    manager = ModelManager(models)
    assert manager.verify_all() == {}
    return RequestService(manager, Limits(), device_id="d", profile="p")


def _call(service: RequestService, method: str, params: dict[str, Any]) -> dict[str, Any]:
    return service.handle(Request(jsonrpc="2.0", method=method, params=params, id=1), Timing(received=time.monotonic()), "c")


# ---- TFLite_Detection_PostProcess -----------------------------------------------------------------------

def _grid_anchors(side: int) -> np.ndarray:
    centres = (np.arange(side) + 0.5) / side
    return np.array([[y, x, 1.5 / side, 1.5 / side] for y in centres for x in centres], dtype=np.float32)


def _reference_postprocess(
    anchors: np.ndarray, encodings: np.ndarray, scores: np.ndarray, iou_threshold: float
) -> list[tuple[list[float], int, float]]:
    """Center-size decode, best non-background class per box, greedy NMS: plain Python, one box at a time."""
    candidates = []
    for (ya, xa, ha, wa), (ty, tx, th, tw), row in zip(anchors, encodings, scores):
        y, x = ty / 10 * ha + ya, tx / 10 * wa + xa
        h, w = math.exp(th / 5) * ha, math.exp(tw / 5) * wa
        klass = int(np.argmax(row[1:]))
        candidates.append(([x - w / 2, y - h / 2, x + w / 2, y + h / 2], klass, float(row[1 + klass])))
    candidates.sort(key=lambda item: -item[2])
    kept: list[tuple[list[float], int, float]] = []
    for box, klass, score in candidates:
        if all(iou(np.array(box), np.array([other]))[0] <= iou_threshold for other, _, _ in kept):
            kept.append((box, klass, score))
    return kept


def test_tflite_postprocess_head_matches_the_reference(tmp_path: Path) -> None:
    anchors = _grid_anchors(4)
    add_model(
        tmp_path, "ssd", detection_postprocess_model(anchors, num_classes=3, max_detections=6), labels=LABELS,
        head={"type": "detection", "format": "tflite_postprocess", "score_threshold": 0.3},
    )
    service = _service(tmp_path)
    rng = np.random.default_rng(7)
    encodings = rng.normal(0, 1, size=(16, 4)).astype(np.float32)
    scores = rng.uniform(0, 1, size=(16, 4)).astype(np.float32)
    inputs = {"raw_boxes": encodings[None].tolist(), "raw_scores": scores[None].tolist()}

    result = _call(service, "infer", {"model": "ssd", "inputs": inputs})
    expected = [item for item in _reference_postprocess(anchors, encodings, scores, 0.6)[:6] if item[2] >= 0.3]
    assert "outputs" not in result and len(result["detections"]) == len(expected) >= 2
    for found, (box, klass, score) in zip(result["detections"], expected):
        assert found["label"] == LABELS[klass]
        assert found["score"] == pytest.approx(score, abs=1e-6)
        assert found["box"] == pytest.approx(np.clip(box, 0, 1).tolist(), abs=1e-5)

    fewer = _call(service, "infer", {"model": "ssd", "inputs": inputs, "max_detections": 1, "score_threshold": 0.0,
                                     "raw_outputs": True})
    assert len(fewer["detections"]) == 1 and fewer["detections"][0]["score"] == pytest.approx(expected[0][2], abs=1e-6)
    assert set(fewer["outputs"]) == {"detection_boxes", "detection_classes", "detection_scores", "num_detections"}


def test_a_head_that_does_not_fit_the_outputs_refuses_the_model(tmp_path: Path) -> None:
    add_model(tmp_path, "flat", constant_classifier([0.5, 0.5]), labels=["a", "b"],
              head={"type": "detection", "format": "tflite_postprocess"})
    manager = ModelManager(tmp_path)
    assert "tflite_postprocess needs outputs" in manager.verify_all()["flat"]


# ---- SSD anchors (MediaPipe) ----------------------------------------------------------------------------

def test_face_detector_anchors_are_mediapipes() -> None:
    anchors = ssd_anchors(AnchorConfig.model_validate(FACE_DETECTION_HEAD["anchors"]).model_dump_json())
    # Closed form for this config: a 16 x 16 grid (stride 8) with 2 anchors per cell, then an 8 x 8 grid
    # (three stride-16 layers) with 6; fixed size 1.
    fine = [((x + 0.5) / 16, (y + 0.5) / 16) for y in range(16) for x in range(16) for _ in range(2)]
    coarse = [((x + 0.5) / 8, (y + 0.5) / 8) for y in range(8) for x in range(8) for _ in range(6)]
    np.testing.assert_allclose(anchors[:, :2], np.array(fine + coarse), atol=1e-7)
    assert (anchors[:, 2:] == 1.0).all() and len(anchors) == 896


def _reference_score(head: DetectionHead, logit: float) -> float:
    if head.score_clipping is not None:
        logit = min(max(logit, -head.score_clipping), head.score_clipping)
    if not head.sigmoid_scores:
        return logit
    return 1 / (1 + math.exp(-logit)) if logit > -700 else 0.0


def _reference_candidates(
    head: DetectionHead, anchors: np.ndarray, raw: np.ndarray, logits: np.ndarray, threshold: float
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's TensorsToDetections, one anchor at a time in float64: (box, keypoints, score), best first."""
    decoded = []
    points = head.num_keypoints
    for (ax, ay, aw, ah), values, logit in zip(anchors.astype(np.float64), raw.astype(np.float64), logits[:, 0]):
        score = _reference_score(head, float(logit))
        if score < threshold:
            continue
        cx, cy = values[0] / 128 * aw + ax, values[1] / 128 * ah + ay
        w, h = values[2] / 128 * aw, values[3] / 128 * ah
        keypoints = [[values[4 + 2 * k] / 128 * aw + ax, values[5 + 2 * k] / 128 * ah + ay] for k in range(points)]
        box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        decoded.append((box, np.array(keypoints).reshape(points, 2), score))
    decoded.sort(key=lambda item: -item[2])
    return decoded


def _reference_iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - width * height
    return width * height / union if union > 0 else 0.0


def _reference_suppression(
    head: DetectionHead, decoded: list[tuple[np.ndarray, np.ndarray, float]]
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Non-maximum suppression, hard or MediaPipe's weighted blending, over candidates sorted best first."""
    kept = []
    while decoded:
        best = decoded[0]
        cluster = [item for item in decoded if item is best or _reference_iou(best[0], item[0]) > head.iou_threshold]
        if head.nms == "weighted":
            total = sum(item[2] for item in cluster)
            box = sum(item[0] * item[2] for item in cluster) / total
            points = sum(item[1] * item[2] for item in cluster) / total
            kept.append((box, points, best[2]))
        else:
            kept.append(best)
        decoded = [item for item in decoded if not any(item is other for other in cluster)]
    return kept


def _reference_ssd(
    head: DetectionHead, anchors: np.ndarray, raw: np.ndarray, logits: np.ndarray, threshold: float
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's TensorsToDetections then non-maximum suppression, one anchor at a time."""
    return _reference_suppression(head, _reference_candidates(head, anchors, raw, logits, threshold))


def _assert_detections_are(found: list[dict[str, Any]], expected: list[tuple[np.ndarray, np.ndarray, float]]) -> None:
    assert len(found) == len(expected)
    for item, (box, points, score) in zip(found, expected):
        assert item["score"] == pytest.approx(score, abs=1e-6)
        assert item["box"] == pytest.approx(np.clip(box, 0, 1).tolist(), abs=1e-5)
        np.testing.assert_allclose(item.get("keypoints", np.zeros((0, 2))), points, atol=1e-5)


def test_ssd_anchor_head_matches_the_reference_with_weighted_suppression() -> None:
    head = DetectionHead.model_validate(FACE_DETECTION_HEAD)
    assert head.anchors is not None
    anchors = ssd_anchors(head.anchors.model_dump_json())
    rng = np.random.default_rng(3)
    raw = rng.normal(0, 4, size=(896, 16)).astype(np.float32)
    raw[:, 2:4] = rng.uniform(10, 30, size=(896, 2))
    logits = np.full((896, 1), -20.0, dtype=np.float32)
    # Two neighbouring anchors of one cell (blended by weighted NMS) and two far apart.
    for index, logit in [(200, 3.0), (201, 2.0), (700, 1.0), (40, 150.0)]:
        logits[index] = logit
    found = detections(head, ["face"], [raw[None], logits[None]], Frame(), (128, 128), score_threshold=0.5,
                       max_detections=10)
    expected = _reference_ssd(head, anchors, raw, logits, 0.5)
    assert len(expected) == 3
    _assert_detections_are(found, expected)
    hard = detections(head.model_copy(update={"nms": "hard"}), ["face"], [raw[None], logits[None]], Frame(), (128, 128),
                      score_threshold=0.5, max_detections=2)
    assert [item["score"] for item in hard] == [item["score"] for item in found[:2]]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    picture=st.sampled_from(sorted(face_detector_pictures())),
    threshold=st.floats(0.02, 0.98),
    nms=st.sampled_from(["hard", "weighted"]),
    iou_threshold=st.floats(0.05, 0.95),
    clipping=st.sampled_from([None, 100.0, 3.0]),
    sigmoid=st.booleans(),
    limit=st.integers(1, 60),
)
def test_ssd_head_on_real_face_detector_outputs_matches_the_reference(
    picture: str, threshold: float, nms: str, iou_threshold: float, clipping: float | None, sigmoid: bool, limit: int
) -> None:
    """Any threshold, suppression and scoring on the real detector's outputs for real photographs: the same
    detections as the one-anchor-at-a-time reference (candidates are picked on raw logits before scoring)."""
    head = DetectionHead.model_validate(
        {**FACE_DETECTION_HEAD, "nms": nms, "iou_threshold": iou_threshold, "score_clipping": clipping,
         "sigmoid_scores": sigmoid}
    )
    assert head.anchors is not None
    anchors = ssd_anchors(head.anchors.model_dump_json())
    raw, logits = face_detector_outputs()[picture]
    # No anchor's score and no candidate pair's overlap within float32 rounding of a threshold: there the
    # float64 reference and the float32 head may rightly disagree.
    scores = np.array([_reference_score(head, float(logit)) for logit in logits[0, :, 0]])
    assume(np.abs(scores - threshold).min() > 1e-5)
    candidates = _reference_candidates(head, anchors, raw[0], logits[0], threshold)
    assume(len(candidates) <= 300)  # the reference's suppression is quadratic in Python
    overlaps = [_reference_iou(a[0], b[0]) for index, a in enumerate(candidates) for b in candidates[index + 1:]]
    assume(all(abs(overlap - iou_threshold) > 1e-5 for overlap in overlaps))
    found = detections(head, ["face"], [raw, logits], Frame(), (128, 128), score_threshold=threshold,
                       max_detections=limit)
    _assert_detections_are(found, _reference_suppression(head, candidates)[:limit])


@pytest.mark.parametrize("threshold", [0.0, 0.1, 1.0])
def test_every_anchor_or_none_is_a_candidate_at_the_extreme_thresholds(threshold: float) -> None:
    # Clipped at 2, every logit scores at least sigmoid(-2) = 0.119: at 0.0 and 0.1 every anchor is a candidate.
    head = DetectionHead.model_validate({**FACE_DETECTION_HEAD, "score_clipping": 2.0, "nms": "hard"})
    assert head.anchors is not None
    raw, logits = face_detector_outputs()["nine faces"]
    found = detections(head, ["face"], [raw, logits], Frame(), (128, 128), score_threshold=threshold,
                       max_detections=10_000)
    expected = _reference_ssd(head, ssd_anchors(head.anchors.model_dump_json()), raw[0], logits[0], threshold)
    assert (len(expected) > 0) == (threshold < 1.0)
    _assert_detections_are(found, expected)


# ---- the face detector on real photographs --------------------------------------------------------------

@pytest.fixture
def faces(tmp_path: Path) -> RequestService:
    add_face_detector(tmp_path, "faces", head=True)
    return _service(tmp_path)


def _b64(image: Image.Image, kind: str, **options: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_face_in_a_real_photograph_is_found(faces: RequestService) -> None:
    photo = Image.open(ASTRONAUT).convert("RGB")
    as_png = _call(faces, "infer", {"model": "faces", "image": {"b64": _b64(photo, "PNG")}})
    [face] = as_png["detections"]
    assert face["label"] == "face" and face["score"] > 0.8 and box_iou(face["box"], ASTRONAUT_FACE) >= 0.5
    assert len(face["keypoints"]) == 6 and "outputs" not in as_png
    # Six decimals on the wire, not a float32's seventeen digits.
    assert all(round(value, 6) == value for value in [*face["box"], *sum(face["keypoints"], [])])
    # 640 x 480 JPEG: stretched, so the face's relative box is unchanged.
    as_jpeg = _call(faces, "infer", {"model": "faces", "image": {"b64": _b64(photo.resize((640, 480)), "JPEG", quality=85)}})
    assert box_iou(as_jpeg["detections"][0]["box"], ASTRONAUT_FACE) >= 0.5


def test_letterboxed_boxes_are_in_the_pictures_own_coordinates(faces: RequestService) -> None:
    # The top of the photograph around the face, on the right half of a picture twice as wide as high.
    wide = Image.new("RGB", (512, 256), (90, 90, 90))
    wide.paste(Image.open(ASTRONAUT).convert("RGB").crop((96, 0, 352, 256)), (256, 0))
    truth = (ASTRONAUT_FACE * 512 + [256 - 96, 0, 256 - 96, 0]) / [512, 256, 512, 256]
    [face] = _call(faces, "infer", {"model": "faces", "image": {"b64": _b64(wide, "PNG")}})["detections"]
    assert box_iou(face["box"], truth) >= 0.5


def test_nothing_is_found_in_a_blank_picture(faces: RequestService) -> None:
    for colour in [(0, 0, 0), (128, 128, 128), (255, 255, 255)]:
        blank = Image.new("RGB", (640, 480), colour)
        assert _call(faces, "infer", {"model": "faces", "image": {"b64": _b64(blank, "JPEG", quality=85)}})["detections"] == []


def test_the_mcp_tool_takes_a_picture_and_returns_detections(faces: RequestService) -> None:
    [tool] = [tool for tool in _call(faces, "tools/list", {})["tools"] if tool["name"] == "faces"]
    assert tool["inputSchema"]["required"] == ["image"]
    assert {"score_threshold", "max_detections", "raw_outputs"} <= set(tool["inputSchema"]["properties"])
    assert "detections" in tool["outputSchema"]["required"]
    photo = _b64(Image.open(ASTRONAUT).convert("RGB"), "JPEG", quality=85)
    called = _call(faces, "tools/call", {"name": "faces", "arguments": {"image": {"b64": photo}, "max_detections": 1}})
    assert called["isError"] is False and "1 detection(s): face" in called["content"][0]["text"]
    assert box_iou(called["structuredContent"]["detections"][0]["box"], ASTRONAUT_FACE) >= 0.5
    refused = _call(faces, "tools/call", {"name": "faces", "arguments": {"image": {"b64": "bm90IGFuIGltYWdl"}}})
    assert refused["isError"] is True and "no JPEG or PNG" in refused["content"][0]["text"]


# ---- classification -------------------------------------------------------------------------------------

def test_a_classification_head_ranks_labels_and_needs_them(tmp_path: Path) -> None:
    add_model(tmp_path, "ranked", constant_classifier([0.2, 0.5, 0.3]), labels=LABELS, head={"type": "classification"})
    result = _call(_service(tmp_path), "infer", {"model": "ranked", "inputs": {"x": [[0.0, 0.0]]}, "top_k": 2})
    assert [item["label"] for item in result["top"]] == ["dog", "bird"] and "outputs" in result
    add_model(tmp_path, "unlabelled", constant_classifier([0.5, 0.5]), head={"type": "classification"})
    assert "needs labels" in ModelManager(tmp_path).verify_all()["unlabelled"]


def test_top_labels_only_for_scores_that_match_the_labels() -> None:
    scores = np.asarray([[0.2, 0.5, 0.3]], dtype=np.float32)
    assert [item["label"] for item in top_labels(LABELS, scores, 2) or []] == ["dog", "bird"]
    # A detector's raw regressors (no labels, or not one score per label) get no ranking, whatever their size.
    assert top_labels([], np.zeros((1, 896, 16), dtype=np.float32), 3) is None
    assert top_labels(LABELS, np.zeros((1, 896, 16), dtype=np.float32), 3) is None
    assert top_labels(LABELS, scores, 0) is None


def test_the_latency_that_decides_inline_serving_counts_the_decode(faces: RequestService) -> None:
    photo = _b64(Image.open(ASTRONAUT).convert("RGB"), "JPEG", quality=85)
    timing = _call(faces, "infer", {"model": "faces", "image": {"b64": photo}})["timing_ms"]
    entry = faces.models.entry("faces")
    measured = faces.models.stats(entry).latency_ms
    assert measured == pytest.approx(timing["inference"] + timing["preprocess"], abs=0.002)
    assert faces.models.runs_within("faces", measured) and not faces.models.runs_within("faces", timing["inference"])


def test_weighted_suppression_of_scores_that_underflowed_to_zero_blends_equally() -> None:
    """At score_threshold 0 every anchor is a candidate; logits clipped at -100 score exactly 0 in float32, and a
    cluster of them used to divide by zero (NaN boxes in the reply)."""
    head = DetectionHead.model_validate(FACE_DETECTION_HEAD)
    raw = np.zeros((896, 16), dtype=np.float32)
    raw[:, 2:4] = 20.0
    logits = np.full((896, 1), -1000.0, dtype=np.float32)
    found = detections(head, ["face"], [raw[None], logits[None]], Frame(), (128, 128), score_threshold=0.0,
                       max_detections=10_000)
    assert found
    for item in found:
        assert item["score"] == 0.0
        assert all(math.isfinite(value) for value in item["box"])
        assert all(math.isfinite(value) for point in item.get("keypoints", []) for value in point)
