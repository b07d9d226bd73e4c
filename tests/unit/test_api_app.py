"""``gpupool.api.app`` on an in-memory backend (no cluster): authentication, the envelope on every
answer, the synchronous subscribe (accepted, refused and deleted, undecided), key delivery."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from gpupool import keys, names
from gpupool.api import mgmt_keys, views
from gpupool.api.app import Api
from gpupool.subscription_service import NO_PAYMENT_METHOD

Obj = dict[str, Any]
Decide = Callable[[Obj], None]


class FakeBackend:
    """The backend's interface over dicts; ``decide`` plays the operator on each write."""

    def __init__(self, decide: Decide) -> None:
        self.ns = "shop"
        self.decide = decide
        self.pool_objs: dict[str, Obj] = {}
        self.subs: dict[str, Obj] = {}
        self.secrets: dict[str, Obj] = {}
        self.deleted: list[str] = []
        self.fail: ApiException | None = None

    async def pools(self) -> list[Obj]:
        if self.fail:
            raise self.fail
        return copy.deepcopy(list(self.pool_objs.values()))

    async def pool(self, name: str) -> Obj | None:
        return copy.deepcopy(self.pool_objs.get(name))

    async def subscriptions(self) -> list[Obj]:
        return copy.deepcopy(list(self.subs.values()))

    async def subscription(self, name: str) -> Obj | None:
        return copy.deepcopy(self.subs.get(name))

    async def secret(self, name: str) -> Obj | None:
        return copy.deepcopy(self.secrets.get(name))

    async def create_subscription(self, body: Obj) -> Obj:
        obj = copy.deepcopy(body)
        obj["metadata"].update(uid=str(uuid.uuid4()), generation=1,
                               creationTimestamp="2026-01-01T00:00:00Z", resourceVersion="1")
        self.subs[obj["metadata"]["name"]] = obj
        self.decide(obj)
        return copy.deepcopy(obj)

    async def patch_subscription(self, name: str, patch: Obj) -> Obj | None:
        obj = self.subs[name]
        if "spec" in patch:
            obj["spec"].update(patch["spec"])
            obj["metadata"]["generation"] += 1
        for k, v in (patch.get("metadata") or {}).get("annotations", {}).items():
            obj["metadata"].setdefault("annotations", {})[k] = v
        self.decide(obj)
        return copy.deepcopy(obj)

    async def delete_subscription(self, name: str) -> None:
        self.subs.pop(name, None)
        self.deleted.append(name)

    async def wait_subscription(self, obj: Obj, done: Callable[[Obj], bool],
                                timeout: float) -> Obj:
        return copy.deepcopy(self.subs.get(obj["metadata"]["name"], obj))


def pool(name: str = "plan", **spec: Any) -> Obj:
    return {"metadata": {"name": name, "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, name))},
            "spec": {"model": {"id": "m"}, "seats": 2, "blocks": {"europe": {"price": "39.00"}},
                     "published": True, **spec},
            "status": {"phase": "active", "totalSlots": 2, "pledgedSlots": 0}}


def make(outcome: str, *pools: Obj) -> tuple[FakeBackend, str]:
    """A backend with ``pools`` (default: one active plan) whose operator answers ``outcome``
    ('active' with a key Secret, 'pledged', 'nopm', 'undecided'), and a management key."""
    holder: dict[str, FakeBackend] = {}
    b = FakeBackend(lambda sub: _decide(outcome, holder["b"], sub))
    holder["b"] = b
    for p in pools or (pool(),):
        b.pool_objs[p["metadata"]["name"]] = p
    key = mgmt_keys.mint()
    b.secrets[mgmt_keys.secret_name(key)] = mgmt_keys.build_secret(key, namespace="shop",
                                                                   customer_id="cus_a")
    return b, key


def _decide(outcome: str, backend: FakeBackend, sub: Obj) -> None:
    if outcome == "undecided":
        return
    st = sub.setdefault("status", {})
    st["observedGeneration"] = sub["metadata"]["generation"]
    if sub["spec"].get("cancelAtPeriodEnd") and st.get("phase") == "pledged":
        st["phase"] = "canceled"
        return
    if outcome == "nopm":
        st["phase"] = "pending"
        st["conditions"] = [{"type": "SeatsHeld", "status": "False",
                             "reason": "NoPaymentMethod", "message": NO_PAYMENT_METHOD}]
        return
    st.update(phase=outcome, monthlyPrice="39.00", amount="39.00", slotCount=8,
              slots=[{"hour": h, "slotIndex": 0, "pricePerDay": "4.88"} for h in range(8, 16)])
    if outcome == "active":
        name = sub["metadata"]["name"]
        st.update(keySecretName=names.key_secret_name(name), gate="open")
        backend.secrets[names.key_secret_name(name)] = {"data": keys.encode({
            "apiKey": keys.mint_key(), "keyId": "key_1", "subscription": name, "rpm": "60",
            "tpm": "100000", "concurrency": "4"})}


async def call(backend: FakeBackend, method: str, path: str, key: str | None = None,
               **kw: Any) -> httpx.Response:
    app = Api(backend, decision_timeout=0.1).app()  # type: ignore[arg-type]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://api") as client:
        return await client.request(method, path, headers=headers, **kw)


async def test_authentication() -> None:
    b, key = make("active")
    r = await call(b, "GET", "/api/pools")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"success": False,
                        "error": "Missing management key: send Authorization: Bearer mk_..."}
    r = await call(b, "GET", "/api/pools", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"].startswith("Malformed")
    r = await call(b, "GET", "/api/pools", mgmt_keys.mint())
    assert r.json() == {"success": False, "error": "Invalid management key"}
    r = await call(b, "GET", "/api/pools", key)
    assert r.status_code == 200 and r.json()["data"][0]["slug"] == "plan"


async def test_every_answer_is_an_envelope() -> None:
    b, key = make("active")
    for method, path, status in (("GET", "/nowhere", 404), ("PUT", "/api/pools", 405),
                                 ("GET", "/api/pools/x%2Fstatus", 404),
                                 ("GET", "/api/pools/NOT_A_NAME", 404)):
        r = await call(b, method, path, key)
        assert r.status_code == status and r.json()["success"] is False, (method, path)
    r = await call(b, "POST", "/api/pools/plan/subscribe", key, content=b"{",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "The request body is not valid JSON"
    b.fail = ApiException(status=503)
    r = await call(b, "GET", "/api/pools", key)
    assert r.status_code == 503 and r.json()["success"] is False
    assert (await call(b, "GET", "/openapi.json")).json()["openapi"] == "3.1.0"


async def test_subscribe_refused_by_the_operator_is_deleted() -> None:
    b, key = make("nopm")
    r = await call(b, "POST", "/api/pools/plan/subscribe", key, json={"blocks": ["europe"]})
    assert r.status_code == 400 and r.json() == {"success": False, "error": NO_PAYMENT_METHOD}
    assert not b.subs and len(b.deleted) == 1


async def test_subscribe_undecided_is_202_pending() -> None:
    b, key = make("undecided")
    r = await call(b, "POST", "/api/pools/plan/subscribe", key, json={"blocks": ["europe"]})
    assert r.status_code == 202 and r.json()["data"]["status"] == "pending"
    assert len(b.subs) == 1 and not b.deleted
    mine = (await call(b, "GET", "/api/pools/plan/my-subscriptions", key)).json()["data"]
    assert [s["status"] for s in mine] == ["pending"]
    r = await call(b, "DELETE", "/api/pools/plan/pledge", key)
    assert r.status_code == 200 and r.json()["data"]["canceled"] is True


async def test_unlimited_key_only_after_it_is_asked_for() -> None:
    b, key = make("active")
    r = await call(b, "POST", "/api/pools/plan/subscribe", key,
                   json={"blocks": ["europe"], "billingCycle": "year"})
    assert r.status_code == 201
    data = r.json()["data"]
    assert data["status"] == "active" and data["key"] is None
    [sub] = b.subs.values()
    assert sub["spec"]["customer"] == {"id": "cus_a"}
    assert sub["metadata"]["annotations"][views.ANNOTATION_KEY_DELIVERY] == "on-request"
    assert (await call(b, "GET", "/api/pools/plan/my-key", key)).status_code == 404
    first = await call(b, "POST", "/api/keys/subscription", key)
    assert first.status_code == 201 and first.json()["data"]["subscriptionId"] == data["id"]
    again = await call(b, "POST", "/api/keys/subscription", key,
                       json={"subscriptionId": data["id"]})
    assert again.status_code == 200 and again.json()["data"] == first.json()["data"]
    my_key = (await call(b, "GET", "/api/pools/plan/my-key", key)).json()["data"]
    assert my_key["id"] == "key_1" and my_key["isActive"] is True


async def test_funded_pool_answers_with_the_key() -> None:
    b, key = make("active", pool(activationThreshold=3))
    r = await call(b, "POST", "/api/pools/plan/subscribe", key, json={"blocks": ["europe"]})
    assert r.status_code == 201 and r.json()["data"]["key"]["id"] == "key_1"


async def test_pledge_cancel() -> None:
    b, key = make("pledged", pool(activationThreshold=3))
    b.pool_objs["plan"]["status"]["phase"] = "funding"
    r = await call(b, "POST", "/api/pools/plan/subscribe", key, json={"blocks": ["europe"]})
    assert r.status_code == 201 and r.json()["data"]["status"] == "pledged"
    r = await call(b, "DELETE", "/api/pools/plan/pledge", key)
    assert r.json()["data"] == {"canceled": True, "id": r.json()["data"]["id"],
                                "status": "canceled", "cancelAtPeriodEnd": False,
                                "currentPeriodEnd": None}
    assert (await call(b, "DELETE", "/api/pools/plan/pledge", key)).status_code == 404


@pytest.mark.parametrize("body", [b"[]", b'{"subscriptionId": 5}', b'"x"'])
async def test_key_request_body_is_checked(body: bytes) -> None:
    b, key = make("active")
    r = await call(b, "POST", "/api/keys/subscription", key, content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["success"] is False
