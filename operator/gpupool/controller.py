"""The operator's moving parts in one place: storage, the world cache, the work queues,
billing, the gate keeper and the clock."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from datetime import datetime
from typing import Any

from gpupool import keys
from gpupool.billing_port import Billing, NoBilling
from gpupool.blocks import utcnow
from gpupool.gates import GateKeeper
from gpupool.kube import Conflict, Kube
from gpupool.metrics import Metrics
from gpupool.workqueue import WorkQueue
from gpupool.world import World

log = logging.getLogger(__name__)


class Controller:
    def __init__(self, kube: Kube, billing: Billing | None = None, workers: int = 16,
                 clock: Callable[[], datetime] = utcnow, resync_seconds: float = 300.0) -> None:
        self.kube = kube
        self.billing: Billing = billing or NoBilling()
        self.clock = clock
        self.world = World()
        self.metrics = Metrics()
        self.gates = GateKeeper(self)
        self.resync_seconds = resync_seconds
        self.pools = WorkQueue("pools", self._timed("pool", self._reconcile_pool), workers)
        self.subs = WorkQueue("subscriptions", self._timed("subscription", self._reconcile_sub),
                              workers)
        self.open_keys = WorkQueue("open-keys", self._timed("open-keys", self._sync_keys), 4)
        self._tasks: list[asyncio.Task[Any]] = []

    def _timed(self, resource: str, fn: Callable[[Any], Any]) -> Callable[[Hashable], Any]:
        async def run(key: Hashable) -> float | None:
            started = time.monotonic()
            outcome = "ok"
            try:
                result: float | None = await fn(key)
                return result
            except Conflict:
                outcome = "conflict"
                raise
            except Exception:
                outcome = "error"
                raise
            finally:
                self.metrics.reconcile(resource, outcome, time.monotonic() - started)
        return run

    async def _reconcile_pool(self, key: tuple[str, str]) -> float | None:
        from gpupool.pool_service import reconcile_pool
        return await reconcile_pool(self, key)

    async def _reconcile_sub(self, key: tuple[str, str]) -> float | None:
        from gpupool.subscription_service import reconcile_subscription
        return await reconcile_subscription(self, key)

    async def _sync_keys(self, key: tuple[str, str]) -> None:
        await self.gates.sync_open_keys(key)

    def start(self) -> None:
        self.pools.start()
        self.subs.start()
        self.open_keys.start()
        self._tasks.append(asyncio.create_task(self.gates.run(), name="boundaries"))
        self._tasks.append(asyncio.create_task(self._resync(), name="resync"))

    def spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for q in (self.pools, self.subs, self.open_keys):
            await q.stop()
        close = getattr(self.billing, "close", None)
        if close is not None:
            await close()
        await self.kube.close()

    async def _resync(self) -> None:
        """Level-triggered repair: every object is reconciled again now and then."""
        while True:
            await asyncio.sleep(self.resync_seconds)
            for key in list(self.world.pools):
                self.pools.add(key)
            for key in list(self.world.subs):
                self.subs.add(key)
            for (ns, _), secret in list(self.world.key_secrets.items()):
                sub = keys.owned_by_subscription(secret)
                if sub and (ns, sub) not in self.world.subs:
                    self.subs.add((ns, sub))  # a key Secret whose subscription may be gone
