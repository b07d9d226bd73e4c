"""Opening and closing keys at the UTC block boundaries.

One task sleeps until the next boundary (00:00, 08:00, 16:00 UTC) and then flips every key whose
gate changed, in one pass with bounded concurrency: the Secret's gate label, the Subscription's
gate fields, an Event, and each affected pool's open-keys Secret. No per-object timers. The
subscription reconcile computes the same gate, so a periodic resync repairs any drift.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from gpupool import events, keys, names
from gpupool.blocks import Block, next_boundary, normalize_blocks
from gpupool.gate import OPEN, gate_state
from gpupool.world import Key

if TYPE_CHECKING:
    from gpupool.controller import Controller
    from gpupool.subscription_service import Pass

log = logging.getLogger(__name__)
Obj = dict[str, Any]


class GateKeeper:
    def __init__(self, ctl: Controller, concurrency: int = 64) -> None:
        self.ctl = ctl
        self.concurrency = concurrency
        self._written: dict[Key, dict[str, str]] = {}
        self.last_flip_seconds: float | None = None

    # -- per subscription (from its reconcile) -------------------------------------------------
    async def record_gate(self, p: Pass, gate: str, sub_phase: str, pool_phase: str,
                          blocks: tuple[Block, ...]) -> None:
        from gpupool.subscription_service import gate_fields

        fields = gate_fields(gate, sub_phase, pool_phase, blocks, p.now, p.old)
        p.status.update({k: v for k, v in fields.items() if v is not None})
        if fields["nextGateChangeAt"] is None:
            p.status.pop("nextGateChangeAt", None)
        if p.old.get("gate") != gate:
            await self._announce(p.sub, gate)
        pool_name = (p.sub.get("spec") or {}).get("poolRef", {}).get("name", "")
        self.ctl.open_keys.add((p.ns, pool_name))

    async def _announce(self, sub: Obj, gate: str) -> None:
        self.ctl.metrics.gate_flip(gate)
        await events.post(self.ctl.kube, sub, "KeyOpened" if gate == OPEN else "KeyClosed",
                          f"API key {'opened' if gate == OPEN else 'closed'}")

    # -- per pool: the open-keys Secret --------------------------------------------------------
    async def sync_open_keys(self, key: Key, pool: Obj | None = None,
                             phase: str | None = None) -> None:
        ctl = self.ctl
        pool = pool or ctl.world.pools.get(key)
        if pool is None:
            return
        phase = phase or (pool.get("status") or {}).get("phase", "")
        now = ctl.clock()
        want: dict[str, str] = {}
        for sub in ctl.world.subs_of_pool(key):
            st = sub.get("status") or {}
            secret = ctl.world.key_secrets.get((key[0], names.key_secret_name(
                sub["metadata"]["name"])))
            if secret is None:
                continue
            data = keys.decode(secret.get("data"))
            blocks = normalize_blocks(data.get("blocks", "").split(",")) if data.get(
                "blocks") else ()
            if gate_state(st.get("phase", ""), phase, blocks, now) == OPEN and data.get("apiKey"):
                want[data.get("keyId", sub["metadata"]["name"])] = data["apiKey"]
        if self._written.get(key) == want:
            return
        body = keys.build_open_keys_secret(namespace=key[0], pool=key[1],
                                           pool_uid=pool["metadata"]["uid"], open_keys=want)
        name = names.open_keys_secret_name(key[1])
        current = await ctl.kube.get("secrets", key[0], name)
        if current is None:
            await ctl.kube.create("secrets", key[0], body)
        elif keys.decode(current.get("data")) != want:
            replacement = {**body, "metadata": {**body["metadata"],  # type: ignore[dict-item]
                           "resourceVersion": current["metadata"]["resourceVersion"]}}
            await ctl.kube.request("PUT", ctl.kube.core_path("secrets", key[0], name),
                                   replacement)
        self._written[key] = want
        ctl.metrics.keys_open(key, len(want))

    # -- all keys at a boundary ---------------------------------------------------------------
    async def flip_all(self) -> int:
        """Bring every key's gate in line with the clock now; returns how many flipped."""
        ctl = self.ctl
        loop = asyncio.get_running_loop()
        started = loop.time()
        now = ctl.clock()
        sem = asyncio.Semaphore(self.concurrency)
        touched_pools: set[Key] = set()

        async def flip(sub: Obj) -> bool:
            meta = sub["metadata"]
            st = sub.get("status") or {}
            secret_name = st.get("keySecretName")
            if not secret_name or meta.get("deletionTimestamp"):
                return False
            pool_key = (meta["namespace"], (sub.get("spec") or {}).get("poolRef", {})
                        .get("name", ""))
            pool = ctl.world.pools.get(pool_key)
            pool_phase = ((pool or {}).get("status") or {}).get("phase", "")
            blocks = normalize_blocks(st.get("blocks") or [])
            gate = gate_state(st.get("phase", ""), pool_phase, blocks, now)
            if gate == st.get("gate"):
                return False
            from gpupool.subscription_service import gate_fields

            fields = gate_fields(gate, st.get("phase", ""), pool_phase, blocks, now, st)
            async with sem:
                await ctl.kube.patch("secrets", meta["namespace"], secret_name,
                                     {"metadata": {"labels": {names.LABEL_GATE: gate}}})
                await ctl.kube.patch_status("subscriptions", meta["namespace"], meta["name"],
                                            fields)
                await self._announce(sub, gate)
            touched_pools.add(pool_key)
            return True

        results = await asyncio.gather(*(flip(s) for s in list(ctl.world.subs.values())),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        for exc in failed[:3]:
            log.warning("gate flip failed: %s: %s", type(exc).__name__, exc)
        for pool_key in touched_pools:
            await self.sync_open_keys(pool_key)
        if failed:
            for sub_key in list(ctl.world.subs):
                ctl.subs.add(sub_key)
        flipped = sum(1 for r in results if r is True)
        self.last_flip_seconds = loop.time() - started
        log.info("boundary pass: %d key(s) flipped in %.2fs", flipped, self.last_flip_seconds)
        return flipped

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
