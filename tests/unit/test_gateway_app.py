"""The gateway end to end in one process: a vLLM stand-in served on loopback behind the real
gateway app (uvicorn + httptools), with keys fed through ``StaticKeySource``.

Keys are random per test and never printed: assertions compare them as booleans."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from gpupool.gateway.app import Gateway, GatewaySettings
from gpupool.gateway.keys import KeySource, KeyStore, StaticKeySource
from gpupool.gateway.limits import LocalLimiter
from gpupool.gateway.testing import Clock, FakeVllm, key_record, serve, upstream_key

NOON = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def new_key() -> str:
    return "sk_pool_" + secrets.token_urlsafe(32)


@dataclass
class Env:
    url: str
    upstream_url: str
    upstream: FakeVllm
    upstream_key: str
    source: StaticKeySource
    gateway: Gateway
    limiter: LocalLimiter
    clock: Clock
    http: httpx.AsyncClient
    key: str

    def add_key(self, **kw: Any) -> str:
        key = new_key()
        self.source.put(key_record(key, upstream=self.upstream_url, **kw))
        return key


async def until(cond: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)  # poll interval


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    ukey = "sk_internal_" + secrets.token_urlsafe(16)
    fake = FakeVllm(ukey)
    async with serve(fake.app) as up_url:
        key = new_key()
        source = StaticKeySource([key_record(key, upstream=up_url), upstream_key(ukey)])
        clock = Clock(NOON)
        limiter = LocalLimiter()
        gw = Gateway(source, limiter=limiter, clock=clock,
                     settings=GatewaySettings(block_end_grace=0.5, serve_metrics=True))
        async with serve(gw, lifespan="on") as url, \
                httpx.AsyncClient(base_url=url, timeout=20) as http:
            await gw.store.wait_synced()
            yield Env(url, up_url, fake, ukey, source, gw, limiter, clock, http, key)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def sse_events(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e.strip()]


def sse_data(text: str) -> list[Any]:
    out: list[Any] = []
    for event in sse_events(text):
        for line in event.splitlines():
            if line.startswith("data: "):
                payload = line[6:]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# -- proxying -------------------------------------------------------------------------------------
async def test_chat_completion_goes_upstream_with_the_internal_key(env: Env) -> None:
    r = await env.http.post("/v1/chat/completions", json=CHAT, headers=bearer(env.key))
    assert r.status_code == 200
    assert r.json()["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    chat = [s for s in env.upstream.seen if s.path == "/v1/chat/completions"]
    assert len(chat) == 1
    forwarded = chat[0].headers
    internal_key_sent = forwarded.get("authorization") == f"Bearer {env.upstream_key}"
    assert internal_key_sent, "vLLM must get the pool's internal key"
    client_key_leaked = any(env.key in v for v in forwarded.values())
    assert not client_key_leaked, "the client's key must not reach vLLM"
    assert chat[0].body == CHAT
    assert env.limiter.usage("key_test") == (1, 15, 0)


@pytest.mark.parametrize(("path", "upstream_path"), [
    ("/v1/completions", "/v1/completions"),
    ("/v1/embeddings", "/v1/embeddings"),
])
async def test_openai_routes(env: Env, path: str, upstream_path: str) -> None:
    body = {"model": "tiny", "prompt": "hi", "input": "hi", "max_tokens": 3}
    r = await env.http.post(path, json=body, headers=bearer(env.key))
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == 10
    assert env.upstream.paths()[-1] == upstream_path


async def test_models_route(env: Env) -> None:
    r = await env.http.get("/v1/models", headers=bearer(env.key))
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == "tiny"


async def test_anthropic_messages_rewritten_and_x_api_key_accepted(env: Env) -> None:
    body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    r = await env.http.post("/anthropic/v1/messages", json=body,
                            headers={"x-api-key": env.key, "anthropic-version": "2023-06-01"})
    assert r.status_code == 200
    assert r.json()["usage"] == {"input_tokens": 10, "output_tokens": 4}
    seen = env.upstream.seen[-1]
    assert seen.path == "/v1/messages"
    assert seen.headers.get("anthropic-version") == "2023-06-01"
    assert "x-api-key" not in seen.headers
    assert seen.headers.get("authorization") == f"Bearer {env.upstream_key}", "internal key"
    assert env.limiter.usage("key_test")[1] == 14

    r = await env.http.post("/anthropic/v1/messages/count_tokens", json=body,
                            headers=bearer(env.key))
    assert r.status_code == 200
    assert r.json() == {"input_tokens": 10}
    assert env.upstream.seen[-1].path == "/v1/messages/count_tokens"


async def test_x_api_key_is_only_for_the_anthropic_family(env: Env) -> None:
    r = await env.http.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": env.key})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "missing_api_key"


@pytest.mark.parametrize("path", [
    "/tokenize", "/detokenize", "/pause", "/resume", "/invocations", "/metrics-vllm", "/health",
    "/v1/responses", "/v1/chat/completions/", "/v1/models/tiny", "/v1/audio/transcriptions",
    "/anthropic/v1/complete", "/anthropic/v1/models", "/v1", "/", "/v1/score", "/version",
])
async def test_everything_else_is_404(env: Env, path: str) -> None:
    r = await env.http.post(path, json=CHAT, headers=bearer(env.key))
    assert r.status_code == 404
    body = r.json()
    if path.startswith("/anthropic"):
        assert body["type"] == "error"
        assert body["error"]["type"] == "not_found_error"
    else:
        assert body["error"]["type"] == "not_found_error"
    assert env.upstream.seen == []


async def test_wrong_method_is_405(env: Env) -> None:
    r = await env.http.get("/v1/chat/completions", headers=bearer(env.key))
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    assert env.upstream.seen == []


async def test_query_string_is_dropped(env: Env) -> None:
    r = await env.http.get("/v1/models?x=1", headers=bearer(env.key))
    assert r.status_code == 200
    assert env.upstream.seen[-1].path == "/v1/models"


# -- authentication and the gate ----------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer"}])
async def test_missing_key_is_401(env: Env, headers: dict[str, str]) -> None:
    r = await env.http.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"


async def test_unknown_key_is_401_in_both_styles(env: Env) -> None:
    r = await env.http.post("/v1/chat/completions", json=CHAT, headers=bearer(new_key()))
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["code"] == "invalid_api_key"
    assert err["type"] == "authentication_error"
    assert set(err) >= {"message", "type", "param", "code"}

    r = await env.http.post("/anthropic/v1/messages", json=CHAT, headers={"x-api-key": "nope"})
    assert r.status_code == 401
    body = r.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    assert env.upstream.seen == []


@pytest.mark.parametrize(("sub", "pool", "status", "code"), [
    ("past_due", "active", 402, "subscription_past_due"),
    ("canceled", "active", 403, "subscription_canceled"),
    ("pending_key", "active", 403, "key_not_active"),
    ("pledged", "funding", 403, "key_not_active"),
    ("pending", "active", 403, "key_not_active"),
    ("active", "paused", 503, "pool_not_active"),
    ("active", "activating", 503, "pool_not_active"),
])
async def test_gate_refusals(env: Env, sub: str, pool: str, status: int, code: str) -> None:
    key = env.add_key(key_id="k2", subscription_phase=sub, pool_phase=pool)
    r = await env.http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert r.status_code == status
    assert r.json()["error"]["code"] == code
    r = await env.http.post("/anthropic/v1/messages", json=CHAT, headers={"x-api-key": key})
    assert r.status_code == status
    assert r.json()["type"] == "error"
    assert r.json()["error"]["code"] == code
    assert env.upstream.seen == []


async def test_outside_blocks_says_when_the_key_opens(env: Env) -> None:
    key = env.add_key(key_id="k2", blocks=("americas",))
    r = await env.http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert r.status_code == 403
    err = r.json()["error"]
    assert err["code"] == "outside_blocks"
    assert err["next_open_at"] == "2026-11-23T16:00:00Z"
    assert "2026-11-23T16:00:00Z" in err["message"]
    assert 4 * 3600 - 5 <= int(r.headers["retry-after"]) <= 4 * 3600


async def test_gate_is_exact_at_the_boundary(env: Env) -> None:
    """Closed at 08:00:00 by the gateway's own clock, with the record unchanged (operator lag)."""
    key = env.add_key(key_id="night", blocks=("night",))
    env.clock.set(datetime(2026, 11, 23, 7, 59, 59, 900000, tzinfo=UTC))
    r = await env.http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert r.status_code == 200
    env.clock.set(datetime(2026, 11, 23, 8, 0, 0, tzinfo=UTC))
    r = await env.http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert r.status_code == 403
    assert r.json()["error"]["next_open_at"] == "2026-11-24T00:00:00Z"
    env.clock.set(datetime(2026, 11, 24, 0, 0, 0, tzinfo=UTC))
    r = await env.http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert r.status_code == 200


async def test_key_changes_apply_without_restart(env: Env) -> None:
    key = new_key()
    rec = key_record(key, upstream=env.upstream_url, key_id="k3", secret_name="sub3-key")
    env.source.put(rec)
    assert (await env.http.post("/v1/chat/completions", json=CHAT,
                                headers=bearer(key))).status_code == 200
    env.source.put(key_record(key, upstream=env.upstream_url, key_id="k3",
                              secret_name="sub3-key", subscription_phase="past_due"))
    assert (await env.http.post("/v1/chat/completions", json=CHAT,
                                headers=bearer(key))).status_code == 402
    rotated = new_key()
    env.source.put(key_record(rotated, upstream=env.upstream_url, key_id="k3",
                              secret_name="sub3-key"))
    assert (await env.http.post("/v1/chat/completions", json=CHAT,
                                headers=bearer(key))).status_code == 401
    assert (await env.http.post("/v1/chat/completions", json=CHAT,
                                headers=bearer(rotated))).status_code == 200
    env.source.delete("ns", "sub3-key")
    assert (await env.http.post("/v1/chat/completions", json=CHAT,
                                headers=bearer(rotated))).status_code == 401


async def test_missing_upstream_key_is_503(env: Env) -> None:
    env.source.delete("ns", "pool-upstream-key")
    r = await env.http.post("/v1/chat/completions", json=CHAT, headers=bearer(env.key))
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "upstream_unavailable"


# -- bodies ---------------------------------------------------------------------------------------
async def test_bad_json_is_400(env: Env) -> None:
    r = await env.http.post("/v1/chat/completions", content=b"{nope",
                            headers={**bearer(env.key), "content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = await env.http.post("/anthropic/v1/messages", content=b"[1]", headers=bearer(env.key))
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert env.limiter.usage("key_test") == (0, 0, 0)


async def test_body_over_the_limit_is_413(env: Env) -> None:
    env.gateway.settings.max_body_bytes = 1000
    r = await env.http.post("/v1/chat/completions", content=b"x" * 5000, headers=bearer(env.key))
    assert r.status_code == 413


# -- streaming ------------------------------------------------------------------------------------
async def test_stream_gets_usage_without_showing_the_extra_chunk(env: Env) -> None:
    body = {**CHAT, "stream": True}
    r = await env.http.post("/v1/chat/completions", json=body, headers=bearer(env.key))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    chunks = data[:-1]
    assert all(c["choices"] for c in chunks), "the usage-only chunk must not reach the client"
    assert all("usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "xxxxx"
    sent = env.upstream.seen[-1].body
    assert sent["stream_options"] == {"include_usage": True}
    assert env.limiter.usage("key_test") == (1, 15, 0)


async def test_stream_keeps_usage_chunk_the_client_asked_for(env: Env) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    r = await env.http.post("/v1/chat/completions", json=body, headers=bearer(env.key))
    data = sse_data(r.text)
    assert data[-2]["choices"] == []
    assert data[-2]["usage"]["total_tokens"] == 15
    assert env.upstream.seen[-1].body == body
    assert env.limiter.usage("key_test")[1] == 15


async def test_completions_stream_settles_from_usage(env: Env) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True}
    r = await env.http.post("/v1/completions", json=body, headers=bearer(env.key))
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    assert all(c["choices"] for c in data[:-1])
    assert env.limiter.usage("key_test")[1] == 13


async def test_anthropic_stream_settles_from_message_delta(env: Env) -> None:
    body = {"model": "tiny", "max_tokens": 3, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    r = await env.http.post("/anthropic/v1/messages", json=body, headers={"x-api-key": env.key})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[0].startswith("event: message_start")
    assert events[-1].startswith("event: message_stop")
    assert env.limiter.usage("key_test")[1] == 13


async def test_stream_is_not_buffered_and_a_gone_client_aborts_upstream(env: Env) -> None:
    body = {**CHAT, "stream": True, "endless": True}
    async with env.http.stream("POST", "/v1/chat/completions", json=body,
                               headers=bearer(env.key)) as r:
        assert r.status_code == 200
        got = 0
        async for chunk in r.aiter_bytes():
            got += chunk.count(b"data: ")
            if got >= 3:
                break  # the upstream never ends: these arrived while it was still streaming
    await until(lambda: env.upstream.aborted == 1)
    await until(lambda: env.limiter.usage("key_test")[2] == 0)
    requests, tokens, _ = env.limiter.usage("key_test")
    assert requests == 1
    assert tokens > 15  # the reservation is kept: no usage arrived


# -- limits ---------------------------------------------------------------------------------------
async def _fire(env: Env, key: str, n: int, body: dict[str, Any] | None = None
                ) -> list[httpx.Response]:
    async def one() -> httpx.Response:
        return await env.http.post("/v1/chat/completions", json=body or CHAT,
                                   headers=bearer(key))
    return await asyncio.gather(*(one() for _ in range(n)))


async def test_rpm_is_exact_under_concurrency(env: Env) -> None:
    key = env.add_key(key_id="rpm5", rpm=5)
    responses = await _fire(env, key, 40)
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 5
    assert codes.count(429) == 35
    refused = [r for r in responses if r.status_code == 429]
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in refused)
    assert all(r.json()["error"]["limit"] == "rpm" for r in refused)
    assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in refused)
    assert env.upstream.paths().count("/v1/chat/completions") == 5


async def test_concurrency_is_exact(env: Env) -> None:
    key = env.add_key(key_id="c3", concurrency=3)
    env.upstream.hold()
    task = asyncio.ensure_future(_fire(env, key, 30))
    await until(lambda: env.upstream.active == 3)
    await until(lambda: env.gateway.metrics.refusals.labels(
        "ns", "pool", "c3", "concurrency")._value.get() == 27)
    env.upstream.release()
    responses = await task
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 3
    assert codes.count(429) == 27
    assert all(r.json()["error"]["limit"] == "concurrency" for r in responses
               if r.status_code == 429)
    assert env.upstream.max_active == 3
    again = await _fire(env, key, 3)
    assert [r.status_code for r in again] == [200, 200, 200]


async def test_tpm_reserves_then_settles_from_usage(env: Env) -> None:
    # max_model_len 256 caps each reservation at 256; 600 tokens per minute fit two at once.
    key = env.add_key(key_id="t600", tpm=600)
    big = {**CHAT, "max_tokens": 250}
    env.upstream.hold()
    task = asyncio.ensure_future(_fire(env, key, 5, big))
    await until(lambda: env.upstream.active == 2)
    await until(lambda: env.gateway.metrics.refusals.labels(
        "ns", "pool", "t600", "tpm")._value.get() == 3)
    assert env.limiter.usage("t600") == (2, 512, 2)
    env.upstream.release()
    responses = await task
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 429, 429, 429]
    refused = [r for r in responses if r.status_code == 429]
    assert all(r.json()["error"]["limit"] == "tpm" for r in refused)
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    # settled: 2 x (10 prompt + 5 completion) = 30, so two more 256-token reservations fit
    assert env.limiter.usage("t600") == (2, 30, 0)
    assert [r.status_code for r in await _fire(env, key, 2, big)] == [200, 200]
    assert env.limiter.usage("t600") == (4, 60, 0)


async def test_request_that_can_never_fit_is_refused_as_too_large(env: Env) -> None:
    key = env.add_key(key_id="t100", tpm=100)
    r = (await _fire(env, key, 1, {**CHAT, "max_tokens": 200}))[0]
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "request_too_large"
    assert "retry-after" not in r.headers
    assert env.limiter.usage("t100") == (0, 0, 0)


async def test_429_in_anthropic_style(env: Env) -> None:
    key = env.add_key(key_id="a1", rpm=1)
    body = {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    first = await env.http.post("/anthropic/v1/messages", json=body, headers={"x-api-key": key})
    second = await env.http.post("/anthropic/v1/messages", json=body, headers={"x-api-key": key})
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.json()["type"] == "error"
    assert second.json()["error"]["type"] == "rate_limit_error"
    assert int(second.headers["retry-after"]) >= 1


async def test_upstream_down_is_502_and_frees_the_slot(env: Env) -> None:
    key = env.add_key(key_id="down", concurrency=1)
    env.source.put(key_record(key, upstream="http://127.0.0.1:9", key_id="down"))
    env.gateway.models.put("http://127.0.0.1:9", 256)
    r = await env.http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_unavailable"
    assert env.limiter.usage("down") == (1, 0, 0)


async def test_upstream_refusing_the_internal_key_is_502_not_401(env: Env) -> None:
    # The client's key is fine; the pool's upstream key is out of date. Nothing is charged.
    env.source.put(upstream_key("wrong-internal-key"))
    env.gateway.models.put(env.upstream_url, 256)
    r = await env.http.post("/v1/chat/completions", json=CHAT, headers=bearer(env.key))
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_auth_failed"
    assert env.limiter.usage("key_test") == (1, 0, 0)


async def test_upstream_client_error_passes_through_and_settles_to_zero(env: Env) -> None:
    # vLLM answers 4xx (here 404 for an unknown model) without generating: nothing is charged.
    r = await env.http.post("/v1/chat/completions", content=b'{"model": "x"}',
                            headers={**bearer(env.key), "content-type": "application/json"})
    assert r.status_code == 200  # the stand-in does not check models; use a route it lacks
    env.source.put(key_record(env.key, upstream=env.upstream_url + "/nowhere"))
    env.gateway.models.put(env.upstream_url + "/nowhere", 256)
    r = await env.http.post("/v1/chat/completions", json=CHAT, headers=bearer(env.key))
    assert r.status_code == 404
    assert env.limiter.usage("key_test") == (2, 15, 0)


# -- block end ------------------------------------------------------------------------------------
async def test_stream_running_at_block_end_is_cut_after_the_grace(env: Env) -> None:
    key = env.add_key(key_id="eu", blocks=("europe",))
    env.clock.set(datetime(2026, 11, 23, 15, 59, 59, 500000, tzinfo=UTC))
    t0 = time.monotonic()
    body = {**CHAT, "stream": True, "endless": True}
    r = await env.http.post("/v1/chat/completions", json=body, headers=bearer(key))
    elapsed = time.monotonic() - t0
    assert r.status_code == 200
    assert 0.9 <= elapsed < 5, elapsed  # 0.5 s to the boundary + 0.5 s grace
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    assert data[-2]["error"]["code"] == "block_ended"
    assert data[-2]["error"]["next_open_at"] == "2026-11-24T08:00:00Z"
    assert len(data) > 10
    await until(lambda: env.upstream.aborted == 1)
    r = await env.http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert r.status_code == 403


async def test_request_finishing_within_the_grace_completes(env: Env) -> None:
    key = env.add_key(key_id="eu", blocks=("europe",))
    env.clock.set(datetime(2026, 11, 23, 15, 59, 59, 950000, tzinfo=UTC))
    env.upstream.hold()
    task = asyncio.ensure_future(env.http.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer(key)))
    await until(lambda: env.upstream.active == 1)
    await until(lambda: env.clock() > datetime(2026, 11, 23, 16, 0, 0, 100000, tzinfo=UTC))
    env.upstream.release()
    r = await task
    assert r.status_code == 200
    assert sse_data(r.text)[-1] == "[DONE]"
    assert all("error" not in c for c in sse_data(r.text)[:-1])
    assert env.limiter.usage("eu")[1] == 15


async def test_anthropic_stream_cut_at_block_end(env: Env) -> None:
    key = env.add_key(key_id="eu", blocks=("europe",))
    env.clock.set(datetime(2026, 11, 23, 15, 59, 59, 800000, tzinfo=UTC))
    env.upstream.hold()  # headers go out, then the stream stalls past the deadline
    body = {"model": "tiny", "max_tokens": 3, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    r = await env.http.post("/anthropic/v1/messages", json=body, headers={"x-api-key": key})
    assert r.status_code == 200
    last = sse_events(r.text)[-1]
    assert last.startswith("event: error")
    err = json.loads(last.split("data: ", 1)[1])
    assert err["type"] == "error"
    assert err["error"]["code"] == "block_ended"
    env.upstream.release()


async def test_response_not_started_at_the_deadline_is_refused(env: Env) -> None:
    key = env.add_key(key_id="eu", blocks=("europe",))
    env.clock.set(datetime(2026, 11, 23, 15, 59, 59, 800000, tzinfo=UTC))
    env.upstream.hold()  # a non-streamed answer: no headers until it is done
    r = await env.http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "block_ended"
    assert r.json()["error"]["next_open_at"] == "2026-11-24T08:00:00Z"
    await until(lambda: env.upstream.aborted == 1)
    env.upstream.release()
    assert env.limiter.usage("eu")[2] == 0


# -- operations -----------------------------------------------------------------------------------
async def test_metrics_name_key_ids_never_keys(env: Env) -> None:
    await env.http.post("/v1/chat/completions", json=CHAT, headers=bearer(env.key))
    await env.http.post("/v1/chat/completions", json=CHAT, headers=bearer(new_key()))
    text = (await env.http.get("/metrics")).text
    assert ('gpupool_gateway_requests_total{key_id="key_test",namespace="ns",pool="pool",'
            'route="chat",status="200"} 1.0') in text
    assert 'gpupool_gateway_tokens_total{key_id="key_test",kind="completion"' in text
    assert 'key_id="unknown"' in text
    assert "gpupool_gateway_keys 1.0" in text
    leaked = env.key in text or env.upstream_key in text or "sk_pool_" in text
    assert not leaked, "a key appeared in /metrics"


async def test_no_key_in_any_log_line(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bad = env.add_key(key_id="pd", subscription_phase="past_due")
    for key in (env.key, bad, new_key()):
        await env.http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
        await env.http.post("/v1/chat/completions", json={**CHAT, "stream": True},
                            headers=bearer(key))
    env.source.put(key_record(env.key, upstream="http://127.0.0.1:9", key_id="key_test"))
    env.gateway.models.put("http://127.0.0.1:9", 256)
    await env.http.post("/v1/chat/completions", json=CHAT, headers=bearer(env.key))
    text = "\n".join(r.getMessage() + str(r.exc_info or "") for r in caplog.records)
    assert caplog.records, "expected some log output (e.g. the upstream failure)"
    leaked = any(k in text for k in (env.key, bad, env.upstream_key))
    assert not leaked, "a key appeared in the log"


class _Never:
    async def run(self, store: KeyStore) -> None:
        await asyncio.Event().wait()


async def test_health_and_readiness() -> None:
    source: KeySource = _Never()
    gw = Gateway(source)
    async with serve(gw, lifespan="on") as url, httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 503
        gw.store.mark_synced()
        assert (await http.get("/readyz")).status_code == 200

