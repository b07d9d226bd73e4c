"""Storage: the only module that talks to the Kubernetes API, as plain JSON over aiohttp.

Reads that must see the latest write (the ledger) go to the API server; everything else is
driven from kopf's watch streams. Error messages name the request and the status, never the
answer's body (an answer may quote an object, and a Secret's object holds a key).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp

from gpupool import GROUP, VERSION
from gpupool.kubeconfig import Connection, load
from gpupool.metrics import API_REQUESTS
from gpupool.ownership import NotOurs, Owner, is_child

log = logging.getLogger(__name__)

MERGE = "application/merge-patch+json"
Obj = dict[str, Any]
TIMEOUT = aiohttp.ClientTimeout(total=30, connect=10)


class ApiError(Exception):
    """The API server answered with an error (``status``), or could not be reached (0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Conflict(ApiError):
    """The object changed since it was read, or exists already (HTTP 409)."""

    def __init__(self, message: str) -> None:
        super().__init__(409, message)


class Kube:
    def __init__(self, conn: Connection, connections: int = 64) -> None:
        self.conn = conn
        self.requests = 0
        self._limit = connections
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    async def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> Kube:
        return cls(load(kubeconfig, context))

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # trust_env=False: no proxy or .netrc look-up on every request (a third of the
            # operator's CPU in a burst, benchmarks/control_plane.py); the API server is direct.
            self._session = aiohttp.ClientSession(
                trust_env=False, timeout=TIMEOUT,
                connector=aiohttp.TCPConnector(ssl=self.conn.ssl_context, limit=self._limit),
                json_serialize=json.dumps)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path: str, body: Any = None,
                      content_type: str | None = None,
                      query: list[tuple[str, str]] | None = None) -> Obj | None:
        self.requests += 1
        API_REQUESTS.labels(method, _resource_of(path)).inc()
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            headers = {"Accept": "application/json"}
            if data is not None:
                headers["Content-Type"] = content_type or "application/json"
            auth = self.conn.authorization()
            if auth:
                headers["Authorization"] = auth
            try:
                async with self._client().request(method, self.conn.server + path,
                                                  params=query, data=data,
                                                  headers=headers) as resp:
                    status, raw = resp.status, await resp.read()
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise ApiError(0, f"{method} {path}: API server unreachable "
                                  f"({type(exc).__name__})") from None
            if status == 401 and attempt == 1:
                self.conn.expire()
                continue
            break
        if status == 404:
            return None
        if status == 409:
            raise Conflict(f"{method} {path}: conflict")
        if status >= 400:
            raise ApiError(status, f"{method} {path}: HTTP {status} {_reason(raw)}".rstrip())
        if not raw:
            return None
        result = json.loads(raw)
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
                     current: Obj | None = None, read: bool = True,
                     owner: Owner | None = None) -> Obj | None:
        """Create ``body``, or merge-patch the parts named in ``compare`` that differ.

        ``owner``: an existing object is only changed if it is a child of ``owner``
        (:func:`gpupool.ownership.is_child`); otherwise :class:`NotOurs` is raised.

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
        if owner is not None and not is_child(current, owner):
            raise NotOurs(body.get("kind") or plural, meta["namespace"], meta["name"], owner)
        patch: Obj = {}
        for dotted in compare:
            want, have = _dig(body, dotted), _dig(current, dotted)
            if want is not None and not _contains(have, want):
                _put(patch, dotted, want)
        if not patch:
            return current
        result = await self.patch(plural, meta["namespace"], meta["name"], patch, group)
        if result is None and not read:
            return await self.ensure(plural, body, group, compare, owner=owner)
        return result


def _reason(raw: bytes) -> str:
    """The ``reason`` of a Status answer (``Invalid``, ``Forbidden``...), never its message."""
    try:
        answer = json.loads(raw)
    except ValueError:
        return ""
    return str(answer.get("reason") or "") if isinstance(answer, dict) else ""


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
