"""Real models end to end, over a real mosquitto and a real agent: two clients stream audio to the stateful
wake-word model at once and each gets exactly what it would alone; a restart starts every stream over and
says so; a camera client sends a JPEG and gets the face detections back."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from agent.app import Agent
from agent.models.devmodels import add_face_detector, add_wake_word, copy_bundled_models
from agent.mqtt.localbroker import MosquittoProcess
from agent.tools.client import DeviceClient
from tests.fixtures.agents import started_agents
from tests.fixtures.real_models import ASTRONAUT, ASTRONAUT_FACE, audio_features, box_iou, wake_word_alone


@pytest.fixture
def real_models(tmp_path: Path) -> Path:
    models = copy_bundled_models(tmp_path / "models")
    add_face_detector(models, "faces", head=True)
    add_wake_word(models)
    return models


@pytest.fixture
def agents(local_broker: MosquittoProcess, real_models: Path, tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    with started_agents(local_broker, real_models, tmp_path / "data") as start:
        yield start


def _chunk_params(chunk: Any, **params: Any) -> dict[str, Any]:
    return {"model": "okay-nabu", "inputs": {"input_audio": chunk.tolist()}, **params}


def test_two_clients_streaming_at_once_each_get_what_they_getwake_word_alone(agents, client_factory) -> None:
    agents()
    alice, bob = client_factory("alice"), client_factory("bob")
    audio = {"alice": audio_features(11), "bob": audio_features(12)}
    scores: dict[str, list[float]] = {"alice": [], "bob": []}
    for index in range(len(audio["alice"])):
        # Both requests are in flight together: the agent may serve them on two workers at once.
        pending = {name: client.send("infer", _chunk_params(audio[name][index])) for name, client in [("alice", alice), ("bob", bob)]}
        for name, future in pending.items():
            result = future.result(30)["result"]
            scores[name].append(result["outputs"]["dense_1"][0][0])
            assert result["stream"]["runs"] == index + 1
    assert scores == {name: wake_word_alone(chunks) for name, chunks in audio.items()}


def test_streams_sent_back_to_back_still_run_in_arrival_order(agents, client_factory) -> None:
    """Every chunk published at once: two workers take a client's consecutive requests together, and the
    stream must still run them in the order they arrived."""
    agents()
    clients = {name: client_factory(name) for name in ("alice", "bob")}
    audio = {"alice": audio_features(14), "bob": audio_features(15)}
    pending = {name: [clients[name].send("infer", _chunk_params(chunk)) for chunk in audio[name]] for name in clients}
    scores = {name: [future.result(60)["result"]["outputs"]["dense_1"][0][0] for future in futures]
              for name, futures in pending.items()}
    assert scores == {name: wake_word_alone(chunks) for name, chunks in audio.items()}


def test_a_restart_starts_every_stream_over_and_the_reply_says_so(agents, client_factory) -> None:
    chunks = audio_features(13)
    first = agents()
    client = client_factory("alice")
    for chunk in chunks[:3]:
        assert "error" not in client.call("infer", _chunk_params(chunk, stream="mic"))
    first.stop()
    agents()
    after = client.call("infer", _chunk_params(chunks[3], stream="mic"))["result"]
    assert after["stream"] == {"id": "mic", "reset": True, "reason": "new", "runs": 1}
    assert after["outputs"]["dense_1"][0][0] == wake_word_alone(chunks[3:4])[0]


def test_a_jpeg_in_detections_out(agents, client_factory) -> None:
    agents()
    client: DeviceClient = client_factory("camera")
    buffer = io.BytesIO()
    Image.open(ASTRONAUT).convert("RGB").resize((640, 480)).save(buffer, "JPEG", quality=85)
    reply = client.call("infer", {"model": "faces", "image": {"b64": base64.b64encode(buffer.getvalue()).decode()}})
    [face] = reply["result"]["detections"]
    assert face["label"] == "face" and box_iou(face["box"], ASTRONAUT_FACE) >= 0.5
    not_a_picture = client.call("infer", {"model": "faces", "image": {"b64": base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()}})
    assert not_a_picture["error"]["code"] == -32602
