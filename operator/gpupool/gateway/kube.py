"""Key Secrets from the Kubernetes API: list, then watch, in the given namespaces (or all).

One list+watch loop per namespace (or one cluster-wide) on the Secrets labelled
``gpupool.dev/kind in (api-key, upstream-key)``. Every change (a new subscription, a rotated key,
a phase flipped by the operator, a deleted Secret) is applied to the store as it arrives; a watch
that expires is resumed from the last resource version, and one that is too old (410 Gone) is
replaced by a fresh list. The store is marked synced once every namespace has been listed.
Needs RBAC ``list``/``watch`` on ``secrets`` in those namespaces.

Nothing here logs a Secret's data: only namespaces, names and key ids.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Any

from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from gpupool import names
from gpupool.gateway.keys import InvalidSecret, KeyStore, SecretRecord, secret_record

log = logging.getLogger(__name__)

LABEL_SELECTOR = (f"{names.LABEL_KIND} in ({names.KIND_API_KEY},{names.KIND_UPSTREAM_KEY})")


def _record(obj: dict[str, Any]) -> SecretRecord | None:
    meta = obj.get("metadata") or {}
    ns, name = meta.get("namespace", ""), meta.get("name", "")
    try:
        return secret_record(ns, name, meta.get("labels"), obj.get("data"))
    except InvalidSecret as exc:
        log.warning("ignoring Secret %s/%s: %s", ns, name, exc)
        return None


class KubernetesKeySource:
    """Watches key Secrets through the API server (in-cluster config unless a kubeconfig)."""

    def __init__(self, namespaces: Sequence[str] = (), *, kubeconfig: str | None = None,
                 context: str | None = None, watch_timeout: int = 300) -> None:
        self.namespaces = list(dict.fromkeys(namespaces))
        self.kubeconfig = kubeconfig
        self.context = context
        self.watch_timeout = watch_timeout

    async def _api_client(self) -> client.ApiClient:
        cfg = client.Configuration()
        if self.kubeconfig:
            await config.load_kube_config(config_file=self.kubeconfig, context=self.context,
                                          client_configuration=cfg)
        else:
            config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(configuration=cfg)

    async def run(self, store: KeyStore) -> None:
        api_client = await self._api_client()
        try:
            api = client.CoreV1Api(api_client)
            scopes: list[str | None] = list(self.namespaces) or [None]
            listed = [asyncio.Event() for _ in scopes]
            tasks = [asyncio.create_task(self._loop(api, store, ns, ev))
                     for ns, ev in zip(scopes, listed, strict=True)]
            try:
                await asyncio.gather(*(ev.wait() for ev in listed))
                store.mark_synced()
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await api_client.close()

    async def _list(self, api: client.CoreV1Api, ns: str | None) -> Any:
        if ns is None:
            return await api.list_secret_for_all_namespaces(label_selector=LABEL_SELECTOR,
                                                            _preload_content=False)
        return await api.list_namespaced_secret(ns, label_selector=LABEL_SELECTOR,
                                                _preload_content=False)

    async def _loop(self, api: client.CoreV1Api, store: KeyStore, ns: str | None,
                    listed: asyncio.Event) -> None:
        where = ns or "all namespaces"
        backoff = 1.0
        while True:
            try:
                resp = await self._list(api, ns)
                body = await resp.json()
                records = [r for r in map(_record, body.get("items") or []) if r is not None]
                store.replace(ns, records)
                listed.set()
                rv = (body.get("metadata") or {}).get("resourceVersion")
                log.info("listed %d key Secret(s) in %s", len(records), where)
                backoff = 1.0
                while True:  # watch from rv until it is too old
                    rv = await self._watch(api, store, ns, rv)
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                if exc.status == 410:
                    log.info("watch of key Secrets in %s expired; listing again", where)
                    continue
                log.warning("key Secrets in %s: API error %s; retrying in %.0f s", where,
                            exc.status, backoff)
            except Exception as exc:
                log.warning("key Secrets in %s: %s; retrying in %.0f s", where,
                            type(exc).__name__, backoff)
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 30.0)

    async def _watch(self, api: client.CoreV1Api, store: KeyStore, ns: str | None,
                     rv: str | None) -> str | None:
        """One watch call (ends after ``watch_timeout``); returns the last resource version."""
        w = watch.Watch()
        func = api.list_secret_for_all_namespaces if ns is None else api.list_namespaced_secret
        args = () if ns is None else (ns,)
        kwargs: dict[str, Any] = {"label_selector": LABEL_SELECTOR,
                                  "timeout_seconds": self.watch_timeout,
                                  "allow_watch_bookmarks": True}
        if rv:
            kwargs["resource_version"] = rv
        async with w.stream(func, *args, **kwargs) as events:
            async for event in events:
                kind = event["type"]
                obj = event["raw_object"]
                meta = obj.get("metadata") or {}
                rv = meta.get("resourceVersion") or rv
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    store.delete(meta.get("namespace", ""), meta.get("name", ""))
                    continue
                record = _record(obj)
                if record is None:
                    store.delete(meta.get("namespace", ""), meta.get("name", ""))
                else:
                    store.put(record)
        return rv
