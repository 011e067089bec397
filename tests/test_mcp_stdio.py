"""``edge-agent mcp-stdio`` driven by the official MCP SDK's client, against a real agent on a real broker.

Each test spawns ``python -m agent mcp-stdio`` as an MCP host would and talks to it over stdio; the
bridge forwards to an in-process agent ("dev1") through the ``local_broker`` mosquitto.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, ClientSession, MCPError, StdioServerParameters, stdio_client
from mcp.types import CallToolResult, TextContent
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from PIL import Image

from agent.models.devmodels import add_face_detector
from agent.mqtt.localbroker import MosquittoProcess
from tests.fixtures.agents import REPO_ROOT
from tests.fixtures.real_models import ASTRONAUT, ASTRONAUT_FACE, box_iou


def bridge_parameters(port: int, device: str = "dev1", *extra: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "agent", "mcp-stdio", "--device", device, "--host", "127.0.0.1", "--port", str(port), *extra],
        cwd=REPO_ROOT,
    )


@asynccontextmanager
async def bridge_session(parameters: StdioServerParameters) -> AsyncIterator[ClientSession]:
    """An initialized MCP session with a freshly spawned bridge (the handshake a desktop host does)."""
    async with stdio_client(parameters) as (read_stream, write_stream):
        async with ClientSession(read_stream, write_stream) as session:
            await session.initialize()
            yield session


def manifest_example(models_dir: Path, model_id: str, index: int = 0) -> dict[str, Any]:
    manifest = json.loads((models_dir / "manifest.json").read_text())
    entry = next(model for model in manifest["models"] if model["id"] == model_id)
    return entry["examples"][index]


def text_of(result: CallToolResult) -> str:
    return " ".join(part.text for part in result.content if isinstance(part, TextContent))


@pytest.fixture
def device(start_agent: Callable[..., Any], local_broker: MosquittoProcess) -> MosquittoProcess:
    """A running agent "dev1"; the value is the broker a bridge must connect to."""
    start_agent()
    return local_broker


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_initialize_list_and_call(device: MosquittoProcess, models_dir: Path, mode: str) -> None:
    """Both protocol eras: the initialize handshake, and server/discover (what ``auto`` negotiates)."""
    example = manifest_example(models_dir, "vibration-anomaly", 2)

    async def scenario() -> None:
        async with Client(bridge_parameters(device.port), mode=mode) as client:
            eras = HANDSHAKE_PROTOCOL_VERSIONS if mode == "legacy" else MODERN_PROTOCOL_VERSIONS
            assert client.protocol_version in eras
            assert client.server_info is not None and client.server_info.name == "edge-agent-bridge"
            assert client.instructions is not None and "'dev1'" in client.instructions
            assert client.server_capabilities.tools is not None

            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            assert {"vibration-anomaly", "sensor-state", "face-detector"} <= set(tools)
            vibration = tools["vibration-anomaly"].input_schema
            assert vibration["required"] == ["features"]
            assert vibration["properties"]["features"]["items"]["maxItems"] == 8
            image = tools["face-detector"].input_schema["properties"]["image"]
            assert image["type"] == "array" and image["minItems"] == 1
            assert tools["sensor-state"].description

            result = await client.call_tool("vibration-anomaly", example["inputs"])
            assert result.is_error is not True
            assert result.structured_content is not None
            assert result.structured_content["model"] == "vibration-anomaly"
            assert result.structured_content["top"][0]["label"] == example["expect"]
            assert example["expect"] in text_of(result)

    anyio.run(scenario)


def test_bad_arguments_are_a_tool_error(device: MosquittoProcess) -> None:
    async def scenario() -> None:
        async with bridge_session(bridge_parameters(device.port)) as session:
            wrong_shape = await session.call_tool("vibration-anomaly", {"features": [[1.0, 2.0]]})
            assert wrong_shape.is_error is True
            assert "features" in text_of(wrong_shape)

            unknown_input = await session.call_tool("vibration-anomaly", {"signal": [[0.0] * 8]})
            assert unknown_input.is_error is True
            assert text_of(unknown_input)

    anyio.run(scenario)


def test_unknown_tool_is_an_mcp_error_with_the_device_message(device: MosquittoProcess) -> None:
    async def scenario() -> None:
        async with bridge_session(bridge_parameters(device.port)) as session:
            with pytest.raises(MCPError) as raised:
                await session.call_tool("no-such-model", {"x": [[1.0]]})
            assert raised.value.code == -32602
            assert "no-such-model" in raised.value.message
            # The bridge is still serving after the error.
            assert (await session.list_tools()).tools

    anyio.run(scenario)


def test_silent_device_gives_a_tool_error_not_a_crash(device: MosquittoProcess) -> None:
    """A device id nobody serves: the call times out (after --timeout) and the bridge keeps running."""

    async def scenario() -> None:
        parameters = bridge_parameters(device.port, "absent-device", "--timeout", "0.5")
        async with bridge_session(parameters) as session:
            result = await session.call_tool("vibration-anomaly", {"features": [[0.0] * 8]})
            assert result.is_error is True
            assert "absent-device" in text_of(result)
            with pytest.raises(MCPError) as raised:
                await session.list_tools()
            assert "absent-device" in raised.value.message
            await session.send_ping()

    anyio.run(scenario)


def test_unreachable_broker_gives_a_tool_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    async def scenario() -> None:
        async with bridge_session(bridge_parameters(closed_port, "dev1", "--timeout", "0.5")) as session:
            result = await session.call_tool("vibration-anomaly", {"features": [[0.0] * 8]})
            assert result.is_error is True
            assert f"127.0.0.1:{closed_port}" in text_of(result)

    anyio.run(scenario)


def test_a_detector_tool_takes_a_picture_and_answers_detections(
    start_agent: Callable[..., Any], local_broker: MosquittoProcess, models_dir: Path
) -> None:
    """The SDK checks structuredContent against the tool's outputSchema: both follow the detection head."""
    add_face_detector(models_dir, "faces", head=True)
    start_agent()
    buffer = io.BytesIO()
    Image.open(ASTRONAUT).convert("RGB").save(buffer, "JPEG", quality=85)
    picture = {"b64": base64.b64encode(buffer.getvalue()).decode()}

    async def scenario() -> None:
        async with Client(bridge_parameters(local_broker.port), mode="legacy") as client:
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            assert tools["faces"].input_schema["required"] == ["image"]
            assert tools["faces"].output_schema is not None and "detections" in tools["faces"].output_schema["required"]
            result = await client.call_tool("faces", {"image": picture, "max_detections": 1})
            assert result.is_error is not True and result.structured_content is not None
            [face] = result.structured_content["detections"]
            assert face["label"] == "face" and box_iou(face["box"], ASTRONAUT_FACE) >= 0.5
            assert "1 detection(s)" in text_of(result)

    anyio.run(scenario)
