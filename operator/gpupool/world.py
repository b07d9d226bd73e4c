"""The operator's in-memory view of the cluster, fed by kopf's watch streams.

Reconciles read it to find related objects (a pool's subscriptions, a subscription's key)
without list calls; the ledger and billing steps re-read their own object from the API server.

Next to what the watches delivered it keeps, for a short while, what the operator's own writes
returned (``wrote``): ``latest`` answers with whichever copy has the higher resourceVersion, so a
reconcile that runs right after a write (before its watch event has arrived) sees that write and
does not repeat it or act on the state before it.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Hashable, Mapping
from typing import Any

Key = tuple[str, str]
Obj = dict[str, Any]

WRITTEN_TTL = 60.0
"""Seconds a written copy is kept at most: by then its watch event has long arrived, or the
object is gone (a deletion the operator did not make, which only the watch reports)."""


def key_of(body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata", {})
    return (meta.get("namespace", ""), meta.get("name", ""))


def resource_version(body: Mapping[str, Any] | None) -> int | None:
    try:
        return int((body or {}).get("metadata", {}).get("resourceVersion", ""))
    except (TypeError, ValueError):
        return None


def pool_ref_of(sub: Mapping[str, Any]) -> Key:
    """The pool a subscription belongs to: the one it holds seats in (``status.pool``, pinned
    when seats were first held), else the one its spec names."""
    ns = sub.get("metadata", {}).get("namespace", "")
    pinned = (sub.get("status") or {}).get("pool")
    if pinned:
        return (ns, pinned)
    ref = (sub.get("spec") or {}).get("poolRef") or {}
    return (ref.get("namespace") or ns, ref.get("name", ""))


def slim(body: Obj) -> Obj:
    """``body`` without ``metadata.managedFields``, its names and short strings shared.

    Nothing here reads managedFields, and they are about half of what a cached Subscription or
    key Secret costs. Every decoded watch event carries its own copy of each key and of values
    that repeat across objects (timestamps, reasons, block names, prices); interned, 5,000
    cached subscriptions share them (benchmarks/control_plane.py)."""
    meta = body.get("metadata")
    if isinstance(meta, dict) and "managedFields" in meta:
        body = {**body, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
    shared: Obj = _shared(body)
    return shared


SHARED_MAX = 40
"""Strings up to this long are interned; longer ones (messages, Secret data) rarely repeat."""


def _shared(value: Any) -> Any:
    if isinstance(value, dict):
        return {sys.intern(k) if isinstance(k, str) else k: _shared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shared(v) for v in value]
    if isinstance(value, str) and len(value) <= SHARED_MAX:
        return sys.intern(value)
    return value


class _Cache(dict[Key, Obj]):
    """A watch-fed map that keeps its objects slim, however they are put in."""

    def __setitem__(self, key: Key, body: Obj) -> None:
        super().__setitem__(key, slim(body))


class World:
    def __init__(self) -> None:
        self.pools: dict[Key, Obj] = _Cache()
        self.subs: dict[Key, Obj] = _Cache()
        self.key_secrets: dict[Key, Obj] = _Cache()
        self.deployments: dict[Key, Obj] = _Cache()
        self.ledger_written: dict[Key, float] = {}
        """When this process last wrote each pool's ledger (monotonic seconds)."""
        self._subs_by_pool: dict[Key, set[Key]] = defaultdict(set)
        self._sub_seen: dict[Key, float] = {}
        self.claims: dict[Key, tuple[str, bool, Any]] = {}
        """The planner's reading of each subscription, by resourceVersion (pool_service)."""
        self._written: dict[tuple[str, Key], tuple[float, Obj]] = {}
        self._applied: dict[Hashable, tuple[str, float]] = {}

    def put_sub(self, body: Obj) -> None:
        key = key_of(body)
        old = self.subs.get(key)
        if old is not None:
            self._subs_by_pool[pool_ref_of(old)].discard(key)
        self.subs[key] = body
        self._subs_by_pool[pool_ref_of(body)].add(key)
        self._sub_seen.setdefault(key, time.monotonic())

    def drop_sub(self, key: Key) -> None:
        self._written.pop(("Subscription", key), None)
        self._sub_seen.pop(key, None)
        self.claims.pop(key, None)
        old = self.subs.pop(key, None)
        if old is not None:
            self._subs_by_pool[pool_ref_of(old)].discard(key)

    def sub_age(self, key: Key) -> float:
        """Seconds since this process first saw the subscription (infinite: never)."""
        seen = self._sub_seen.get(key)
        return float("inf") if seen is None else time.monotonic() - seen

    def subs_of_pool(self, pool: Key) -> list[Obj]:
        return [self.subs[k] for k in self._subs_by_pool.get(pool, ()) if k in self.subs]

    def sub_keys_of_pool(self, pool: Key) -> list[Key]:
        return list(self._subs_by_pool.get(pool, ()))

    # -- the operator's own writes ---------------------------------------------------------------
    def _watched(self, kind: str) -> dict[Key, Obj]:
        return {"Pool": self.pools, "Subscription": self.subs, "Secret": self.key_secrets,
                "Deployment": self.deployments}.get(kind, {})

    def wrote(self, body: Obj | None) -> None:
        """Remember an object as a write (or a fresh read) of the operator returned it."""
        if not body or resource_version(body) is None:
            return
        kind = str(body.get("kind", ""))
        slot = (kind, key_of(body))
        now = time.monotonic()
        held = self._written.get(slot)
        if held is None or _newer(body, held[1]):
            self._written[slot] = (now, slim(body))
        if len(self._written) > 128 and len(self._written) % 64 == 0:
            # Copies the watch has caught up with (or that are old) are done with.
            for gone in [k for k, (at, b) in self._written.items() if now - at > WRITTEN_TTL
                         or not _newer(b, self._watched(k[0]).get(k[1]) or {})]:
                del self._written[gone]

    def echo(self, kind: str, key: Key, body: Obj) -> bool:
        """Whether ``body`` (from a watch) is exactly the operator's own last write."""
        held = self._written.get((kind, key))
        rv = resource_version(body)
        return held is not None and rv is not None and resource_version(held[1]) == rv

    def forget(self, kind: str, key: Key) -> None:
        """The operator deleted the object: its written copy no longer stands."""
        self._written.pop((kind, key), None)

    def latest(self, kind: str, key: Key) -> Obj | None:
        """The newest copy of an object known here: the watch's, or the operator's own write.

        A Pool or Subscription the watch does not hold is unknown (or deleted): None. Secrets
        and Deployments the operator creates itself, so a written copy counts before the watch
        has delivered it."""
        watched = self._watched(kind).get(key)
        held = self._written.get((kind, key))
        if held is None:
            return watched
        at, written = held
        stale = time.monotonic() - at > WRITTEN_TTL
        if stale or (watched is not None and not _newer(written, watched)):
            del self._written[(kind, key)]
            return watched
        if watched is None and kind in ("Pool", "Subscription"):
            return None
        return written

    def latest_sub(self, key: Key) -> Obj | None:
        return self.latest("Subscription", key)

    # -- children the operator applies (no watch of their own) -----------------------------------
    def applied_recently(self, what: Hashable, fingerprint: str, ttl: float) -> bool:
        """Whether ``what`` was applied with this ``fingerprint`` less than ``ttl`` s ago."""
        held = self._applied.get(what)
        return held is not None and held[0] == fingerprint and time.monotonic() - held[1] < ttl

    def applied(self, what: Hashable, fingerprint: str) -> None:
        self._applied[what] = (fingerprint, time.monotonic())


def _newer(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether ``a`` is a later version than ``b`` (unknown versions: no; anything is newer
    than nothing)."""
    ra, rb = resource_version(a), resource_version(b)
    return ra is not None and (rb is None or ra > rb)
