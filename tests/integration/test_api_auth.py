"""Who may call ``gpupool api``: management keys, on a live stack (real API server, the shared
operator, the API with the chart's rules).

Missing, malformed, unknown, revoked and forged management keys are refused (401) on every
operation of the OpenAPI document; a customer sees and cancels only their own subscriptions and
keys; the management key is stored only as a digest; and no key of either kind reaches the API's
log.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys

import pytest

from gpupool import names
from gpupool.api import mgmt_keys
from gpupool.api.openapi import document
from support.api import Caller, Stack
from support.kube import raw
from support.objects import pool_body
from support.operator import ROOT
from support.waiting import wait_for

pytestmark = pytest.mark.integration

OPERATIONS = [(method.upper(), path.replace("{id}", "auth-pool"))
              for path, item in document()["paths"].items() for method in item]


def call_all(caller: Caller) -> dict[str, tuple[int, object]]:
    out = {}
    for method, path in OPERATIONS:
        body = {"blocks": ["europe"]} if path.endswith("/subscribe") else None
        reply = caller.request(method, path, body)
        out[f"{method} {path}"] = (reply.status, reply.body)
    return out


def refused(answers: dict[str, tuple[int, object]], message: str) -> dict[str, object]:
    """The operations that did not answer 401 with ``message`` (empty: all refused)."""
    return {op: (status, body) for op, (status, body) in answers.items()
            if status != 401 or body != {"success": False, "error": message}}


@pytest.fixture
def pool(stack: Stack) -> str:
    stack.objs.create(pool_body("auth-pool", seats=4))
    stack.wait_pool("auth-pool", phase="active")
    return "auth-pool"


def test_missing_malformed_unknown_revoked_and_forged_keys_are_refused(stack: Stack,
                                                                      pool: str) -> None:
    base = stack.api.url
    answers = call_all(Caller(base))
    assert not refused(answers, "Missing management key: send Authorization: Bearer mk_...")
    r = Caller(base).get("/api/pools")
    assert r.status == 401
    assert stack.api.log_text().count("401") >= len(OPERATIONS)

    well_formed = mgmt_keys.mint()
    malformed = ["Basic " + base64.b64encode(b"user:pass").decode(), "Bearer",
                 "mk_" + "a" * 43, f"Token {well_formed}", "Bearer sk_pool_" + "a" * 43,
                 "Bearer mk_short", "Bearer mk_" + "!" * 43, f"Bearer {well_formed} extra"]
    for header in malformed:
        answers = call_all(Caller(base, headers={"Authorization": header}))
        assert not refused(answers, "Malformed management key: expected Authorization: "
                                    "Bearer mk_..."), f"header #{malformed.index(header)}"

    # Well-formed but unknown.
    assert not refused(call_all(Caller(base, well_formed)), "Invalid management key")

    # Revoked: worked, then `gpupool api revoke-key`, then refused.
    caller = stack.caller("cus_revoked")
    assert caller.get("/api/pools").status == 200
    key_id = mgmt_keys.key_id_of_digest(mgmt_keys.digest(caller.key or ""))
    proc = subprocess.run([sys.executable, "-m", "gpupool", "api", "revoke-key", "--kubeconfig",
                           str(stack.cluster.kubeconfig), "--namespace", stack.namespace,
                           "--key-id", key_id], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert not refused(call_all(caller), "Invalid management key")

    # Forged: a Secret at the name a key maps to, but not that key's digest (or not labelled a
    # management key) grants nothing.
    forged = mgmt_keys.mint()
    body = mgmt_keys.build_secret(mgmt_keys.mint(), namespace=stack.namespace,
                                  customer_id="cus_forged")
    body["metadata"]["name"] = mgmt_keys.secret_name(forged)
    raw(stack.objs.core.api_client).request(
        "POST", f"/api/v1/namespaces/{stack.namespace}/secrets", body=body)
    assert Caller(base, forged).get("/api/pools").status == 401
    unlabelled = mgmt_keys.mint()
    body = mgmt_keys.build_secret(unlabelled, namespace=stack.namespace, customer_id="cus_x")
    body["metadata"]["labels"] = {}
    raw(stack.objs.core.api_client).request(
        "POST", f"/api/v1/namespaces/{stack.namespace}/secrets", body=body)
    assert Caller(base, unlabelled).get("/api/pools").status == 401

    # The public document needs no key.
    assert Caller(base).get("/openapi.json").status == 200


def test_a_customer_sees_and_cancels_only_their_own(stack: Stack, pool: str) -> None:
    alice, bob = stack.caller("cus_alice"), stack.caller("cus_bob")
    a = alice.post(f"/api/pools/{pool}/subscribe", {"blocks": ["europe"]})
    assert a.status == 201, a
    a_key = alice.post("/api/keys/subscription")
    assert a_key.status == 201, a_key
    a_id = a.data["id"]

    # Bob has nothing on the pool: he sees none of Alice's.
    assert bob.get(f"/api/pools/{pool}/my-subscriptions").data == []
    assert bob.get(f"/api/pools/{pool}/my-keys").data == []
    assert bob.get(f"/api/pools/{pool}/my-pledge").status == 404
    assert bob.get(f"/api/pools/{pool}/my-key").status == 404
    r = bob.post("/api/keys/subscription", {"subscriptionId": a_id})
    assert r.status == 404 and r.error == "Subscription not found", r
    assert bob.post("/api/keys/subscription").status == 404
    assert bob.delete(f"/api/pools/{pool}/pledge").status == 404
    sub = stack.sub_by_uid(a_id)
    assert not sub["spec"].get("cancelAtPeriodEnd"), "Bob canceled Alice's subscription"

    # Bob subscribes too: each sees exactly their own subscription and key.
    b = bob.post(f"/api/pools/{pool}/subscribe", {"blocks": ["europe", "americas"]})
    assert b.status == 201, b
    b_key = bob.post("/api/keys/subscription")
    assert b_key.status == 201
    different = a_key.data["apiKey"] != b_key.data["apiKey"]
    assert different, "two customers got the same key"
    for caller, own_sub, own_key in ((alice, a_id, a_key.data), (bob, b.data["id"],
                                                                 b_key.data)):
        subs = caller.get(f"/api/pools/{pool}/my-subscriptions").data
        assert [s["id"] for s in subs] == [own_sub]
        keys = caller.get(f"/api/pools/{pool}/my-keys").data
        assert [k["id"] for k in keys] == [own_key["id"]]
        same = keys[0]["apiKey"] == own_key["apiKey"]
        assert same, "my-keys shows a key that is not the customer's own"
        assert caller.get(f"/api/pools/{pool}/my-key").data["id"] == own_key["id"]
    r = alice.post("/api/keys/subscription", {"subscriptionId": b.data["id"]})
    assert r.status == 404

    # Bob's cancel cancels Bob's.
    assert bob.delete(f"/api/pools/{pool}/pledge").status == 200
    assert stack.sub_by_uid(b.data["id"])["spec"]["cancelAtPeriodEnd"] is True
    assert not stack.sub_by_uid(a_id)["spec"].get("cancelAtPeriodEnd")


def test_management_keys_are_stored_hashed_and_never_logged(stack: Stack, pool: str) -> None:
    caller = stack.caller("cus_hashed", "hashed@example.com")
    key = caller.key or ""
    assert caller.post(f"/api/pools/{pool}/subscribe", {"blocks": ["asia"]}).status == 201
    api_key = caller.post("/api/keys/subscription").data["apiKey"]

    secret = stack.objs.core.read_namespaced_secret(mgmt_keys.secret_name(key), stack.namespace)
    assert secret.metadata.labels[names.LABEL_KIND] == "management-key"
    data = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
    assert data["sha256"] == hashlib.sha256(key.encode()).hexdigest()
    assert data["customerId"] == "cus_hashed" and data["email"] == "hashed@example.com"
    stored = repr(secret.to_dict())
    leaked = key in stored or key[3:] in stored or base64.b64encode(key.encode()).decode() \
        in stored
    assert not leaked, "the management key is stored in its Secret"

    def logged() -> bool:
        text = stack.api.log_text()
        return "POST /api/keys/subscription 201" in text
    wait_for(logged, timeout=10, message="the API logged the key request")
    text = stack.api.log_text()
    for secret_value, what in ((key, "management key"), (api_key, "API key")):
        found = secret_value in text or secret_value.split("_", 2)[-1] in text
        assert not found, f"the {what} is in the API's log"
