"""Opening and closing keys at the UTC block boundaries.

One task sleeps until the next boundary (00:00, 08:00, 16:00 UTC) and then flips every key whose
gate changed, in one pass with bounded concurrency. The pass decides every key from the world
cache first (no reads), then writes in order of what matters:

1. each affected pool's open-keys Secret (what the gateway enforces): one write per pool;
2. every flipped key's Secret gate label and Subscription gate fields, each request holding one
   of ``concurrency`` slots;
3. one Event per flipped key, once every key is right.

No per-object timers. The subscription reconcile computes the same gate, so a periodic resync
repairs any drift.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from gpupool import events, keys, names
from gpupool.blocks import BLOCK_ORDER, Block, block_at, next_boundary, normalize_blocks
from gpupool.gate import OPEN, gate_state
from gpupool.kube import Conflict
from gpupool.ownership import Owner, is_child
from gpupool.world import Key

if TYPE_CHECKING:
    from gpupool.controller import Controller
    from gpupool.subscription_service import Pass

log = logging.getLogger(__name__)
Obj = dict[str, Any]

DEFAULT_CONCURRENCY = 64
"""API requests in flight during a boundary pass (the benchmark's limit uses the same)."""
OPEN_KEYS_INTERVAL = 0.5
"""Queued rebuilds of one pool's open-keys Secret run at most this often: a burst of key
events (a boundary, a burst of activations) costs a few rebuilds, not one per event."""


@dataclass(frozen=True)
class _KeyInfo:
    """What the open-keys Secret needs from one key Secret, decoded once per resourceVersion."""

    resource_version: str
    key_id: str
    api_key: str = field(repr=False)  # never in a repr, so never in a log line
    blocks: tuple[Block, ...] = ()


@dataclass(frozen=True)
class _Flip:
    sub: Obj
    secret_name: str
    gate: str
    fields: Obj
    pool: Key


class GateKeeper:
    def __init__(self, ctl: Controller, concurrency: int = DEFAULT_CONCURRENCY) -> None:
        self.ctl = ctl
        self.concurrency = concurrency
        self._written: dict[Key, dict[str, str]] = {}
        self._written_rv: dict[Key, str] = {}
        self._locks: dict[Key, asyncio.Lock] = {}
        self._synced_at: dict[Key, float] = {}
        self._decoded: dict[Key, _KeyInfo] = {}
        self.last_flip_seconds: float | None = None
        self.last_keys_right_seconds: float | None = None

    # -- per subscription (from its reconcile) -------------------------------------------------
    async def record_gate(self, p: Pass, gate: str, sub_phase: str, pool_phase: str,
                          blocks: tuple[Block, ...]) -> None:
        from gpupool.subscription_service import gate_fields

        fields = gate_fields(gate, sub_phase, pool_phase, blocks, p.now, p.old)
        p.status.update({k: v for k, v in fields.items() if v is not None})
        if fields["nextGateChangeAt"] is None:
            p.status.pop("nextGateChangeAt", None)
        if p.old.get("gate") != gate:
            self.ctl.metrics.gate_flip(gate)
            p.note("KeyOpened" if gate == OPEN else "KeyClosed",
                   f"API key {'opened' if gate == OPEN else 'closed'}")
        pool_name = (p.sub.get("spec") or {}).get("poolRef", {}).get("name", "")
        self.ctl.open_keys.add((p.ns, pool_name))

    async def _announce(self, sub: Obj, gate: str) -> None:
        self.ctl.metrics.gate_flip(gate)
        await events.post(self.ctl.kube, sub, "KeyOpened" if gate == OPEN else "KeyClosed",
                          f"API key {'opened' if gate == OPEN else 'closed'}")

    # -- per pool: the open-keys Secret --------------------------------------------------------
    async def sync_open_keys(self, key: Key, pool: Obj | None = None,
                             phase: str | None = None, *, settle: bool = True) -> None:
        """Make the pool's open-keys Secret list exactly its open keys.

        One rebuild per pool at a time (the queue and a boundary pass never race each other's
        write); with ``settle`` (the queue's calls) rebuilds of a pool are spaced by
        ``OPEN_KEYS_INTERVAL``, so events arriving meanwhile fold into the next one.
        """
        loop = asyncio.get_running_loop()
        if settle:
            wait = self._synced_at.get(key, float("-inf")) + OPEN_KEYS_INTERVAL - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
        async with self._locks.setdefault(key, asyncio.Lock()):
            try:
                await self._sync_open_keys(key, pool, phase)
            finally:
                self._synced_at[key] = loop.time()

    def _key_info(self, secret_key: Key, secret: Obj) -> _KeyInfo:
        rv = str(secret.get("metadata", {}).get("resourceVersion", ""))
        info = self._decoded.get(secret_key)
        if info is None or info.resource_version != rv or not rv:
            data = keys.decode(secret.get("data"))
            blocks = normalize_blocks(data["blocks"].split(",")) if data.get("blocks") else ()
            info = _KeyInfo(rv, data.get("keyId", ""), data.get("apiKey", ""), blocks)
            self._decoded[secret_key] = info
        return info

    def want_open(self, key: Key, phase: str) -> dict[str, str]:
        """client id -> key for every key of the pool that is open now.

        ``gate.gate_state`` spelled out for a whole pool at once (it runs for every key event,
        so the block and the pool's phase are looked at once per pool, not once per key).
        """
        ctl = self.ctl
        now = ctl.clock()
        want: dict[str, str] = {}
        if gate_state("active", phase, BLOCK_ORDER, now) != OPEN:
            return want  # the pool is not active: every key is closed
        current = block_at(now)
        secrets = ctl.world.key_secrets
        for sub_key in ctl.world.sub_keys_of_pool(key):
            sub = ctl.world.subs.get(sub_key)
            if sub is None or (sub.get("status") or {}).get("phase") != "active":
                continue
            secret_key = (key[0], names.key_secret_name(sub_key[1]))
            secret = secrets.get(secret_key)
            if secret is None:
                continue
            info = self._key_info(secret_key, secret)
            if info.api_key and current in info.blocks:
                want[info.key_id or sub_key[1]] = info.api_key
        if len(self._decoded) > 2 * len(secrets) + 64:
            for gone in [k for k in self._decoded if k not in secrets]:
                del self._decoded[gone]
        return want

    async def _sync_open_keys(self, key: Key, pool: Obj | None, phase: str | None) -> None:
        ctl = self.ctl
        pool = pool or ctl.world.pools.get(key)
        if pool is None:
            return
        phase = phase or (pool.get("status") or {}).get("phase", "")
        want = self.want_open(key, phase)
        if self._written.get(key) == want:
            return
        body = keys.build_open_keys_secret(namespace=key[0], pool=key[1],
                                           pool_uid=pool["metadata"]["uid"], open_keys=want)
        name = names.open_keys_secret_name(key[1])
        path = ctl.kube.core_path("secrets", key[0], name)

        async def replace(resource_version: str) -> Obj | None:
            return await ctl.kube.request("PUT", path, {**body, "metadata": {
                **body["metadata"], "resourceVersion": resource_version}})  # type: ignore[dict-item]

        written = None
        rv = self._written_rv.get(key)
        if rv is not None:
            # Replaced on the version this process wrote last, without reading it first; if
            # anyone else wrote it since, that conflicts and it is read below.
            with contextlib.suppress(Conflict):
                written = await replace(rv)
        if written is None:
            current = await ctl.kube.get("secrets", key[0], name)
            if current is not None and not is_child(current, Owner.pool(key[1])):
                log.warning("Secret %s/%s exists and was not made for pool %s; left alone",
                            key[0], name, key[1])
                return
            if current is None:
                written = await ctl.kube.create("secrets", key[0], body)
            elif keys.decode(current.get("data")) != want:
                written = await replace(current["metadata"]["resourceVersion"])
            else:
                written = current
        if written is not None:
            self._written_rv[key] = str(written["metadata"]["resourceVersion"])
        self._written[key] = want
        ctl.metrics.keys_open(key, len(want))

    # -- all keys at a boundary ---------------------------------------------------------------
    def _decide(self) -> list[_Flip]:
        """Every key whose gate differs from the clock now (pure: the world cache only)."""
        from gpupool.subscription_service import gate_fields

        ctl = self.ctl
        now = ctl.clock()
        flips: list[_Flip] = []
        for sub in list(ctl.world.subs.values()):
            meta = sub["metadata"]
            st = sub.get("status") or {}
            secret_name = st.get("keySecretName")
            if not secret_name or meta.get("deletionTimestamp"):
                continue
            pool_key = (meta["namespace"], (sub.get("spec") or {}).get("poolRef", {})
                        .get("name", ""))
            pool = ctl.world.pools.get(pool_key)
            pool_phase = ((pool or {}).get("status") or {}).get("phase", "")
            blocks = normalize_blocks(st.get("blocks") or [])
            gate = gate_state(st.get("phase", ""), pool_phase, blocks, now)
            if gate == st.get("gate"):
                continue
            fields = gate_fields(gate, st.get("phase", ""), pool_phase, blocks, now, st)
            flips.append(_Flip(sub, secret_name, gate, fields, pool_key))
        return flips

    async def flip_all(self) -> int:
        """Bring every key's gate in line with the clock now; returns how many flipped."""
        ctl = self.ctl
        loop = asyncio.get_running_loop()
        started = loop.time()
        sem = asyncio.Semaphore(self.concurrency)

        async def limited(call: Callable[[], Awaitable[Any]]) -> None:
            async with sem:
                await call()

        async def run(calls: list[Callable[[], Awaitable[Any]]]) -> list[BaseException | None]:
            results = await asyncio.gather(*(limited(c) for c in calls),
                                           return_exceptions=True)
            return [r if isinstance(r, BaseException) else None for r in results]

        flips = self._decide()
        pools = sorted({f.pool for f in flips})
        failed = [e for e in await run([partial(self.sync_open_keys, k, settle=False)
                                         for k in pools]) if e]

        async def remembered(write: Callable[[], Awaitable[Obj | None]]) -> None:
            # Recorded as the operator's own writes: their watch echoes start no reconcile.
            ctl.world.wrote(await write())

        calls: list[Callable[[], Awaitable[Any]]] = []
        for f in flips:
            ns, name = f.sub["metadata"]["namespace"], f.sub["metadata"]["name"]
            calls.append(partial(remembered, partial(
                ctl.kube.patch, "secrets", ns, f.secret_name,
                {"metadata": {"labels": {names.LABEL_GATE: f.gate}}})))
            calls.append(partial(remembered, partial(
                ctl.kube.patch_status, "subscriptions", ns, name, f.fields)))
        outcomes = await run(calls)
        done = [f for i, f in enumerate(flips) if not outcomes[2 * i] and not outcomes[2 * i + 1]]
        failed += [e for e in outcomes if e]
        self.last_keys_right_seconds = loop.time() - started
        failed += [e for e in await run([partial(self._announce, f.sub, f.gate) for f in done])
                   if e]
        for exc in failed[:3]:
            log.warning("gate flip failed: %s: %s", type(exc).__name__, exc)
        if failed:
            for sub_key in list(ctl.world.subs):
                ctl.subs.add(sub_key)
        self.last_flip_seconds = loop.time() - started
        log.info("boundary pass: %d key(s) flipped in %.2fs (keys and open-keys Secrets right "
                 "after %.2fs, then events)", len(done), self.last_flip_seconds,
                 self.last_keys_right_seconds)
        return len(done)

    async def run(self) -> None:
        """Sleep to each boundary and flip; the clock is re-read so a shifted clock works."""
        while True:
            now = self.ctl.clock()
            boundary = next_boundary(now)
            while now < boundary:
                await asyncio.sleep(min(60.0, (boundary - now).total_seconds()))
                now = self.ctl.clock()
            try:
                await self.flip_all()
            except Exception as exc:  # the next resync repairs; never kill the loop
                log.warning("boundary pass failed: %s: %s", type(exc).__name__, exc)
