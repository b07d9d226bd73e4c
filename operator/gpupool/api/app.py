"""The REST API application (Starlette): the seeds' endpoints over Pools and Subscriptions.

Choices where the seeds leave room (also in the README, "The REST API"):

- **One namespace.** An API process sells the Pools of one namespace and creates Subscriptions
  there; its management-key Secrets live there too. Pool ids are the Pool's uid, slugs its name.
- **Synchronous subscribe.** ``POST .../subscribe`` creates a Subscription and follows it (a
  watch) until the operator decides, at most ``decision_timeout`` seconds. Accepted (pledged,
  active, pending_key): 201. Refused: the Subscription is deleted and the answer is the seeds'
  error -- 400 "No payment method found — add a card first", **409** "Pool is full: ..." (a
  conflict with the pool's state, not a bad request), 402 for a declined card, 409 for a paused
  pool, 400 for a block the pool does not sell. Capacity, pause and blocks are also checked
  before anything is created. Undecided in time: 202 with status ``pending`` (the only place
  that status appears); the Subscription stays and shows in my-subscriptions.
- **Keys.** The operator mints every key itself when a subscription becomes active. On pools
  that open active (``activationThreshold: 0``, the seeds' Unlimited flow) the API does not show
  it until the customer calls ``POST /api/keys/subscription``, which records the request in the
  annotation ``gpupool.dev/key-requested-at``; subscriptions made there carry
  ``gpupool.dev/key-delivery: on-request``. Elsewhere (funded pools: the GPU Boosts flow, where an
  active subscribe answers with its key; manual-provisioning pools, whose approval is the
  delivery; Subscriptions made with kubectl) the key is shown once issued.
- **isActive** is true while the subscription is active (the key is not suspended); ``gate``
  says whether it opens right now (its blocks).
- **Cancel** (``DELETE .../pledge``) sets ``spec.cancelAtPeriodEnd`` on the newest subscription
  not already ending: a pledge (or one not yet decided) is canceled at once, an active one at the
  end of the paid period.
- A customer only ever sees their own subscriptions and keys; another customer's subscription
  id is answered 404, as if it did not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gpupool import names
from gpupool.api import mgmt_keys, views
from gpupool.api.backend import Backend
from gpupool.api.openapi import document
from gpupool.kube import ApiError as KubeError
from gpupool.kube import Conflict

log = logging.getLogger(__name__)
Obj = dict[str, Any]
Handler = Callable[[Request], Awaitable[Response]]

NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
MAX_BODY = 64 * 1024
KEY_WAIT = 10.0
CANCEL_WAIT = 10.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def ok(data: object, status: int = 200) -> JSONResponse:
    return JSONResponse({"success": True, "data": data}, status_code=status)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"success": False, "error": message}, status_code=status,
                        headers=headers)


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Api:
    """The application's state: the backend and the settings."""

    def __init__(self, backend: Backend, *, decision_timeout: float = 20.0) -> None:
        self.backend = backend
        self.decision_timeout = decision_timeout

    # -- plumbing ------------------------------------------------------------------------------
    def app(self) -> Starlette:
        def route(path: str, fn: Handler, method: str, auth: bool = True) -> Route:
            return Route(path, self._wrap(fn, auth), methods=[method])

        routes = [
            route("/api/pools", self.list_pools, "GET"),
            route("/api/pools/{id}", self.get_pool, "GET"),
            route("/api/pools/{id}/subscribe", self.subscribe, "POST"),
            route("/api/pools/{id}/my-subscriptions", self.my_subscriptions, "GET"),
            route("/api/pools/{id}/my-pledge", self.my_pledge, "GET"),
            route("/api/pools/{id}/my-keys", self.my_keys, "GET"),
            route("/api/pools/{id}/my-key", self.my_key, "GET"),
            route("/api/pools/{id}/pledge", self.cancel_pledge, "DELETE"),
            route("/api/keys/subscription", self.create_key, "POST"),
            route("/openapi.json", self.openapi, "GET", auth=False),
            route("/healthz", self.healthz, "GET", auth=False),
            route("/readyz", self.readyz, "GET", auth=False),
        ]

        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            message = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code,
                                                                         str(exc.detail))
            return error(exc.status_code, message, dict(exc.headers or {}))

        async def server_error(request: Request, exc: Exception) -> Response:
            log.error("%s %s: unexpected %s", request.method, request.url.path,
                      type(exc).__name__)
            return error(500, "Internal server error")

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error,
                                                            Exception: server_error})

    def _wrap(self, fn: Handler, auth: bool) -> Handler:
        async def endpoint(request: Request) -> Response:
            started = time.monotonic()
            who = "-"
            try:
                if auth:
                    customer = await self.authenticate(request)
                    request.state.customer = customer
                    who = customer.key_id
                response = await fn(request)
            except ApiError as exc:
                response = error(exc.status, exc.message, exc.headers)
            except views.BadRequest as exc:
                response = error(400, str(exc))
            except (ApiException, KubeError) as exc:
                # Never the exception's text: an API server answer may quote an object.
                log.error("%s %s: Kubernetes API error %s", request.method, request.url.path,
                          exc.status)
                response = error(503 if exc.status in (None, 0, 429, 500, 502, 503, 504)
                                 else 500, "The cluster's API is not available; try again")
            except (OSError, TimeoutError) as exc:
                log.error("%s %s: Kubernetes API unreachable (%s)", request.method,
                          request.url.path, type(exc).__name__)
                response = error(503, "The cluster's API is not available; try again")
            if auth:
                log.info("%s %s %d %.0fms key=%s", request.method, request.url.path,
                         response.status_code, (time.monotonic() - started) * 1000, who)
            return response
        return endpoint

    async def authenticate(self, request: Request) -> mgmt_keys.Customer:
        challenge = {"WWW-Authenticate": "Bearer"}
        header = request.headers.get("authorization")
        try:
            key = mgmt_keys.bearer(header)
        except mgmt_keys.Malformed:
            if header is None:
                raise ApiError(401, "Missing management key: send Authorization: Bearer mk_...",
                               challenge) from None
            raise ApiError(401, "Malformed management key: expected Authorization: Bearer "
                                "mk_...", challenge) from None
        customer = mgmt_keys.customer_of(await self.backend.secret(mgmt_keys.secret_name(key)),
                                         key)
        if customer is None:
            raise ApiError(401, "Invalid management key", challenge)
        return customer

    async def _body(self, request: Request, required: bool) -> object:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ApiError(413, "Request body too large")
        if not raw.strip():
            if required:
                raise ApiError(400, "A JSON request body is required")
            return None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "The request body is not valid JSON") from None
        if body is None:
            # A literal JSON null is a body, and not the object every endpoint takes.
            raise ApiError(400, "The request body must be a JSON object")
        return body

    async def _pool(self, ref: str) -> Obj:
        pool: Obj | None = None
        if views.is_uuid(ref):
            pool = views.find_pool(await self.backend.pools(), ref)
        elif NAME.match(ref):
            found = await self.backend.pool(ref)
            pool = found if found is not None and views.pool_visible(found) else None
        if pool is None:
            raise ApiError(404, "Pool not found")
        return pool

    async def _mine(self, request: Request, pool: Obj | None = None) -> list[Obj]:
        customer: mgmt_keys.Customer = request.state.customer
        subs = [s for s in await self.backend.subscriptions()
                if views.owned_by(s, customer.id, self.backend.ns)]
        if pool is not None:
            subs = [s for s in subs if views.sub_pool(s) == pool["metadata"]["name"]]
        return views.newest_first(subs)

    async def _key(self, sub: Obj) -> Obj | None:
        """The key the customer may see for ``sub`` (None: not issued, not asked for, revoked)."""
        if views.sub_phase(sub) not in ("active", "past_due") or not views.key_revealed(sub):
            return None
        name = (sub.get("status") or {}).get("keySecretName") \
            or names.key_secret_name(sub["metadata"]["name"])
        return views.key_view(await self.backend.secret(name), sub)

    async def _view(self, sub: Obj, pool_uid: str | None) -> Obj:
        return views.subscription_view(sub, pool_uid, await self._key(sub))

    # -- endpoints -----------------------------------------------------------------------------
    async def openapi(self, request: Request) -> Response:
        return JSONResponse(document())

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def readyz(self, request: Request) -> Response:
        try:
            await asyncio.wait_for(self.backend.pools(), timeout=5)
        except Exception as exc:
            log.warning("not ready: %s", type(exc).__name__)
            return JSONResponse({"ok": False}, status_code=503)
        return JSONResponse({"ok": True})

    async def list_pools(self, request: Request) -> Response:
        pools = [p for p in await self.backend.pools() if views.pool_visible(p)]
        pools.sort(key=lambda p: p["metadata"]["name"])
        return ok([views.pool_summary(p) for p in pools])

    async def get_pool(self, request: Request) -> Response:
        return ok(views.pool_detail(await self._pool(request.path_params["id"])))

    async def subscribe(self, request: Request) -> Response:
        customer: mgmt_keys.Customer = request.state.customer
        pool = await self._pool(request.path_params["id"])
        wanted = views.parse_subscribe(await self._body(request, required=True))
        refusal = views.pre_check(pool, wanted)
        if refusal is not None:
            raise ApiError(refusal.status, refusal.message)
        pool_name = pool["metadata"]["name"]
        created: Obj | None = None
        for _ in range(3):
            body = views.subscription_body(
                name=f"{pool_name[:50].rstrip('-.')}-{secrets.token_hex(4)}", pool=pool_name,
                customer_id=customer.id, email=customer.email, request=wanted,
                on_request=views.key_on_request(pool), mgmt_key_id=customer.key_id,
                requested_at=datetime.now(UTC))
            try:
                created = await self.backend.create_subscription(body)
                break
            except Conflict:
                continue
        if created is None:
            raise ApiError(409, "Could not name the subscription; try again")
        name = created["metadata"]["name"]
        log.info("subscription %s/%s created for key %s: %s x%d (%s)", self.backend.ns, name,
                 customer.key_id, ",".join(b.value for b in wanted.blocks), wanted.quantity,
                 wanted.billing_cycle)

        def decided(obj: Obj) -> bool:
            return views.decision(obj, wanted.quantity) is not None
        final = await self.backend.wait_subscription(created, decided, self.decision_timeout)
        verdict = views.decision(final, wanted.quantity)
        if verdict is None:
            log.warning("subscription %s/%s: no decision in %.0f s; answered pending",
                        self.backend.ns, name, self.decision_timeout)
            return ok(await self._view(final, pool["metadata"]["uid"]), 202)
        if not verdict.accepted:
            log.info("subscription %s/%s refused (%d): deleting it", self.backend.ns, name,
                     verdict.status)
            with contextlib.suppress(ApiException, KubeError):
                await self.backend.delete_subscription(name)
            raise ApiError(verdict.status, verdict.message)
        return ok(await self._view(final, pool["metadata"]["uid"]), 201)

    async def my_subscriptions(self, request: Request) -> Response:
        pool = await self._pool(request.path_params["id"])
        subs = await self._mine(request, pool)
        return ok([await self._view(s, pool["metadata"]["uid"]) for s in subs])

    async def my_pledge(self, request: Request) -> Response:
        pool = await self._pool(request.path_params["id"])
        sub = views.current(await self._mine(request, pool))
        if sub is None:
            raise ApiError(404, "You have no subscription on this pool")
        return ok(await self._view(sub, pool["metadata"]["uid"]))

    async def my_keys(self, request: Request) -> Response:
        pool = await self._pool(request.path_params["id"])
        found = [await self._key(s) for s in await self._mine(request, pool)]
        return ok([k for k in found if k is not None])

    async def my_key(self, request: Request) -> Response:
        pool = await self._pool(request.path_params["id"])
        sub = views.current(await self._mine(request, pool))
        if sub is None:
            raise ApiError(404, "You have no subscription on this pool")
        key = await self._key(sub)
        if key is None:
            raise ApiError(404, self._no_key_reason(sub))
        return ok(key)

    @staticmethod
    def _no_key_reason(sub: Obj) -> str:
        phase = views.sub_phase(sub)
        if phase == "pending_key":
            return ("Your key is being set up (manual provisioning); you will be told when it "
                    "is ready")
        if phase in ("pending", "pledged"):
            return "No key yet: it is issued when the pool activates"
        if phase == "canceled":
            return "The subscription is canceled; its key was revoked"
        if phase == "active" and not views.key_revealed(sub):
            return "No key yet: create it with POST /api/keys/subscription"
        return "No key for this subscription yet; try again in a moment"

    async def cancel_pledge(self, request: Request) -> Response:
        pool = await self._pool(request.path_params["id"])
        sub = views.cancelable(await self._mine(request, pool))
        if sub is None:
            raise ApiError(404, "You have no subscription to cancel on this pool")
        name = sub["metadata"]["name"]
        patched = await self.backend.patch_subscription(name, {"spec": {"cancelAtPeriodEnd": True}})
        if patched is None:
            raise ApiError(404, "You have no subscription to cancel on this pool")
        generation = patched["metadata"].get("generation")
        log.info("subscription %s/%s: cancel requested by key %s", self.backend.ns, name,
                 request.state.customer.key_id)

        def seen(obj: Obj) -> bool:
            return (obj.get("status") or {}).get("observedGeneration") == generation
        final = await self.backend.wait_subscription(patched, seen, CANCEL_WAIT)
        view = views.subscription_view(final, pool["metadata"]["uid"], None)
        return ok({"canceled": True, "id": view["id"], "status": view["status"],
                   "cancelAtPeriodEnd": view["status"] != "canceled",
                   "currentPeriodEnd": view["currentPeriodEnd"]})

    async def create_key(self, request: Request) -> Response:
        sub_id = views.parse_key_request(await self._body(request, required=False))
        subs = await self._mine(request)
        if sub_id is not None:
            match = [s for s in subs if str(s["metadata"]["uid"]).lower() == sub_id.lower()]
            if not match:
                raise ApiError(404, "Subscription not found")
            sub = match[0]
        else:
            active = [s for s in subs if views.sub_phase(s) == "active"]
            waiting = [s for s in active if not views.key_revealed(s)]
            if not (waiting or active):
                if any(views.sub_phase(s) == "pending_key" for s in subs):
                    raise ApiError(409, self._no_key_reason(next(
                        s for s in subs if views.sub_phase(s) == "pending_key")))
                raise ApiError(404, "You have no active subscription: subscribe first")
            sub = (waiting or active)[0]
        phase = views.sub_phase(sub)
        if phase == "past_due":
            raise ApiError(402, "Payment failed: the subscription's key is suspended until it "
                                "is paid")
        if phase != "active":
            raise ApiError(409, self._no_key_reason(sub))
        name = sub["metadata"]["name"]
        if not (sub.get("status") or {}).get("keySecretName"):
            sub = await self.backend.wait_subscription(
                sub, lambda o: bool((o.get("status") or {}).get("keySecretName")), KEY_WAIT)
        first = not (sub["metadata"].get("annotations") or {}).get(
            views.ANNOTATION_KEY_REQUESTED)
        if first:
            patched = await self.backend.patch_subscription(name, {"metadata": {"annotations": {
                views.ANNOTATION_KEY_REQUESTED: _now_iso()}}})
            sub = patched or sub
            log.info("subscription %s/%s: key requested by key %s", self.backend.ns, name,
                     request.state.customer.key_id)
        key = await self._key(sub)
        if key is None:
            raise ApiError(409, "The key is being issued; try again in a moment")
        pool = await self.backend.pool(views.sub_pool(sub))
        return ok({**key, "poolId": (pool or {}).get("metadata", {}).get("uid", "")},
                  201 if first else 200)
