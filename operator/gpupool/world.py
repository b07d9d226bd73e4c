"""The operator's in-memory view of the cluster, fed by kopf's watch streams.

Reconciles read it to find related objects (a pool's subscriptions, a subscription's key)
without list calls; the ledger and billing steps re-read their own object from the API server.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

Key = tuple[str, str]
Obj = dict[str, Any]


def key_of(body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata", {})
    return (meta.get("namespace", ""), meta.get("name", ""))


def pool_ref_of(sub: Mapping[str, Any]) -> Key:
    """The pool a subscription belongs to: the one it holds seats in (``status.pool``, pinned
    when seats were first held), else the one its spec names."""
    ns = sub.get("metadata", {}).get("namespace", "")
    pinned = (sub.get("status") or {}).get("pool")
    if pinned:
        return (ns, pinned)
    ref = (sub.get("spec") or {}).get("poolRef") or {}
    return (ref.get("namespace") or ns, ref.get("name", ""))


class World:
    def __init__(self) -> None:
        self.pools: dict[Key, Obj] = {}
        self.subs: dict[Key, Obj] = {}
        self.key_secrets: dict[Key, Obj] = {}
        self.deployments: dict[Key, Obj] = {}
        self._subs_by_pool: dict[Key, set[Key]] = defaultdict(set)

    def put_sub(self, body: Obj) -> None:
        key = key_of(body)
        old = self.subs.get(key)
        if old is not None:
            self._subs_by_pool[pool_ref_of(old)].discard(key)
        self.subs[key] = body
        self._subs_by_pool[pool_ref_of(body)].add(key)

    def drop_sub(self, key: Key) -> None:
        old = self.subs.pop(key, None)
        if old is not None:
            self._subs_by_pool[pool_ref_of(old)].discard(key)

    def subs_of_pool(self, pool: Key) -> list[Obj]:
        return [self.subs[k] for k in self._subs_by_pool.get(pool, ()) if k in self.subs]

    def sub_keys_of_pool(self, pool: Key) -> list[Key]:
        return list(self._subs_by_pool.get(pool, ()))
