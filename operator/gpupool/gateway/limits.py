"""Per-key limits: requests per minute, tokens per minute, concurrent requests — exactly.

Semantics (the same for :class:`LocalLimiter` and :class:`RedisLimiter`):

* **RPM** is a sliding log: a request admitted at ``t`` counts until ``t + 60 s``. A request is
  admitted only if fewer than ``rpm`` admitted requests are in the last 60 s, so no 60-second
  window ever holds more than ``rpm`` admissions (no fixed-window doubling at a minute edge).
* **TPM** is a sliding log of token *reservations*. At admission a request reserves an upper
  estimate of its tokens (see :mod:`gpupool.gateway.routes`); it is admitted only if the tokens of
  the last 60 s plus its reservation fit in ``tpm``. When the response ends the reservation is
  replaced (keeping its admission time) by the ``usage`` the upstream reported; a response with
  no usage (an aborted stream, a cut connection) keeps its reservation. A request whose estimate
  alone exceeds ``tpm`` can never be admitted (reason ``too_large``).
* **Concurrency** counts admitted requests that have not finished.

All three are checked and recorded in one atomic step: a refused request consumes nothing, and
two requests racing for the last unit cannot both win. Locally that step is a synchronous piece
of code on the event loop; with Redis it is one Lua script (Redis runs scripts atomically), so
any number of gateway replicas sharing a Redis never admit more than a limit between them. The
Redis scripts read the Redis server's clock (``TIME``), so replicas need no clock agreement.

A replica that dies holding concurrency leases does not leak them: each lease carries an expiry
that the live replica renews every ``lease_seconds / 3``; an unrenewed lease lapses after
``lease_seconds``. If Redis cannot be reached the gateway refuses (503) rather than admit
unchecked.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gpupool.gateway.keys import Limits

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    lease: str = ""
    reason: str = ""  # concurrency | rpm | tpm | too_large
    retry_after: float = 0.0  # seconds


class LimiterUnavailable(RuntimeError):
    """The shared limit state cannot be reached; the request must not be admitted."""


class Limiter(Protocol):
    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def acquire(self, key_id: str, limits: Limits, tokens: int) -> Admission: ...

    async def finish(self, key_id: str, lease: str, tokens: int | None) -> None:
        """Settle the reservation to ``tokens`` (None: keep the estimate); free the slot."""
        ...


def _lease_ids() -> Callable[[], str]:
    prefix = os.urandom(6).hex()
    counter = itertools.count(1)
    return lambda: f"{prefix}:{next(counter)}"


# ---------------------------------------------------------------------------------------------
# local memory
# ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _KeyState:
    rpm: deque[float] = field(default_factory=deque)
    tpm: deque[list[Any]] = field(default_factory=deque)  # [admitted_at, tokens, lease]
    tpm_by_lease: dict[str, list[Any]] = field(default_factory=dict)
    tpm_used: int = 0
    inflight: set[str] = field(default_factory=set)


class LocalLimiter:
    """Limits in this process's memory (one gateway replica)."""

    def __init__(self, *, window: float = WINDOW_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}
        self._lease = _lease_ids()

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def _expire(self, st: _KeyState, now: float) -> None:
        cutoff = now - self.window
        q = st.rpm
        while q and q[0] <= cutoff:
            q.popleft()
        t = st.tpm
        while t and t[0][0] <= cutoff:
            entry = t.popleft()
            st.tpm_used -= entry[1]
            del st.tpm_by_lease[entry[2]]

    async def acquire(self, key_id: str, limits: Limits, tokens: int) -> Admission:
        return self.acquire_now(key_id, limits, tokens)

    def acquire_now(self, key_id: str, limits: Limits, tokens: int) -> Admission:
        now = self._clock()
        st = self._keys.get(key_id)
        if st is None:
            st = self._keys[key_id] = _KeyState()
        self._expire(st, now)
        if tokens > limits.tpm:
            return Admission(False, reason="too_large")
        reason = ""
        retry = 0.0
        if len(st.inflight) >= limits.concurrency:
            reason, retry = "concurrency", 1.0
        if len(st.rpm) >= limits.rpm:
            reason = reason or "rpm"
            retry = max(retry, st.rpm[len(st.rpm) - limits.rpm] + self.window - now)
        if st.tpm_used + tokens > limits.tpm:
            reason = reason or "tpm"
            need = st.tpm_used + tokens - limits.tpm
            freed = 0
            for entry in st.tpm:
                freed += entry[1]
                if freed >= need:
                    retry = max(retry, entry[0] + self.window - now)
                    break
        if reason:
            return Admission(False, reason=reason, retry_after=max(retry, 0.001))
        lease = self._lease()
        st.rpm.append(now)
        entry = [now, tokens, lease]
        st.tpm.append(entry)
        st.tpm_by_lease[lease] = entry
        st.tpm_used += tokens
        st.inflight.add(lease)
        return Admission(True, lease=lease)

    async def finish(self, key_id: str, lease: str, tokens: int | None) -> None:
        st = self._keys.get(key_id)
        if st is None:
            return
        st.inflight.discard(lease)
        if tokens is not None:
            entry = st.tpm_by_lease.get(lease)
            if entry is not None:
                st.tpm_used += tokens - entry[1]
                entry[1] = tokens

    def usage(self, key_id: str) -> tuple[int, int, int]:
        """(requests, tokens, in flight) currently counted for a key (for tests)."""
        st = self._keys.get(key_id)
        if st is None:
            return (0, 0, 0)
        self._expire(st, self._clock())
        return (len(st.rpm), st.tpm_used, len(st.inflight))


# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------
# KEYS: 1 rpm zset (lease -> admitted ms), 2 tpm zset (lease -> admitted ms),
#       3 tpm hash (lease -> tokens), 4 tpm sum, 5 concurrency zset (lease -> lease expiry ms)
# ARGV: 1 rpm, 2 tpm, 3 concurrency, 4 tokens, 5 lease, 6 window ms, 7 lease ms
ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local conc = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local lease = ARGV[5]
local window = tonumber(ARGV[6])
local lease_ms = tonumber(ARGV[7])
local cutoff = now - window

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
if #old > 0 then
  local freed = 0
  for i = 1, #old, 500 do
    local chunk = {unpack(old, i, math.min(i + 499, #old))}
    local vals = redis.call('HMGET', KEYS[3], unpack(chunk))
    for _, v in ipairs(vals) do
      if v then freed = freed + tonumber(v) end
    end
    redis.call('HDEL', KEYS[3], unpack(chunk))
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  redis.call('DECRBY', KEYS[4], freed)
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)

if tokens > tpm then
  return {0, 'too_large', 0}
end
local reason = ''
local retry = 0
if redis.call('ZCARD', KEYS[5]) >= conc then
  reason = 'concurrency'
  retry = 1000
end
local count = redis.call('ZCARD', KEYS[1])
if count >= rpm then
  if reason == '' then reason = 'rpm' end
  local e = redis.call('ZRANGE', KEYS[1], count - rpm, count - rpm, 'WITHSCORES')
  local r = tonumber(e[2]) + window - now
  if r > retry then retry = r end
end
local used = tonumber(redis.call('GET', KEYS[4]) or '0')
if used + tokens > tpm then
  if reason == '' then reason = 'tpm' end
  local need = used + tokens - tpm
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local freed = 0
  for i = 1, #entries, 2 do
    freed = freed + tonumber(redis.call('HGET', KEYS[3], entries[i]) or '0')
    if freed >= need then
      local r = tonumber(entries[i + 1]) + window - now
      if r > retry then retry = r end
      break
    end
  end
end
if reason ~= '' then
  return {0, reason, retry}
end
redis.call('ZADD', KEYS[1], now, lease)
redis.call('ZADD', KEYS[2], now, lease)
redis.call('HSET', KEYS[3], lease, tokens)
redis.call('INCRBY', KEYS[4], tokens)
redis.call('ZADD', KEYS[5], now + lease_ms, lease)
for i = 1, 4 do
  redis.call('PEXPIRE', KEYS[i], window + 1000)
end
redis.call('PEXPIRE', KEYS[5], lease_ms * 2)
return {1, '', 0}
"""

# KEYS: 1 tpm hash, 2 tpm sum, 3 concurrency zset.  ARGV: 1 lease, 2 tokens (-1 keeps estimate)
FINISH_LUA = """
local tokens = tonumber(ARGV[2])
if tokens >= 0 then
  local old = redis.call('HGET', KEYS[1], ARGV[1])
  if old then
    redis.call('HSET', KEYS[1], ARGV[1], tokens)
    redis.call('INCRBY', KEYS[2], tokens - tonumber(old))
  end
end
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""

# KEYS: 1 concurrency zset.  ARGV: 1 lease ms, 2.. leases still running here
RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_ms = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + lease_ms, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], lease_ms * 2)
return 1
"""


def redis_keys(key_id: str, prefix: str = "gpupool:gw") -> tuple[str, str, str, str, str]:
    base = f"{prefix}:{{{key_id}}}"
    return (f"{base}:rpm", f"{base}:tpm", f"{base}:tpmv", f"{base}:tpmsum", f"{base}:conc")


class RedisLimiter:
    """Limits shared by every gateway replica that uses the same Redis."""

    def __init__(self, url: str, *, window: float = WINDOW_SECONDS, lease_seconds: float = 30.0,
                 prefix: str = "gpupool:gw", max_connections: int = 64,
                 client: Any = None) -> None:
        import redis.asyncio as aioredis

        if client is None:
            # A bounded pool that makes callers wait for a connection (a few dozen carry tens of
            # thousands of scripts per second) rather than opening hundreds under load; no
            # CLIENT SETINFO per connection.
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=5.0, socket_connect_timeout=2.0,
                socket_timeout=5.0, driver_info=None)
            client = aioredis.Redis.from_pool(pool)  # closes the pool with the client
        self._redis = client
        self.window_ms = int(window * 1000)
        self.lease_ms = int(lease_seconds * 1000)
        self.prefix = prefix
        self._acquire = self._redis.register_script(ACQUIRE_LUA)
        self._finish = self._redis.register_script(FINISH_LUA)
        self._renew = self._redis.register_script(RENEW_LUA)
        self._lease = _lease_ids()
        self._running: dict[str, set[str]] = {}
        self._renewer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self._redis.ping()
        except Exception as exc:
            raise LimiterUnavailable(f"cannot reach Redis: {type(exc).__name__}") from None
        self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        await self._redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:
            return False

    async def acquire(self, key_id: str, limits: Limits, tokens: int) -> Admission:
        lease = self._lease()
        try:
            res = await self._acquire(
                keys=redis_keys(key_id, self.prefix),
                args=[limits.rpm, limits.tpm, limits.concurrency, tokens, lease, self.window_ms,
                      self.lease_ms])
        except Exception as exc:
            raise LimiterUnavailable(f"Redis: {type(exc).__name__}") from None
        ok, reason, retry_ms = int(res[0]), res[1], int(res[2])
        if ok:
            self._running.setdefault(key_id, set()).add(lease)
            return Admission(True, lease=lease)
        if isinstance(reason, bytes):
            reason = reason.decode()
        return Admission(False, reason=reason, retry_after=max(retry_ms, 1) / 1000)

    async def finish(self, key_id: str, lease: str, tokens: int | None) -> None:
        running = self._running.get(key_id)
        if running is not None:
            running.discard(lease)
            if not running:
                del self._running[key_id]
        k = redis_keys(key_id, self.prefix)
        try:
            await self._finish(keys=(k[2], k[3], k[4]),
                               args=[lease, -1 if tokens is None else tokens])
        except Exception as exc:
            # The lease lapses by itself after lease_seconds; the reservation stays.
            log.warning("could not settle a request of key %s in Redis (%s)", key_id,
                        type(exc).__name__)

    async def _renew_loop(self) -> None:
        interval = self.lease_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew()
            except Exception as exc:
                log.warning("could not renew concurrency leases in Redis (%s)",
                            type(exc).__name__)

    async def renew(self) -> None:
        if not self._running:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for key_id, leases in list(self._running.items()):
                if leases:
                    await self._renew(keys=(redis_keys(key_id, self.prefix)[4],),
                                      args=[self.lease_ms, *leases], client=pipe)
            await pipe.execute()


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
