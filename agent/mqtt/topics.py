"""MQTT topic names of the wire contract: built and parsed in one place."""

from __future__ import annotations

REQUEST_PREFIX = "mcp/req"
REPLY_PREFIX = "mcp/res"
STATUS_PREFIX = "mcp/status"
UPSTREAM_PREFIX = "mcp/up"
CLOUD_PREFIX = "mcp/cloud"
IDENTITY_PREFIX = "mcp/identity"
UPSTREAM_BATCH_SUFFIX = "batch"
_FORBIDDEN_IN_SEGMENT = ("+", "#", "\x00", "/")


def request_filter(device_id: str) -> str:
    """The subscription that receives every client's requests for this device."""
    return f"{REQUEST_PREFIX}/{device_id}/+"


def request_topic(device_id: str, client_id: str) -> str:
    return f"{REQUEST_PREFIX}/{device_id}/{client_id}"


def reply_topic(device_id: str, client_id: str) -> str:
    return f"{REPLY_PREFIX}/{device_id}/{client_id}"


def status_topic(device_id: str) -> str:
    return f"{STATUS_PREFIX}/{device_id}"


def upstream_topic(device_id: str, record_class: str) -> str:
    """Where the uplink publishes an outbox record of a class; cloud-fallback requests have their own topic."""
    if record_class == "fallback":
        return cloud_request_topic(device_id)
    return f"{UPSTREAM_PREFIX}/{device_id}/{record_class}"


def upstream_topic_parts(topic: str) -> tuple[str, str] | None:
    """(device, class) of ``mcp/up/{device}/{class}`` or of its batch topic ``.../batch``; None otherwise."""
    parts = topic.split("/")
    if len(parts) not in (4, 5) or f"{parts[0]}/{parts[1]}" != UPSTREAM_PREFIX:
        return None
    if len(parts) == 5 and parts[4] != UPSTREAM_BATCH_SUFFIX:
        return None
    device_id, record_class = parts[2], parts[3]
    if not (is_valid_segment(device_id) and is_valid_segment(record_class)):
        return None
    return device_id, record_class


def cloud_request_topic(device_id: str) -> str:
    return f"{CLOUD_PREFIX}/req/{device_id}"


def cloud_reply_topic(device_id: str) -> str:
    return f"{CLOUD_PREFIX}/res/{device_id}"


def identity_topic(device_id: str) -> str:
    """Where the current delegation certificate is retained (PEM) when messages reference it by thumbprint."""
    return f"{IDENTITY_PREFIX}/{device_id}"


def is_valid_segment(segment: str) -> bool:
    """A usable identity segment: non-empty, no wildcard, separator or NUL."""
    return bool(segment) and not any(ch in segment for ch in _FORBIDDEN_IN_SEGMENT)


def client_id_from_request_topic(topic: str, device_id: str) -> str | None:
    """The caller's identity (last segment) of a request topic, or None if the topic is unusable."""
    prefix = f"{REQUEST_PREFIX}/{device_id}/"
    if not topic.startswith(prefix):
        return None
    client_id = topic[len(prefix) :]
    return client_id if is_valid_segment(client_id) else None


def response_topic_allowed(topic: str, device_id: str, client_id: str, max_bytes: int) -> bool:
    """Whether a client-chosen MQTT 5 Response Topic stays within that client's own reply space.

    Allowed: exactly ``mcp/res/{device}/{client}`` or anything under ``mcp/res/{device}/{client}/``,
    without wildcards or NUL, at most ``max_bytes`` of UTF-8. Anything else would let a client steer the
    agent's publishing rights onto another client's (or the cloud's) topics.
    """
    if len(topic.encode("utf-8", "surrogatepass")) > max_bytes:
        return False
    if any(ch in topic for ch in ("+", "#", "\x00")):
        return False
    base = reply_topic(device_id, client_id)
    if topic == base:
        return True
    if not topic.startswith(base + "/"):
        return False
    return all(topic.split("/")[4:])


DEPLOY_PREFIX = "mcp/deploy"
FILES_PREFIX = "mcp/files"


def device_deployment_topic(device_id: str) -> str:
    """Where the retained deployment document for one device lives (docs/deploy.md)."""
    return f"{DEPLOY_PREFIX}/device/{device_id}"


def group_deployment_topic(group: str) -> str:
    """Where the retained deployment document for a group of devices lives."""
    return f"{DEPLOY_PREFIX}/group/{group}"


def key_list_topic() -> str:
    """Where the fleet's root-signed release key list is retained."""
    return f"{DEPLOY_PREFIX}/keys"


def file_request_topic(device_id: str) -> str:
    """Where a device asks the file service for bundle chunks."""
    return f"{FILES_PREFIX}/req/{device_id}"


def file_reply_topic(device_id: str) -> str:
    """Where the file service answers a device's chunk requests."""
    return f"{FILES_PREFIX}/res/{device_id}"
