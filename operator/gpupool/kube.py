"""Storage: the only module that talks to the Kubernetes API (through kubernetes_asyncio).

Reads that must see the latest write (the ledger) go to the API server; everything else is
driven from kopf's watch streams.
"""

from __future__ import annotations

import logging
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from gpupool import GROUP, VERSION
from gpupool.metrics import API_REQUESTS

log = logging.getLogger(__name__)

MERGE = "application/merge-patch+json"
Obj = dict[str, Any]


class Conflict(Exception):
    """The object changed since it was read (HTTP 409)."""


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.requests = 0

    @classmethod
    async def connect(cls) -> Kube:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            await config.load_kube_config()
        return cls(client.ApiClient())

    async def close(self) -> None:
        await self.api.close()

    async def request(self, method: str, path: str, body: Any = None,
                      content_type: str | None = None,
                      query: list[tuple[str, str]] | None = None) -> Obj | None:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        self.requests += 1
        API_REQUESTS.labels(method, _resource_of(path)).inc()
        try:
            result = await self.api.call_api(
                path, method, query_params=query or [], header_params=headers, body=body,
                response_types_map={200: "object", 201: "object", 202: "object"},
                auth_settings=["BearerToken"], _return_http_data_only=True,
                _request_timeout=30)
        except ApiException as exc:
            if exc.status == 404:
                return None
            if exc.status == 409:
                raise Conflict(f"{method} {path}: conflict") from None
            raise
        return result if isinstance(result, dict) else None

    # -- paths -------------------------------------------------------------------------------
    @staticmethod
    def custom_path(plural: str, namespace: str, name: str = "", sub: str = "") -> str:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}"
        if name:
            path += f"/{name}"
        if sub:
            path += f"/{sub}"
        return path

    @staticmethod
    def core_path(plural: str, namespace: str, name: str = "", group: str = "") -> str:
        base = f"/apis/{group}" if group else "/api/v1"
        path = f"{base}/namespaces/{namespace}/{plural}"
        return f"{path}/{name}" if name else path

    # -- custom resources --------------------------------------------------------------------
    async def get_custom(self, plural: str, namespace: str, name: str) -> Obj | None:
        return await self.request("GET", self.custom_path(plural, namespace, name))

    async def patch_status(self, plural: str, namespace: str, name: str, status: Obj,
                           resource_version: str | None = None) -> Obj | None:
        """Merge-patch ``status``; with ``resource_version`` the write is conditional (409)."""
        body: Obj = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self.request("PATCH", self.custom_path(plural, namespace, name, "status"),
                                  body, MERGE)

    async def patch_custom(self, plural: str, namespace: str, name: str, body: Obj) -> Obj | None:
        return await self.request("PATCH", self.custom_path(plural, namespace, name), body, MERGE)

    async def list_custom(self, plural: str, namespace: str,
                          label_selector: str | None = None) -> list[Obj]:
        query = [("labelSelector", label_selector)] if label_selector else None
        result = await self.request("GET", self.custom_path(plural, namespace), query=query)
        return list((result or {}).get("items", []))

    # -- core objects ------------------------------------------------------------------------
    async def get(self, plural: str, namespace: str, name: str, group: str = "") -> Obj | None:
        return await self.request("GET", self.core_path(plural, namespace, name, group))

    async def list(self, plural: str, namespace: str, label_selector: str | None = None,
                   group: str = "") -> list[Obj]:
        query = [("labelSelector", label_selector)] if label_selector else None
        result = await self.request("GET", self.core_path(plural, namespace, group=group),
                                    query=query)
        return list((result or {}).get("items", []))

    async def create(self, plural: str, namespace: str, body: Obj, group: str = "") -> Obj | None:
        return await self.request("POST", self.core_path(plural, namespace, group=group), body)

    async def patch(self, plural: str, namespace: str, name: str, body: Obj,
                    group: str = "") -> Obj | None:
        return await self.request("PATCH", self.core_path(plural, namespace, name, group), body,
                                  MERGE)

    async def delete(self, plural: str, namespace: str, name: str, group: str = "") -> None:
        await self.request("DELETE", self.core_path(plural, namespace, name, group))

    async def ensure(self, plural: str, body: Obj, group: str = "",
                     compare: tuple[str, ...] = ("spec", "data", "metadata.labels"),
                     current: Obj | None = None, read: bool = True) -> Obj | None:
        """Create ``body``, or merge-patch the parts named in ``compare`` that differ.

        ``read=False``: no GET; ``current`` is the object as the caller knows it (a watch, an
        earlier write or read; None: not there). If that is out of date, the create conflicts
        or the patch finds nothing, and the object is read after all."""
        meta = body["metadata"]
        if read:
            current = await self.get(plural, meta["namespace"], meta["name"], group)
        if current is None:
            try:
                return await self.create(plural, meta["namespace"], body, group)
            except Conflict:
                current = await self.get(plural, meta["namespace"], meta["name"], group)
                if current is None:
                    raise
        patch: Obj = {}
        for dotted in compare:
            want, have = _dig(body, dotted), _dig(current, dotted)
            if want is not None and not _contains(have, want):
                _put(patch, dotted, want)
        if not patch:
            return current
        result = await self.patch(plural, meta["namespace"], meta["name"], patch, group)
        if result is None and not read:
            return await self.ensure(plural, body, group, compare)
        return result


def _resource_of(path: str) -> str:
    """``secrets``, ``pools/status``, ...: the plural (and subresource) a request path names."""
    parts = path.strip("/").split("/")
    if "namespaces" in parts:
        rest = parts[parts.index("namespaces") + 2:]
        return rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "") if rest else "namespaces"
    return parts[-1] if parts else ""


def _dig(obj: Obj, dotted: str) -> Any:
    cur: Any = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _put(obj: Obj, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        obj = obj.setdefault(part, {})
    obj[parts[-1]] = value


def _contains(have: Any, want: Any) -> bool:
    """Whether ``have`` already holds everything in ``want`` (server defaults may add more)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(_contains(have.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        return (isinstance(have, list) and len(have) == len(want)
                and all(_contains(h, w) for h, w in zip(have, want, strict=True)))
    return bool(have == want)
