"""The gateway's ASGI application: authenticate, gate, limit, proxy.

It is a plain ASGI callable rather than a Starlette app: the hot path is one dict lookup for the
route, one for the key, and no middleware. The upstream client is aiohttp, not httpx: measured on
this project's 2-core machines against the same loopback upstream, httpx 0.28 managed about 900
requests/s from one client and collapsed to about 120 requests/s with 50 or 200 concurrent
requests (its connection pool), where aiohttp did 2,700-3,600 and 1,500-5,000
(``benchmarks/gateway_bench.py`` has the end-to-end figures).

Per request, in order: route allowlist (404/405) → API key (401) → gate (402/403/503, see
:mod:`gpupool.gateway.gate`) → body (413/400) → limits (429 + ``Retry-After``, see
:mod:`gpupool.gateway.limits`) → proxy to the pool's vLLM with its internal key, streaming.

**Block-end policy** (a request still running when its key's block ends): a request admitted
while the key was open may finish, for at most ``block_end_grace`` seconds (default 60) past the
boundary at which the key's run of blocks ends. At that deadline the gateway stops it: it closes
the upstream request (vLLM aborts the generation), and

* if the response has not started yet, answers 403 ``outside_blocks`` like a new request;
* if a stream is running, sends one last error event (code ``block_ended``; OpenAI streams also
  get ``data: [DONE]``) and ends the stream;
* a plain JSON response whose headers are already out is left to finish (vLLM writes those in one
  piece, so this only happens for a body already on the wire).

A request cut this way keeps its token reservation. New requests are refused from the boundary
itself (to the second, by the gateway's own clock). A key that holds every block never closes.

**Client gone**: when the client disconnects, the upstream request is closed at once (vLLM
aborts the generation) and the reservation is kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp

from gpupool import blocks
from gpupool.gateway import gate
from gpupool.gateway.errors import Family, error_body, stream_error_event
from gpupool.gateway.keys import KeyRecord, KeySource, KeyStore
from gpupool.gateway.limits import (
    Limiter,
    LimiterUnavailable,
    LocalLimiter,
    retry_after_header,
)
from gpupool.gateway.metrics import GatewayMetrics
from gpupool.gateway.routes import ROUTES, BadRequest, Plan, Route, family_of, plan_request
from gpupool.gateway.usage import JsonTap, SseTap

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FORWARD_REQUEST_HEADERS = frozenset({
    b"content-type", b"accept", b"user-agent", b"anthropic-version", b"anthropic-beta",
    b"x-request-id", b"traceparent", b"tracestate",
})
DROP_RESPONSE_HEADERS = frozenset({
    b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
    b"proxy-authenticate", b"proxy-authorization", b"server", b"date", b"content-length",
})
JSON_HEADERS = [(b"content-type", b"application/json")]
_GONE = b"\x00gone"  # sentinel of _read_body (compared by identity)


@dataclass(slots=True)
class GatewaySettings:
    upstream_timeout: float = 600.0
    connect_timeout: float = 5.0
    block_end_grace: float = 60.0
    max_body_bytes: int = 32 * 1024 * 1024
    default_max_tokens: int = 4096
    bytes_per_token: float = 1.0
    model_info_ttl: float = 300.0
    serve_metrics: bool = False
    max_connections: int = 1024


@dataclass(slots=True)
class _Exchange:
    finished: bool = False
    disconnected: bool = False


class ModelCatalog:
    """``max_model_len`` of each upstream, read from vLLM's ``/v1/models`` and cached."""

    def __init__(self, ttl: float = 300.0, retry: float = 30.0) -> None:
        self.ttl = ttl
        self.retry = retry
        self._cache: dict[str, tuple[float, int | None]] = {}
        self._pending: dict[str, asyncio.Task[int | None]] = {}

    def put(self, upstream: str, value: int | None) -> None:
        self._cache[upstream] = (time.monotonic() + self.ttl, value)

    async def max_model_len(self, client: aiohttp.ClientSession, upstream: str, key: str,
                            model: str) -> int | None:
        hit = self._cache.get(upstream)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        task = self._pending.get(upstream)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._refresh(client, upstream, key, model, hit[1] if hit else None))
            self._pending[upstream] = task
        if hit is not None and hit[1] is not None:
            return hit[1]  # serve the stale value while refreshing
        return await asyncio.shield(task)

    async def _refresh(self, client: aiohttp.ClientSession, upstream: str, key: str, model: str,
                       stale: int | None) -> int | None:
        try:
            value = await self._fetch(client, upstream, key, model)
            now = time.monotonic()
            if value is not None:
                self._cache[upstream] = (now + self.ttl, value)
            else:
                self._cache[upstream] = (now + self.retry, stale)
            return value if value is not None else stale
        finally:
            self._pending.pop(upstream, None)

    @staticmethod
    async def _fetch(client: aiohttp.ClientSession, upstream: str, key: str,
                     model: str) -> int | None:
        try:
            async with client.get(f"{upstream}/v1/models",
                                  headers={"authorization": f"Bearer {key}"},
                                  timeout=aiohttp.ClientTimeout(total=5.0)) as resp:
                if resp.status != 200:
                    return None
                data = (await resp.json(content_type=None)).get("data") or []
        except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError):
            return None
        chosen = next((m for m in data if isinstance(m, dict) and m.get("id") == model), None)
        if chosen is None and data and isinstance(data[0], dict):
            chosen = data[0]
        value = (chosen or {}).get("max_model_len")
        return value if isinstance(value, int) and value > 0 else None


def _expired(deadline: float | None, loop: asyncio.AbstractEventLoop) -> bool:
    return deadline is not None and loop.time() >= deadline


def _bearer(value: bytes) -> str | None:
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    return token.decode("latin-1") if token else None


def extract_key(headers: list[tuple[bytes, bytes]], family: Family) -> str | None:
    """``Authorization: Bearer``; on the Anthropic family ``x-api-key`` first."""
    auth = xkey = None
    for name, value in headers:
        if name == b"authorization":
            auth = value
        elif name == b"x-api-key":
            xkey = value
    if family == "anthropic" and xkey and xkey.strip():
        return xkey.strip().decode("latin-1")
    return _bearer(auth) if auth else None


class Gateway:
    """ASGI app. ``startup``/``shutdown`` run from the ASGI lifespan (or call them directly)."""

    def __init__(self, source: KeySource, *, limiter: Limiter | None = None,
                 settings: GatewaySettings | None = None,
                 clock: Callable[[], datetime] = blocks.utcnow,
                 metrics: GatewayMetrics | None = None,
                 client: aiohttp.ClientSession | None = None) -> None:
        self.source = source
        self.store = KeyStore()
        self.limiter: Limiter = limiter if limiter is not None else LocalLimiter()
        self.settings = settings or GatewaySettings()
        self.clock = clock
        self.metrics = metrics or GatewayMetrics()
        self.models = ModelCatalog(ttl=self.settings.model_info_ttl)
        self._client = client
        self._own_client = client is None
        self._source_task: asyncio.Task[None] | None = None
        self.metrics.keys.set_function(lambda: len(self.store))
        self.metrics.ready.set_function(lambda: 1 if self.store.synced else 0)

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def client(self) -> aiohttp.ClientSession:
        if self._client is None:
            raise RuntimeError("the gateway has not started")
        return self._client

    async def startup(self) -> None:
        if self._client is None:
            s = self.settings
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=s.max_connections, limit_per_host=0,
                                               keepalive_timeout=60.0, ttl_dns_cache=30),
                timeout=aiohttp.ClientTimeout(total=None, connect=s.connect_timeout,
                                              sock_read=s.upstream_timeout),
                auto_decompress=False, skip_auto_headers=("user-agent",),
                headers={"accept-encoding": "identity"}, trust_env=False)
        await self.limiter.start()
        self._source_task = asyncio.get_running_loop().create_task(self._run_source())

    async def shutdown(self) -> None:
        if self._source_task is not None:
            self._source_task.cancel()
            await asyncio.gather(self._source_task, return_exceptions=True)
        await self.limiter.aclose()
        if self._own_client and self._client is not None:
            await self._client.close()
            self._client = None

    async def _run_source(self) -> None:
        try:
            await self.source.run(self.store)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the key source stopped")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- responses --------------------------------------------------------------------------------
    @staticmethod
    async def _respond(send: Send, status: int, body: bytes,
                       headers: list[tuple[bytes, bytes]] | None = None) -> None:
        h = [*(headers or JSON_HEADERS), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": h})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _error(self, send: Send, family: Family, status: int, code: str, message: str,
                     *, record: KeyRecord | None = None, route: str = "other",
                     retry_after: str | None = None, extra: dict[str, str] | None = None,
                     reason: str | None = None) -> None:
        headers = list(JSON_HEADERS)
        if retry_after is not None:
            headers.append((b"retry-after", retry_after.encode()))
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        labels = ((record.namespace, record.pool, record.key_id) if record is not None
                  else ("", "", "unknown"))
        self.metrics.requests.labels(*labels, route, str(status)).inc()
        self.metrics.refusals.labels(*labels, reason or code).inc()
        await self._respond(send, status, error_body(family, status, code, message, extra),
                            headers)

    # -- the request path -----------------------------------------------------------------------
    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        route = ROUTES.get(path)
        if route is None:
            if path == "/healthz":
                await self._respond(send, 200, b"ok", [(b"content-type", b"text/plain")])
            elif path == "/readyz":
                ready = self.store.synced
                await self._respond(send, 200 if ready else 503,
                                    b"ready" if ready else b"key list not loaded yet",
                                    [(b"content-type", b"text/plain")])
            elif path == "/metrics" and self.settings.serve_metrics:
                await self._respond(send, 200, self.metrics.render(),
                                    [(b"content-type", b"text/plain; version=0.0.4")])
            else:
                await self._error(send, family_of(path), 404, "not_found",
                                  "This route is not served by the gateway.")
            return
        if scope["method"] != route.method:
            await self._respond(
                send, 405,
                error_body(route.family, 405, "method_not_allowed",
                           f"Use {route.method} on this route."),
                [*JSON_HEADERS, (b"allow", route.method.encode())])
            return

        family = route.family
        key = extract_key(scope["headers"], family)
        if key is None:
            hint = ("Authorization: Bearer <key> or x-api-key: <key>" if family == "anthropic"
                    else "Authorization: Bearer <key>")
            await self._error(send, family, 401, "missing_api_key",
                              f"No API key: send {hint}.", route=route.label)
            return
        record = self.store.lookup(key)
        del key
        if record is None:
            await self._error(send, family, 401, "invalid_api_key", "The API key is not valid.",
                              route=route.label)
            return

        now = self.clock()
        refusal = gate.check(record, now)
        if refusal is not None:
            await self._error(
                send, family, refusal.status, refusal.code, refusal.message, record=record,
                route=route.label, extra=refusal.extra or None,
                retry_after=None if refusal.retry_after is None else str(refusal.retry_after))
            return
        upstream_key = self.store.upstream_key(record.namespace, record.upstream_key_secret)
        if upstream_key is None:
            await self._error(send, family, 503, "upstream_unavailable",
                              "The pool's upstream is not ready yet; try again later.",
                              record=record, route=route.label)
            return

        body = await self._read_body(receive)
        if body is _GONE:
            return  # the client went away while sending its request
        if body is None:
            await self._error(send, family, 413, "request_too_large",
                              f"The request body exceeds {self.settings.max_body_bytes} bytes.",
                              record=record, route=route.label)
            return
        max_len = None
        if route.kind not in ("models", "count_tokens"):
            max_len = await self.models.max_model_len(self.client, record.upstream, upstream_key,
                                                      record.served_model_name)
        try:
            plan = plan_request(route, body, max_model_len=max_len,
                                default_max_tokens=self.settings.default_max_tokens,
                                bytes_per_token=self.settings.bytes_per_token)
        except BadRequest as exc:
            await self._error(send, family, 400, "invalid_request", str(exc), record=record,
                              route=route.label)
            return

        try:
            adm = await self.limiter.acquire(record.key_id, record.limits, plan.estimate)
        except LimiterUnavailable:
            await self._error(send, family, 503, "limiter_unavailable",
                              "The gateway cannot check this key's limits right now; try again.",
                              record=record, route=route.label)
            return
        if not adm.admitted:
            if adm.reason == "too_large":
                await self._error(
                    send, family, 429, "request_too_large",
                    f"This request may use up to {plan.estimate} tokens, more than this key's "
                    f"limit of {record.limits.tpm} tokens per minute; lower max_tokens.",
                    record=record, route=route.label, extra={"limit": "tpm"},
                    reason="too_large")
                return
            limit = {"rpm": f"{record.limits.rpm} requests per minute",
                     "tpm": f"{record.limits.tpm} tokens per minute",
                     "concurrency": f"{record.limits.concurrency} concurrent requests"}
            await self._error(
                send, family, 429, "rate_limit_exceeded",
                f"Rate limit reached for this key: {limit.get(adm.reason, adm.reason)}.",
                record=record, route=route.label, extra={"limit": adm.reason},
                retry_after=retry_after_header(adm.retry_after), reason=adm.reason)
            return

        await self._proxy(scope, receive, send, route, record, upstream_key, plan, adm.lease, now)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The request body; None if too large, ``_GONE`` if the client disconnected."""
        limit = self.settings.max_body_bytes
        msg = await receive()
        if msg["type"] != "http.request":
            return _GONE
        body: bytes = msg.get("body", b"")
        if not msg.get("more_body", False):
            return body if len(body) <= limit else None
        parts = [body]
        size = len(body)
        while msg.get("more_body", False):
            msg = await receive()
            if msg["type"] != "http.request":
                return _GONE
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
        return b"".join(parts)

    async def _proxy(self, scope: Scope, receive: Receive, send: Send, route: Route,
                     record: KeyRecord, upstream_key: str, plan: Plan, lease: str,
                     now: datetime) -> None:
        labels = (record.namespace, record.pool, record.key_id)
        inflight = self.metrics.inflight.labels(*labels)
        inflight.inc()
        loop = asyncio.get_running_loop()
        closes = gate.closes_at(record, now)
        deadline = None
        if closes is not None:
            deadline = loop.time() + (closes - now).total_seconds() + self.settings.block_end_grace
        state = _Exchange()
        task = asyncio.current_task()
        assert task is not None
        watcher = loop.create_task(self._watch_disconnect(receive, task, state))
        settled: int | None = None
        status = 499
        try:
            settled, status = await self._exchange(scope, send, route, record, upstream_key,
                                                   plan, deadline, state)
        except asyncio.CancelledError:
            if not state.disconnected:
                raise
            task.uncancel()
        finally:
            state.finished = True
            watcher.cancel()
            inflight.dec()
            self.metrics.requests.labels(*labels, route.label, str(status)).inc()
            if settled is None and plan.estimate:
                self.metrics.tokens.labels(*labels, "unsettled").inc(plan.estimate)
            await self.limiter.finish(record.key_id, lease, settled)

    @staticmethod
    async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any],
                                state: _Exchange) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                if not state.finished:
                    state.disconnected = True
                    task.cancel()
                return

    async def _exchange(self, scope: Scope, send: Send, route: Route, record: KeyRecord,
                        upstream_key: str, plan: Plan, deadline: float | None,
                        state: _Exchange) -> tuple[int | None, int]:
        """Proxy one admitted request; returns (tokens to settle or None, status)."""
        family = route.family
        headers = {"authorization": "Bearer " + upstream_key}
        for k, v in scope["headers"]:
            if k in FORWARD_REQUEST_HEADERS:
                headers[k.decode("latin-1")] = v.decode("latin-1")
        url = record.upstream + route.upstream_path
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            async with asyncio.timeout_at(deadline):
                resp = await self.client.request(
                    route.method, url, headers=headers,
                    data=plan.body if route.method == "POST" else None, allow_redirects=False)
        except TimeoutError as exc:
            state.finished = True
            if isinstance(exc, aiohttp.ServerTimeoutError) or not _expired(deadline, loop):
                await self._send_error(send, family, 504, "upstream_timeout",
                                       "The model server did not answer in time.")
                return None, 504
            refusal = gate.outside_blocks(record, self.clock())
            await self._send_error(send, family, 403, "block_ended",
                                   "The key's block ended before the upstream answered. "
                                   + refusal.message, refusal.extra)
            return None, 403
        except aiohttp.ClientError as exc:
            state.finished = True
            log.warning("upstream of pool %s/%s failed: %s", record.namespace, record.pool,
                        type(exc).__name__)
            await self._send_error(send, family, 502, "upstream_unavailable",
                                   "The model server cannot be reached.")
            return (0 if isinstance(exc, aiohttp.ClientConnectorError) else None), 502
        self.metrics.upstream_seconds.labels(record.namespace, record.pool).observe(
            loop.time() - t0)

        if resp.status in (401, 403):
            # vLLM refused the pool's internal key: a misconfiguration, not the client's fault.
            resp.close()
            state.finished = True
            log.warning("upstream of pool %s/%s refused the internal key (%d)",
                        record.namespace, record.pool, resp.status)
            await self._send_error(send, family, 502, "upstream_auth_failed",
                                   "The model server refused the gateway; the pool's upstream "
                                   "key is out of date.")
            return 0, 502

        clean = False
        try:
            status = resp.status
            ctype = resp.headers.get("content-type", "")
            sse = ctype.startswith("text/event-stream")
            anthropic = family == "anthropic"
            tap: SseTap | JsonTap = (SseTap(anthropic, plan.strip_usage_chunk) if sse
                                     else JsonTap(anthropic))
            out_headers = [(k.lower(), v) for k, v in resp.raw_headers
                           if k.lower() not in DROP_RESPONSE_HEADERS]
            length = resp.headers.get("content-length")
            if not sse and length is not None:
                out_headers.append((b"content-length", length.encode("latin-1")))
            await send({"type": "http.response.start", "status": status,
                        "headers": out_headers})
            cut = broken = False
            try:
                async with asyncio.timeout_at(deadline if sse else None):
                    async for chunk in resp.content.iter_any():
                        out = tap.feed(chunk)
                        if out:
                            await send({"type": "http.response.body", "body": out,
                                        "more_body": True})
            except TimeoutError as exc:
                if isinstance(exc, aiohttp.ServerTimeoutError) or not _expired(deadline, loop):
                    broken = True
                else:
                    cut = True
            except aiohttp.ClientError as exc:
                broken = True
                log.warning("upstream of pool %s/%s broke off a response: %s",
                            record.namespace, record.pool, type(exc).__name__)
            if cut:
                refusal = gate.outside_blocks(record, self.clock())
                tail = stream_error_event(family, 403, "block_ended",
                                          "The key's block has ended; the stream was stopped. "
                                          + refusal.message, refusal.extra)
            elif broken:
                tail = (stream_error_event(family, 502, "upstream_error",
                                           "The model server broke off the stream.")
                        if sse else b"")
            else:
                tail = tap.close()
                clean = True
            state.finished = True
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        finally:
            if clean:
                resp.release()
            else:
                resp.close()  # drops the connection: vLLM aborts the generation

        if cut or broken:
            return None, status
        if 400 <= status < 500:
            return 0, status
        usage = tap.usage
        if usage is None:
            return None, status
        labels = (record.namespace, record.pool, record.key_id)
        self.metrics.tokens.labels(*labels, "prompt").inc(usage.prompt)
        self.metrics.tokens.labels(*labels, "completion").inc(usage.completion)
        return usage.total, status

    async def _send_error(self, send: Send, family: Family, status: int, code: str,
                          message: str, extra: dict[str, str] | None = None) -> None:
        await self._respond(send, status, error_body(family, status, code, message, extra))


def json_dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
