"""The allowlist of proxied routes, their rewrite to vLLM, and each request's token reservation.

Routes (anything else is 404; a listed path with another method is 405):

=====================================  ======  ===================================
client path                            method  vLLM path
=====================================  ======  ===================================
``/v1/models``                         GET     ``/v1/models``
``/v1/chat/completions``               POST    ``/v1/chat/completions``
``/v1/completions``                    POST    ``/v1/completions``
``/v1/embeddings``                     POST    ``/v1/embeddings``
``/anthropic/v1/messages``             POST    ``/v1/messages``
``/anthropic/v1/messages/count_tokens`` POST   ``/v1/messages/count_tokens``
=====================================  ======  ===================================

Left out on purpose: ``/v1/responses`` (vLLM can store responses and serves them back by id to
anyone holding the pool's key — across customers sharing a pool), ``/tokenize``, ``/pause``,
``/invocations``, ``/metrics`` and vLLM's other operational routes, audio and rerank/score
(model-specific; add them here with a token estimate when a pool needs them). The upstream path is
always the fixed one from this table, never derived from the client's path, and the query string
is dropped.

Token reservation (TPM), an upper bound when the model's context length ``L`` is known (the
gateway reads ``max_model_len`` from vLLM's ``/v1/models``):

* prompt ≤ request body bytes / ``bytes_per_token`` + 64 (byte-level and byte-fallback
  tokenizers never emit more tokens than bytes; the 64 covers chat-template tokens);
* completion ≤ ``max_tokens`` (``max_completion_tokens`` for chat) times ``n``, and without one,
  whatever is left of ``L``; ``/v1/completions`` defaults to 16 tokens as vLLM does;
* one choice never exceeds ``L`` in all.

For streamed chat and completion requests the gateway asks vLLM for usage in the last chunk
(``stream_options.include_usage=true``; vLLM started with ``--enable-force-include-usage`` sends it
anyway). If the client did not ask for it, that extra chunk (``"choices": []`` plus ``usage``) is
removed from the stream the client receives: a client that did not ask for it may well read
``chunk.choices[0]`` of every chunk and fail on it. ``usage`` fields that vLLM itself puts on
ordinary content chunks (it does under ``--enable-force-include-usage``) are passed on unchanged:
they are optional in the OpenAI chunk schema and harmless, and rewriting every chunk would cost a
JSON round trip per token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from gpupool.gateway.errors import Family

Kind = Literal["models", "chat", "completions", "embeddings", "messages", "count_tokens"]

PROMPT_OVERHEAD_TOKENS = 64


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    method: str
    upstream_path: str
    family: Family
    kind: Kind
    label: str  # metric label


ROUTES: dict[str, Route] = {r.path: r for r in (
    Route("/v1/models", "GET", "/v1/models", "openai", "models", "models"),
    Route("/v1/chat/completions", "POST", "/v1/chat/completions", "openai", "chat", "chat"),
    Route("/v1/completions", "POST", "/v1/completions", "openai", "completions", "completions"),
    Route("/v1/embeddings", "POST", "/v1/embeddings", "openai", "embeddings", "embeddings"),
    Route("/anthropic/v1/messages", "POST", "/v1/messages", "anthropic", "messages",
          "messages"),
    Route("/anthropic/v1/messages/count_tokens", "POST", "/v1/messages/count_tokens",
          "anthropic", "count_tokens", "count_tokens"),
)}


def family_of(path: str) -> Family:
    return "anthropic" if path == "/anthropic" or path.startswith("/anthropic/") else "openai"


class BadRequest(ValueError):
    pass


@dataclass(slots=True)
class Plan:
    """What to send upstream and what to reserve."""

    body: bytes
    estimate: int
    stream: bool
    strip_usage_chunk: bool


def _int_field(obj: dict[str, Any], name: str) -> int | None:
    v = obj.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise BadRequest(f"'{name}' must be a non-negative integer")
    return v


def plan_request(route: Route, body: bytes, *, max_model_len: int | None,
                 default_max_tokens: int = 4096, bytes_per_token: float = 1.0) -> Plan:
    """Validate just enough of the body to reserve tokens; inject usage for streams."""
    if route.kind == "models":
        return Plan(b"", 0, False, False)
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(obj, dict):
        raise BadRequest("The request body must be a JSON object.")
    if route.kind == "count_tokens":
        return Plan(body, 0, False, False)

    L = max_model_len
    prompt = math.ceil(len(body) / bytes_per_token) + PROMPT_OVERHEAD_TOKENS
    if L is not None:
        prompt = min(prompt, L)
    if route.kind == "embeddings":
        return Plan(body, prompt, False, False)

    if route.kind == "chat":
        max_tokens = _int_field(obj, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _int_field(obj, "max_tokens")
    elif route.kind == "completions":
        max_tokens = _int_field(obj, "max_tokens")
        if max_tokens is None and "max_tokens" not in obj:
            max_tokens = 16
    else:  # messages
        max_tokens = _int_field(obj, "max_tokens")
    n = 1
    if route.kind in ("chat", "completions"):
        n = max(_int_field(obj, "n") or 1, _int_field(obj, "best_of") or 1)

    if max_tokens is None:
        max_tokens = L if L is not None else default_max_tokens
    if L is not None:
        max_tokens = min(max_tokens, L)
        estimate = min(prompt + max_tokens, L) if n == 1 else prompt + n * max_tokens
    else:
        estimate = prompt + n * max_tokens

    stream = obj.get("stream") is True
    strip = False
    if stream and route.kind in ("chat", "completions"):
        opts = obj.get("stream_options")
        if opts is None or (isinstance(opts, dict) and opts.get("include_usage") is not True):
            obj["stream_options"] = {**(opts or {}), "include_usage": True}
            body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
            strip = True
    return Plan(body, estimate, stream, strip)
