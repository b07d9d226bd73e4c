"""Shared limits through a real Debian ``redis-server``: exact across limiter instances and across
two gateway replicas; leases of a dead replica lapse; Redis down means refuse, not admit."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from gpupool.gateway.app import Gateway
from gpupool.gateway.keys import Limits, StaticKeySource
from gpupool.gateway.limits import LimiterUnavailable, RedisLimiter
from gpupool.gateway.testing import FakeVllm, key_record, serve, upstream_key
from support.redis import start_redis

BIG = 10**9


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with start_redis() as server:
        yield server.url


def kid() -> str:
    return "key_" + uuid.uuid4().hex[:12]


async def until(cond: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)  # poll interval


@pytest.fixture
async def pair(redis_url: str) -> AsyncIterator[tuple[RedisLimiter, RedisLimiter]]:
    a, b = RedisLimiter(redis_url), RedisLimiter(redis_url)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def test_rpm_exact_across_two_limiters(pair: tuple[RedisLimiter, RedisLimiter]) -> None:
    a, b = pair
    k = kid()
    limits = Limits(rpm=23, tpm=BIG, concurrency=BIG)
    results = await asyncio.gather(*((a if i % 2 else b).acquire(k, limits, 1)
                                     for i in range(300)))
    assert sum(r.admitted for r in results) == 23
    refused = [r for r in results if not r.admitted]
    assert {r.reason for r in refused} == {"rpm"}
    assert all(0 < r.retry_after <= 60 for r in refused)


async def test_concurrency_exact_across_two_limiters(
        pair: tuple[RedisLimiter, RedisLimiter]) -> None:
    a, b = pair
    k = kid()
    limits = Limits(rpm=BIG, tpm=BIG, concurrency=4)
    results = await asyncio.gather(*((a if i % 2 else b).acquire(k, limits, 1)
                                     for i in range(100)))
    admitted = [(i, r) for i, r in enumerate(results) if r.admitted]
    assert len(admitted) == 4
    assert not (await b.acquire(k, limits, 1)).admitted
    i, first = admitted[0]
    await (a if i % 2 else b).finish(k, first.lease, 1)
    assert (await b.acquire(k, limits, 1)).admitted
    assert not (await a.acquire(k, limits, 1)).admitted


async def test_tpm_reserve_settle_keep(pair: tuple[RedisLimiter, RedisLimiter]) -> None:
    a, b = pair
    k = kid()
    limits = Limits(rpm=BIG, tpm=100, concurrency=BIG)
    first = await a.acquire(k, limits, 60)
    assert first.admitted
    refused = await b.acquire(k, limits, 50)
    assert (refused.admitted, refused.reason) == (False, "tpm")
    assert 59 <= refused.retry_after <= 60
    await a.finish(k, first.lease, 10)
    second = await b.acquire(k, limits, 50)
    assert second.admitted
    await b.finish(k, second.lease, None)  # aborted: keeps its 50
    assert not (await a.acquire(k, limits, 41)).admitted
    assert (await a.acquire(k, limits, 40)).admitted
    too_large = await a.acquire(k, limits, 101)
    assert (too_large.admitted, too_large.reason) == (False, "too_large")


async def test_window_slides(redis_url: str) -> None:
    lim = RedisLimiter(redis_url, window=1.0)
    await lim.start()
    try:
        k = kid()
        limits = Limits(rpm=2, tpm=BIG, concurrency=BIG)
        assert (await lim.acquire(k, limits, 0)).admitted
        assert (await lim.acquire(k, limits, 0)).admitted
        refused = await lim.acquire(k, limits, 0)
        assert not refused.admitted
        assert 0 < refused.retry_after <= 1.0
        deadline = time.monotonic() + 5
        while not (await lim.acquire(k, limits, 0)).admitted:
            assert time.monotonic() < deadline, "the window never slid"
            await asyncio.sleep(0.05)  # poll interval
    finally:
        await lim.aclose()


async def test_leases_of_a_dead_replica_lapse(redis_url: str) -> None:
    dead = RedisLimiter(redis_url, lease_seconds=1.0)
    live = RedisLimiter(redis_url, lease_seconds=1.0)
    await dead.start()
    await live.start()
    try:
        k = kid()
        limits = Limits(rpm=BIG, tpm=BIG, concurrency=1)
        assert (await dead.acquire(k, limits, 1)).admitted
        await dead.aclose()  # "crashes": never finishes, stops renewing
        assert not (await live.acquire(k, limits, 1)).admitted
        deadline = time.monotonic() + 5
        while not (await live.acquire(k, limits, 1)).admitted:
            assert time.monotonic() < deadline, "the dead replica's lease never lapsed"
            await asyncio.sleep(0.05)  # poll interval
    finally:
        await live.aclose()


async def test_a_live_replica_keeps_its_leases(redis_url: str) -> None:
    holder = RedisLimiter(redis_url, lease_seconds=0.6)  # renews every 0.2 s
    other = RedisLimiter(redis_url, lease_seconds=0.6)
    await holder.start()
    await other.start()
    try:
        k = kid()
        limits = Limits(rpm=BIG, tpm=BIG, concurrency=1)
        held = await holder.acquire(k, limits, 1)
        assert held.admitted
        end = time.monotonic() + 2.0  # more than three lease lifetimes
        while time.monotonic() < end:
            assert not (await other.acquire(k, limits, 1)).admitted
            await asyncio.sleep(0.1)  # sampling interval of a bounded "stays refused" check
        await holder.finish(k, held.lease, 1)
        assert (await other.acquire(k, limits, 1)).admitted
    finally:
        await holder.aclose()
        await other.aclose()


async def test_unreachable_redis_refuses() -> None:
    with start_redis() as server:
        lim = RedisLimiter(server.url)
        await lim.start()
        server.process.terminate()
        server.process.wait(timeout=10)
        with pytest.raises(LimiterUnavailable):
            await lim.acquire(kid(), Limits(rpm=1, tpm=1, concurrency=1), 0)
        await lim.aclose()
    with pytest.raises(LimiterUnavailable):
        await RedisLimiter(server.url).start()


# -- two gateway replicas -------------------------------------------------------------------------
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def test_two_gateways_sharing_redis_never_admit_more_than_the_limits(
        redis_url: str) -> None:
    ukey = "sk_internal_" + secrets.token_urlsafe(16)
    fake = FakeVllm(ukey)
    rpm_key, conc_key, tpm_key = ("sk_pool_" + secrets.token_urlsafe(32) for _ in range(3))
    ids = {"rpm": kid(), "conc": kid(), "tpm": kid()}
    async with serve(fake.app) as up:
        records = [
            key_record(rpm_key, upstream=up, key_id=ids["rpm"], rpm=10),
            key_record(conc_key, upstream=up, key_id=ids["conc"], concurrency=4),
            key_record(tpm_key, upstream=up, key_id=ids["tpm"], tpm=600),
            upstream_key(ukey),
        ]
        gw1 = Gateway(StaticKeySource(records), limiter=RedisLimiter(redis_url))
        gw2 = Gateway(StaticKeySource(records), limiter=RedisLimiter(redis_url))
        async with serve(gw1, lifespan="on") as u1, serve(gw2, lifespan="on") as u2, \
                httpx.AsyncClient(timeout=30) as http:

            async def fire(key: str, n: int, body: dict[str, object]) -> list[int]:
                async def one(i: int) -> int:
                    url = (u1 if i % 2 else u2) + "/v1/chat/completions"
                    r = await http.post(url, json=body,
                                        headers={"Authorization": f"Bearer {key}"})
                    return r.status_code
                return list(await asyncio.gather(*(one(i) for i in range(n))))

            # RPM: 60 requests over both replicas, 10 admitted
            codes = await fire(rpm_key, 60, CHAT)
            assert (codes.count(200), codes.count(429)) == (10, 50)
            assert fake.paths().count("/v1/chat/completions") == 10

            # concurrency: upstream held, never more than 4 in flight over both replicas
            fake.hold()
            task = asyncio.ensure_future(fire(conc_key, 40, CHAT))
            await until(lambda: fake.active == 4)

            def refused(gw: Gateway, reason: str, key_id: str) -> float:
                return float(gw.metrics.refusals.labels("ns", "pool", key_id,
                                                        reason)._value.get())

            await until(lambda: refused(gw1, "concurrency", ids["conc"])
                        + refused(gw2, "concurrency", ids["conc"]) == 36)
            fake.release()
            codes = await task
            assert (codes.count(200), codes.count(429)) == (4, 36)
            assert fake.max_active == 4

            # TPM: each reservation is 256 (the fake's max_model_len); 600 fit two
            fake.max_active = 0
            fake.hold()
            task = asyncio.ensure_future(fire(tpm_key, 10, {**CHAT, "max_tokens": 250}))
            await until(lambda: fake.active == 2)
            await until(lambda: refused(gw1, "tpm", ids["tpm"])
                        + refused(gw2, "tpm", ids["tpm"]) == 8)
            fake.release()
            codes = await task
            assert (codes.count(200), codes.count(429)) == (2, 8)
            assert fake.max_active == 2
