"""``edge-agent mcp-stdio``: a stdio MCP server whose tools are one device's models, reached over MQTT.

An MCP host (Claude Desktop, an IDE) starts this process and speaks MCP on its stdin/stdout. Each
``tools/list`` and ``tools/call`` is forwarded as a JSON-RPC request to the device's agent through the
device's local broker (:class:`~agent.client.DeviceClient`), and the device's answer is handed back:
its tool list, its tool results, and its JSON-RPC errors as MCP errors. A device that cannot be reached
or does not answer in time becomes a tool error the host can show, never a crash of the bridge.

Only this command needs the ``mcp`` package (the ``[mcp]`` extra); the CLI imports this module lazily.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import anyio
from mcp import types
from mcp.server import Server, ServerRequestContext
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel, ConfigDict, ValidationError

from agent import __version__
from agent.config import LocalBroker
from agent.errors import AgentError
from agent.tools.client import DeviceClient, ReplyTimeout

SERVER_NAME = "edge-agent-bridge"
INTERNAL_ERROR = -32603

log = logging.getLogger(__name__)


class DeviceUnavailable(AgentError):
    """The device's broker cannot be reached, or the device did not answer in time."""


class RpcError(BaseModel):
    """A JSON-RPC error object as the device sends it."""

    code: int
    message: str
    data: Any = None


class DeviceReply(BaseModel):
    """A JSON-RPC reply from the device: exactly one of ``result`` and ``error``."""

    model_config = ConfigDict(extra="ignore")

    result: dict[str, Any] | None = None
    error: RpcError | None = None


class DeviceLink:
    """Requests to one device, connecting to its broker on first use and again after a failed attempt.

    Connecting lazily lets an MCP host start the bridge before the device's broker is up: the host
    still gets a working MCP server, and each request says why the device is out of reach.
    """

    def __init__(self, broker: LocalBroker, device_id: str, *, timeout: float, connect_timeout: float = 5.0) -> None:
        self.broker = broker
        self.device_id = device_id
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._client: DeviceClient | None = None
        self._lock = threading.Lock()

    def _connected(self) -> DeviceClient:
        with self._lock:
            if self._client is None:
                try:
                    self._client = DeviceClient(self.broker, self.device_id, connect_timeout=self.connect_timeout)
                except (AgentError, OSError) as exc:
                    raise DeviceUnavailable(
                        f"cannot reach the broker of device {self.device_id!r} at "
                        f"{self.broker.host}:{self.broker.port}: {exc}"
                    ) from None
            return self._client

    def request(self, method: str, params: dict[str, Any] | None) -> dict[str, Any]:
        """Send one request to the device and block for its ``result`` (run this off the event loop).

        A JSON-RPC error from the device is raised as an MCPError with the device's code and message.
        """
        client = self._connected()
        try:
            reply = client.call(method, params, timeout=self.timeout)
        except ReplyTimeout as exc:
            raise DeviceUnavailable(f"{exc}; is the agent running and subscribed on this broker?") from None
        try:
            parsed = DeviceReply.model_validate(reply)
        except ValidationError as exc:
            raise MCPError(INTERNAL_ERROR, f"device {self.device_id!r} sent a malformed reply to {method}: {exc}") from None
        if parsed.error is not None:
            raise MCPError(parsed.error.code, parsed.error.message, parsed.error.data)
        if parsed.result is None:
            raise MCPError(INTERNAL_ERROR, f"device {self.device_id!r} sent a reply to {method} without a result")
        return parsed.result

    async def forward(self, method: str, params: dict[str, Any] | None) -> dict[str, Any]:
        """:meth:`request` on a worker thread; the device's ``result``, or MCPError / DeviceUnavailable."""
        call = functools.partial(self.request, method, params)
        # Abandoned on cancellation: the thread then ends by itself within ``timeout``.
        return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _validated(model: type[BaseModel], result: dict[str, Any], what: str, device_id: str) -> Any:
    try:
        return model.model_validate(result)
    except ValidationError as exc:
        raise MCPError(INTERNAL_ERROR, f"device {device_id!r} answered {what} with an invalid result: {exc}") from None


def build_server(link: DeviceLink) -> Server[Any]:
    """The MCP server whose ``tools/list`` and ``tools/call`` are forwarded over ``link``."""

    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        forwarded = {"cursor": params.cursor} if params is not None and params.cursor else None
        try:
            result = await link.forward("tools/list", forwarded)
        except DeviceUnavailable as exc:
            raise MCPError(INTERNAL_ERROR, str(exc)) from None
        return _validated(types.ListToolsResult, result, "tools/list", link.device_id)

    async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        try:
            result = await link.forward("tools/call", {"name": params.name, "arguments": params.arguments or {}})
        except DeviceUnavailable as exc:
            log.warning("tools/call %s: %s", params.name, exc)
            return types.CallToolResult(content=[types.TextContent(type="text", text=str(exc))], is_error=True)
        return _validated(types.CallToolResult, result, f"tools/call {params.name}", link.device_id)

    return Server(
        SERVER_NAME,
        version=__version__,
        title=f"edge-agent device {link.device_id}",
        instructions=(
            f"Each tool runs one TensorFlow Lite model on edge device {link.device_id!r}, reached over MQTT "
            f"through the broker at {link.broker.host}:{link.broker.port}. Pass every input as a nested list "
            "of numbers with the shape its input schema gives, or a picture as image.b64 (JPEG or PNG) where the "
            "schema asks for one; top_k sets how many labels a classifier ranks, score_threshold and "
            "max_detections what a detector reports, stream which of your streams a stateful model continues."
        ),
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


async def serve_stdio(broker: LocalBroker, device_id: str, *, timeout: float = 30.0) -> None:
    """Serve MCP on this process's stdin/stdout until the host closes stdin."""
    link = DeviceLink(broker, device_id, timeout=timeout)
    server = build_server(link)
    log.info("MCP bridge for device %r via %s:%d on stdio", device_id, broker.host, broker.port)
    try:
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())
    finally:
        link.close()


def run_stdio_bridge(broker: LocalBroker, device_id: str, *, timeout: float = 30.0) -> None:
    """Blocking entry point for ``edge-agent mcp-stdio``."""
    anyio.run(functools.partial(serve_stdio, broker, device_id, timeout=timeout))
