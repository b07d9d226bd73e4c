"""A small controller work queue: de-duplicated keys, one worker per key at a time, retries with
backoff, and delayed wake-ups. kopf's watch handlers only enqueue; reconciles run here."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Hashable

log = logging.getLogger(__name__)

Reconcile = Callable[[Hashable], Awaitable[float | None]]
"""Returns seconds until the key wants to be reconciled again, or None."""


class RetryLater(Exception):
    def __init__(self, delay: float, reason: str) -> None:
        super().__init__(reason)
        self.delay = delay


class WorkQueue:
    def __init__(self, name: str, reconcile: Reconcile, workers: int = 8,
                 max_backoff: float = 60.0) -> None:
        self.name = name
        self._reconcile = reconcile
        self._workers = workers
        self._max_backoff = max_backoff
        self._queue: asyncio.Queue[Hashable] = asyncio.Queue()
        self._queued: set[Hashable] = set()
        self._active: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._failures: dict[Hashable, int] = {}
        self._timers: list[tuple[float, int, Hashable]] = []
        self._timer_seq = 0
        self._timer_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.processed = 0

    def add(self, key: Hashable) -> None:
        if key in self._active:
            self._dirty.add(key)
            return
        if key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: Hashable, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        self._timer_seq += 1
        heapq.heappush(self._timers, (time.monotonic() + delay, self._timer_seq, key))
        self._timer_wake.set()

    def start(self) -> None:
        for i in range(self._workers):
            self._tasks.append(asyncio.create_task(self._work(), name=f"{self.name}-worker-{i}"))
        self._tasks.append(asyncio.create_task(self._clock(), name=f"{self.name}-timers"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def idle(self) -> bool:
        return not self._queued and not self._active

    def pending(self, key: Hashable) -> bool:
        """Whether ``key`` has a pass queued or running (delayed wake-ups not counted)."""
        return key in self._queued or key in self._active

    async def _clock(self) -> None:
        while True:
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, key = heapq.heappop(self._timers)
                self.add(key)
            timeout = self._timers[0][0] - now if self._timers else None
            self._timer_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), timeout)

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._active.add(key)
            try:
                again = await self._reconcile(key)
                self._failures.pop(key, None)
                if again is not None:
                    self.add_after(key, again)
            except asyncio.CancelledError:
                raise
            except RetryLater as exc:
                log.info("%s %s: %s; again in %.0fs", self.name, key, exc, exc.delay)
                self.add_after(key, exc.delay)
            except Exception as exc:
                n = self._failures.get(key, 0) + 1
                self._failures[key] = n
                delay = min(self._max_backoff, 0.5 * 2 ** min(n, 10))
                log.warning("%s %s failed (%s: %s); retry %d in %.1fs", self.name, key,
                            type(exc).__name__, exc, n, delay)
                self.add_after(key, delay)
            finally:
                self.processed += 1
                self._active.discard(key)
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.add(key)
