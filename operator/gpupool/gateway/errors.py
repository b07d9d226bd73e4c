"""JSON error bodies in the style of the endpoint family.

OpenAI family (``/v1/*``)::

    {"error": {"message": "...", "type": "rate_limit_error", "param": null, "code": "rpm", ...}}

Anthropic family (``/anthropic/*``)::

    {"type": "error", "error": {"type": "rate_limit_error", "message": "...", "code": "rpm", ...}}

Extra fields (``next_open_at`` for a closed key, ``limit`` for a 429) sit beside ``message``.
"""

from __future__ import annotations

import json
from typing import Literal

Family = Literal["openai", "anthropic"]

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_payload(family: Family, status: int, code: str, message: str,
                  extra: dict[str, str] | None = None) -> dict[str, object]:
    inner: dict[str, object]
    if family == "anthropic":
        inner = {"type": error_type(status), "message": message, "code": code}
        if extra:
            inner.update(extra)
        return {"type": "error", "error": inner}
    inner = {"message": message, "type": error_type(status), "param": None, "code": code}
    if extra:
        inner.update(extra)
    return {"error": inner}


def error_body(family: Family, status: int, code: str, message: str,
               extra: dict[str, str] | None = None) -> bytes:
    return json.dumps(error_payload(family, status, code, message, extra),
                      separators=(",", ":")).encode()


def stream_error_event(family: Family, status: int, code: str, message: str,
                       extra: dict[str, str] | None = None) -> bytes:
    """An error as the last event of a server-sent-event stream."""
    payload = json.dumps(error_payload(family, status, code, message, extra),
                         separators=(",", ":"))
    if family == "anthropic":
        return f"event: error\ndata: {payload}\n\n".encode()
    return f"data: {payload}\n\ndata: [DONE]\n\n".encode()
