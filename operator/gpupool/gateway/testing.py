"""Test helpers: a vLLM stand-in (a Starlette app) and serving an ASGI app on loopback.

:class:`FakeVllm` speaks enough of vLLM's OpenAI and Anthropic routes for the gateway's tests:
usage in responses and in the last stream chunk (only when ``stream_options.include_usage``),
Anthropic ``message_start``/``message_delta`` usage, Bearer auth with one internal key. It records
what reached it, and can hold requests (``hold()``/``release()``) or stream until the client goes
away (``"endless": true`` in the body) to test concurrency limits, disconnects and the block-end
policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gpupool.blocks import BLOCK_ORDER, normalize_blocks
from gpupool.gateway.keys import KeyRecord, Limits, UpstreamKey, hash_key


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str] = field(repr=False)
    body: Any = None


class FakeVllm:
    def __init__(self, api_key: str, *, model: str = "tiny", max_model_len: int = 256,
                 prompt_tokens: int = 10, completion_tokens: int = 5) -> None:
        self.api_key = api_key
        self.model = model
        self.max_model_len = max_model_len
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.seen: list[Seen] = []
        self.active = 0
        self.max_active = 0
        self.completed = 0
        self.aborted = 0
        self._gate: asyncio.Event | None = None
        self.app = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/messages", self.messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
            Route("/{path:path}", self.other, methods=["GET", "POST", "PUT", "DELETE"]),
        ])

    # -- control ---------------------------------------------------------------------------------
    def hold(self) -> None:
        """Make every request wait (counted in ``active``) until :meth:`release`."""
        self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]

    # -- helpers ---------------------------------------------------------------------------------
    async def _enter(self, request: Request) -> tuple[Any, Response | None]:
        body: Any = None
        raw = await request.body()
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
        self.seen.append(Seen(request.method, request.url.path, dict(request.headers), body))
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return body, JSONResponse({"error": {"message": "Unauthorized"}}, status_code=401)
        return body, None

    async def _wait(self) -> None:
        gate = self._gate
        if gate is not None:
            await gate.wait()

    def _ntokens(self, body: dict[str, Any], *names: str) -> int:
        for n in names:
            v = body.get(n)
            if isinstance(v, int):
                return min(v, self.completion_tokens)
        return self.completion_tokens

    def _usage(self, completion: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    async def _tracked(self, gen: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        finished = False
        try:
            async for part in gen:
                yield part
            finished = True
        finally:
            self.active -= 1
            if finished:
                self.completed += 1
            else:
                self.aborted += 1

    def _begin(self) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)

    async def _respond_json(self, request: Request, payload: dict[str, Any]) -> Response:
        self._begin()
        gate = self._gate
        gone = False
        if gate is not None:
            held = asyncio.ensure_future(gate.wait())
            disconnect = asyncio.ensure_future(request.receive())
            done, pending = await asyncio.wait({held, disconnect},
                                               return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            gone = disconnect in done
        self.active -= 1
        if gone:
            self.aborted += 1
        else:
            self.completed += 1
        return JSONResponse(payload)

    # -- routes ----------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        _, err = await self._enter(request)
        if err:
            return err
        return JSONResponse({"object": "list", "data": [
            {"id": self.model, "object": "model", "owned_by": "vllm",
             "max_model_len": self.max_model_len}]})

    async def chat(self, request: Request) -> Response:
        body, err = await self._enter(request)
        if err:
            return err
        n = self._ntokens(body, "max_completion_tokens", "max_tokens")
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._tracked(self._chat_stream(body, n, include)),
                                     media_type="text/event-stream")
        return await self._respond_json(request, {
            "id": "chatcmpl-1", "object": "chat.completion", "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * n},
                         "finish_reason": "length"}],
            "usage": self._usage(n)})

    async def _chat_stream(self, body: dict[str, Any], n: int,
                           include_usage: bool) -> AsyncIterator[bytes]:
        self._begin()
        await self._wait()

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": self.model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        yield chunk({"role": "assistant", "content": ""})
        if body.get("endless"):
            while True:
                yield chunk({"content": "x"})
                await asyncio.sleep(0.02)
        for _ in range(n):
            yield chunk({"content": "x"})
        yield chunk({}, "length")
        if include_usage:
            obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": self.model,
                   "choices": [], "usage": self._usage(n)}
            yield b"data: " + json.dumps(obj).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def completions(self, request: Request) -> Response:
        body, err = await self._enter(request)
        if err:
            return err
        n = self._ntokens(body, "max_tokens")
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))

            async def gen() -> AsyncIterator[bytes]:
                self._begin()
                await self._wait()
                obj: dict[str, Any]
                for _ in range(n):
                    obj = {"id": "cmpl-1", "object": "text_completion", "model": self.model,
                           "choices": [{"index": 0, "text": "x", "finish_reason": None}]}
                    yield b"data: " + json.dumps(obj).encode() + b"\n\n"
                if include:
                    obj = {"id": "cmpl-1", "object": "text_completion", "model": self.model,
                           "choices": [], "usage": self._usage(n)}
                    yield b"data: " + json.dumps(obj).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
            return StreamingResponse(self._tracked(gen()), media_type="text/event-stream")
        return await self._respond_json(request, {
            "id": "cmpl-1", "object": "text_completion", "model": self.model,
            "choices": [{"index": 0, "text": "x" * n, "finish_reason": "length"}],
            "usage": self._usage(n)})

    async def embeddings(self, request: Request) -> Response:
        _, err = await self._enter(request)
        if err:
            return err
        payload: dict[str, Any] = {
            "object": "list", "model": self.model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 1.0]}],
            "usage": {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens}}
        return await self._respond_json(request, payload)

    async def messages(self, request: Request) -> Response:
        body, err = await self._enter(request)
        if err:
            return err
        n = self._ntokens(body, "max_tokens")
        if body.get("stream"):
            async def gen() -> AsyncIterator[bytes]:
                self._begin()
                await self._wait()

                def ev(name: str, obj: dict[str, Any]) -> bytes:
                    return f"event: {name}\ndata: {json.dumps(obj)}\n\n".encode()

                yield ev("message_start", {"type": "message_start", "message": {
                    "id": "msg_1", "type": "message", "role": "assistant", "model": self.model,
                    "content": [], "usage": {"input_tokens": self.prompt_tokens,
                                             "output_tokens": 0}}})
                yield ev("content_block_start", {"type": "content_block_start", "index": 0,
                                                 "content_block": {"type": "text", "text": ""}})
                for _ in range(n):
                    yield ev("content_block_delta", {
                        "type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": "x"}})
                yield ev("content_block_stop", {"type": "content_block_stop", "index": 0})
                yield ev("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": "max_tokens"},
                                           "usage": {"output_tokens": n}})
                yield ev("message_stop", {"type": "message_stop"})
            return StreamingResponse(self._tracked(gen()), media_type="text/event-stream")
        return await self._respond_json(request, {
            "id": "msg_1", "type": "message", "role": "assistant", "model": self.model,
            "content": [{"type": "text", "text": "x" * n}], "stop_reason": "max_tokens",
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": n}})

    async def count_tokens(self, request: Request) -> Response:
        _, err = await self._enter(request)
        if err:
            return err
        return JSONResponse({"input_tokens": self.prompt_tokens})

    async def other(self, request: Request) -> Response:
        await self._enter(request)
        return JSONResponse({"error": "not here"}, status_code=404)


def loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def serve(app: Any, *, lifespan: Literal["auto", "on", "off"] = "auto") -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 and a free port; yields its base URL."""
    sock = loopback_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan=lifespan, log_level="warning", access_log=False,
                            http="httptools", loop="none", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server stopped before it started")
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        sock.close()


UPSTREAM_SECRET = "pool-upstream-key"
ALL_BLOCKS: tuple[str, ...] = tuple(b.value for b in BLOCK_ORDER)


def key_record(api_key: str, *, upstream: str, key_id: str = "key_test", pool: str = "pool",
               namespace: str = "ns", blocks: tuple[str, ...] = ALL_BLOCKS,
               rpm: int = 100000, tpm: int = 10**9, concurrency: int = 1000,
               subscription_phase: str = "active", pool_phase: str = "active",
               model: str = "tiny", secret_name: str | None = None) -> KeyRecord:
    """A key record as the operator's Secret would produce it (tests, benchmarks)."""
    return KeyRecord(
        namespace=namespace, secret_name=secret_name or f"{key_id}-key",
        key_hash=hash_key(api_key), key_id=key_id, pool=pool, subscription=f"sub-{key_id}",
        blocks=frozenset(normalize_blocks(blocks)),
        limits=Limits(rpm=rpm, tpm=tpm, concurrency=concurrency), upstream=upstream,
        upstream_key_secret=UPSTREAM_SECRET, subscription_phase=subscription_phase,
        pool_phase=pool_phase, served_model_name=model)


def upstream_key(api_key: str, namespace: str = "ns") -> UpstreamKey:
    return UpstreamKey(namespace=namespace, secret_name=UPSTREAM_SECRET, api_key=api_key)


class Clock:
    """A UTC clock that starts at a chosen instant and then runs at real speed."""

    def __init__(self, start: datetime | None = None) -> None:
        self.set(start or datetime.now(UTC))

    def set(self, at: datetime) -> None:
        self._base = at
        self._t0 = time.monotonic()

    def __call__(self) -> datetime:
        return self._base + timedelta(seconds=time.monotonic() - self._t0)
