"""Read token usage from a response while it streams past, without holding the stream back.

* JSON responses: the body is forwarded chunk by chunk and a copy (up to 8 MiB) is parsed at the
  end for ``usage``.
* Server-sent events: every chunk is forwarded as it arrives; complete events that mention
  ``"usage"`` are parsed. OpenAI streams carry usage in the chunk before ``[DONE]``; Anthropic
  streams carry ``input_tokens`` in ``message_start`` and the running ``output_tokens`` in
  ``message_delta``. When the gateway added ``include_usage`` itself, the usage-only chunk is
  dropped, which means forwarding whole events: an event is passed on as soon as its blank line
  arrives (vLLM writes one event per write, so nothing waits in practice).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MAX_JSON_COPY = 8 * 1024 * 1024
_EVENT_END = re.compile(rb"\r?\n\r?\n")


@dataclass(slots=True)
class Usage:
    prompt: int = 0
    completion: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def _as_int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def openai_usage(obj: Any) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    u = obj.get("usage")
    if not isinstance(u, dict):
        return None
    prompt = _as_int(u.get("prompt_tokens"))
    completion = _as_int(u.get("completion_tokens"))
    total = _as_int(u.get("total_tokens"))
    if total > prompt + completion:
        completion = total - prompt
    return Usage(prompt, completion)


def anthropic_usage(obj: Any) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    u = obj.get("usage")
    if not isinstance(u, dict):
        return None
    prompt = (_as_int(u.get("input_tokens")) + _as_int(u.get("cache_creation_input_tokens"))
              + _as_int(u.get("cache_read_input_tokens")))
    return Usage(prompt, _as_int(u.get("output_tokens")))


class JsonTap:
    """Usage of a plain JSON response."""

    def __init__(self, anthropic: bool) -> None:
        self.anthropic = anthropic
        self._parts: list[bytes] = []
        self._size = 0
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        if self._size <= MAX_JSON_COPY:
            self._parts.append(chunk)
            self._size += len(chunk)
        return chunk

    def close(self) -> bytes:
        if self._size <= MAX_JSON_COPY and self._parts:
            try:
                obj = json.loads(b"".join(self._parts))
            except ValueError:
                obj = None
            self.usage = anthropic_usage(obj) if self.anthropic else openai_usage(obj)
        self._parts = []
        return b""


class SseTap:
    """Usage of a server-sent-event stream; optionally drops the usage-only chunk.

    vLLM run with ``--enable-force-include-usage`` puts ``usage`` on every chunk, so OpenAI-style
    events are not parsed as they pass: the last one carrying usage is kept and parsed once, at
    the end (or when it may be the usage-only chunk to drop).
    """

    def __init__(self, anthropic: bool, strip_usage_chunk: bool) -> None:
        self.anthropic = anthropic
        self.strip = strip_usage_chunk and not anthropic
        self._buf = b""
        self._usage: Usage | None = None
        self._last: bytes | None = None  # last OpenAI event mentioning usage, not parsed yet
        self._prompt: int | None = None
        self.done = False

    @property
    def usage(self) -> Usage | None:
        if self._last is not None:
            obj = _data(self._last)
            u = openai_usage(obj) if obj is not None else None
            if u is not None:
                self._usage = u
            self._last = None
        return self._usage

    def feed(self, chunk: bytes) -> bytes:
        buf = self._buf + chunk if self._buf else chunk
        out: list[bytes] = []
        pos = 0
        while True:
            m = _EVENT_END.search(buf, pos)
            if m is None:
                break
            keep = self._event(buf[pos:m.start()])
            if self.strip and keep:
                out.append(buf[pos:m.end()])
            pos = m.end()
        self._buf = buf[pos:]
        if not self.strip:
            return chunk
        return b"".join(out)

    def close(self) -> bytes:
        rest, self._buf = self._buf, b""
        if rest.strip():
            keep = self._event(rest)
            if self.strip and keep:
                return rest
        return b""

    def _event(self, event: bytes) -> bool:
        """Note usage in one event; False if it is the injected usage chunk to drop."""
        if b"usage" not in event:
            if b"[DONE]" in event:
                self.done = True
            return True
        if not self.anthropic:
            if self.strip and b'"choices":[]' in event.replace(b" ", b""):
                obj = _data(event)
                u = openai_usage(obj)
                if u is not None and isinstance(obj, dict) and obj.get("choices") == []:
                    self._usage, self._last = u, None
                    return False
            self._last = event
            return True
        obj = _data(event)
        if not isinstance(obj, dict):
            return True
        kind = obj.get("type")
        if kind == "message_start":
            u = anthropic_usage(obj.get("message"))
            if u is not None:
                self._prompt = u.prompt
                self._usage = u
        elif kind == "message_delta":
            u = anthropic_usage(obj)
            if u is not None:
                self._usage = Usage(u.prompt or (self._prompt or 0), u.completion)
        return True


def _data(event: bytes) -> Any:
    data = b"\n".join(line[5:].lstrip(b" ") for line in event.splitlines()
                      if line.startswith(b"data:"))
    try:
        return json.loads(data)
    except ValueError:
        return None
