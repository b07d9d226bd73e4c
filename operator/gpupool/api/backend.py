"""The REST API's reads and writes on the Kubernetes API (``kubernetes_asyncio``), one namespace.

Every verb sent here is one the chart grants the API's ServiceAccount (``gpupool.apiRules`` in
``charts/gpupool/templates/_rbac_rules.tpl``): pools get/list; subscriptions
get/list/watch/create/patch/delete; secrets get. Nothing here logs an object's body (key Secrets
hold keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from gpupool import GROUP, VERSION
from gpupool.kube import MERGE, Kube

log = logging.getLogger(__name__)
Obj = dict[str, Any]


async def api_client(kubeconfig: str | None = None, context: str | None = None
                     ) -> client.ApiClient:
    """An API client from a kubeconfig, else the in-cluster ServiceAccount."""
    cfg = client.Configuration()
    if kubeconfig:
        await config.load_kube_config(config_file=kubeconfig, context=context,
                                      client_configuration=cfg)
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            await config.load_kube_config(context=context, client_configuration=cfg)
    return client.ApiClient(configuration=cfg)


class Backend:
    """Pools, Subscriptions and Secrets of one namespace."""

    def __init__(self, api: client.ApiClient, namespace: str, kube: Kube) -> None:
        self.api = api
        self.kube = kube
        self.ns = namespace
        self.custom = client.CustomObjectsApi(api)

    async def close(self) -> None:
        await self.api.close()
        await self.kube.close()

    # -- reads ---------------------------------------------------------------------------------
    async def pools(self) -> list[Obj]:
        return await self.kube.list_custom("pools", self.ns)

    async def pool(self, name: str) -> Obj | None:
        return await self.kube.get_custom("pools", self.ns, name)

    async def subscriptions(self) -> list[Obj]:
        return await self.kube.list_custom("subscriptions", self.ns)

    async def subscription(self, name: str) -> Obj | None:
        return await self.kube.get_custom("subscriptions", self.ns, name)

    async def secret(self, name: str) -> Obj | None:
        return await self.kube.get("secrets", self.ns, name)

    # -- writes --------------------------------------------------------------------------------
    async def create_subscription(self, body: Obj) -> Obj:
        created = await self.kube.request(
            "POST", self.kube.custom_path("subscriptions", self.ns), body)
        if created is None:
            raise RuntimeError("the API server returned no Subscription")
        return created

    async def patch_subscription(self, name: str, patch: Obj) -> Obj | None:
        return await self.kube.request(
            "PATCH", self.kube.custom_path("subscriptions", self.ns, name), patch, MERGE)

    async def delete_subscription(self, name: str) -> None:
        await self.kube.request("DELETE", self.kube.custom_path("subscriptions", self.ns, name))

    # -- waiting for the operator ----------------------------------------------------------------
    async def wait_subscription(self, obj: Obj, done: Callable[[Obj], bool],
                                timeout: float) -> Obj:
        """Follow one Subscription (a watch on its name) until ``done(obj)`` or ``timeout``;
        returns the last version seen (also when it was deleted meanwhile)."""
        name = obj["metadata"]["name"]
        deadline = time.monotonic() + timeout
        latest = obj
        rv = latest["metadata"].get("resourceVersion")
        while not done(latest) and (left := deadline - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(left):
                    outcome, seen, rv = await self._watch_once(name, rv, done, int(left) + 1)
            except TimeoutError:
                break
            except ApiException as exc:
                if exc.status != 410:
                    raise
                outcome, seen = "expired", None
            if seen is not None:
                latest = seen
            if outcome == "deleted":
                break
            if outcome == "expired":
                fresh = await self.subscription(name)
                if fresh is None:
                    break
                latest, rv = fresh, fresh["metadata"].get("resourceVersion")
        return latest

    async def _watch_once(self, name: str, rv: str | None, done: Callable[[Obj], bool],
                          seconds: int) -> tuple[str, Obj | None, str | None]:
        """One watch call: ("done" | "ended" | "expired" | "deleted", last object, its rv)."""
        w = watch.Watch()
        kwargs: dict[str, Any] = {"field_selector": f"metadata.name={name}",
                                  "timeout_seconds": seconds}
        if rv:
            kwargs["resource_version"] = rv
        last: Obj | None = None
        try:
            async with w.stream(self.custom.list_namespaced_custom_object, GROUP, VERSION,
                                self.ns, "subscriptions", **kwargs) as events:
                async for event in events:
                    obj = event.get("raw_object") or {}
                    if event.get("type") == "ERROR":
                        if int(obj.get("code") or 0) == 410:
                            return "expired", last, rv
                        continue
                    if event.get("type") == "DELETED":
                        return "deleted", obj or last, rv
                    if event.get("type") == "BOOKMARK":
                        continue
                    last = obj
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    if done(obj):
                        return "done", obj, rv
        finally:
            with contextlib.suppress(Exception):
                w.stop()
        return "ended", last, rv
