"""The package's one exception hierarchy.

Everything the agent raises on purpose derives from :class:`AgentError`. Errors a client can cause (or
that the agent reports to a client) derive from :class:`RequestError` and carry a stable JSON-RPC code,
so the request path turns any of them into an error reply without a lookup table.
"""

from __future__ import annotations

from typing import Any


class AgentError(Exception):
    """Base of every error the agent raises deliberately."""


class ConfigError(AgentError):
    """The configuration or a profile is invalid; the message names the key and the file."""


class ModelError(AgentError):
    """A model file or manifest entry cannot be used (missing, wrong sha256, unreadable)."""


class OutboxError(AgentError):
    """The durable outbox cannot store or deliver (disk full, database unusable)."""


class PeerViolation(AgentError, ConnectionAbortedError):
    """An MQTT peer broke a limit we announced (Maximum Packet Size, Receive Maximum): the connection is cut.

    An ``OSError`` too, because paho treats exactly those, raised while it reads, as a lost connection."""


class UpstreamFormatError(AgentError):
    """An upstream message (single or batch envelope, docs/cloud.md) cannot be decoded."""


class SigningError(AgentError):
    """The signer cannot sign: TPM absent, locked out, wrong key at the handle, key file unusable."""


class SignatureInvalid(SigningError):
    """A captured message fails verification; ``reason`` is a stable code for scripts and logs:
    unsigned, malformed, bad_signature, certificate_invalid, certificate_expired, foreign_certificate,
    request_mismatch, device_mismatch."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


class DeployError(AgentError):
    """A deployment step refused or failed; the message is the one-line reason reported upstream."""


class ProvisioningError(AgentError):
    """A fleet or device provisioning step cannot proceed: missing CA, bad CSR, unknown or revoked device."""


class RequestError(AgentError):
    """An error reported to a client as a JSON-RPC error object."""

    code: int = -32603
    name: str = "internal_error"

    def __init__(self, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data or {}


class ParseError(RequestError):
    code = -32700
    name = "parse_error"


class InvalidRequest(RequestError):
    code = -32600
    name = "invalid_request"


class MethodNotFound(RequestError):
    code = -32601
    name = "method_not_found"


class InvalidParams(RequestError):
    code = -32602
    name = "invalid_params"


class InternalError(RequestError):
    code = -32603
    name = "internal_error"


class Overloaded(RequestError):
    """The intake buffer is full and this client holds the most of it, or the process is over its memory
    soft limit; ``data.retry_after_ms`` says when to try again."""

    code = -32001
    name = "overloaded"


class ModelUnavailable(RequestError):
    """The model exists in the manifest but cannot be served (integrity check or load failed)."""

    code = -32002
    name = "model_unavailable"


class RateLimited(RequestError):
    code = -32003
    name = "rate_limited"


class ResponseTopicRefused(RequestError):
    """The request's MQTT 5 Response Topic or Correlation Data is not allowed."""

    code = -32004
    name = "response_topic_refused"


class InferenceFailed(RequestError):
    """The interpreter raised while running a valid request."""

    code = -32005
    name = "inference_failed"


class ModelTooLarge(RequestError):
    """The model can never fit in this profile's model memory budget."""

    code = -32006
    name = "model_too_large"


class DeadlineUnmeetable(RequestError):
    """The request's deadline (Message Expiry or ``timeout_ms``) is earlier than the wait ahead of it."""

    code = -32008
    name = "deadline_unmeetable"


class UpstreamTimeout(RequestError):
    """A request forwarded to the cloud got no answer before its deadline."""

    code = -32007
    name = "upstream_timeout"
