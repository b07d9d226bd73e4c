"""The seeds' REST API, replayed against a live stack: every request/response example in the two
seed documents (``shared/seeds/gpu-boosts.txt``, ``shared/seeds/unlimited-subscriptions.txt``)
sent to a real ``gpupool api`` process (ServiceAccount with exactly the chart's API rules, one
namespace) in front of the real API server and operator, answers matched field by field.

Matching (``mismatches``): every field the seed shows is present with the same value and JSON
type; ids (``*_uuid``) must be the real ids (the pool's uid, the subscription's uid) or, for slot
and key ids, non-empty strings; times must be ISO 8601 UTC with milliseconds
(``2026-05-04T00:00:00.000Z``); ``apiKey`` must be a real ``sk_pool_`` key; a list in a seed is
matched as a prefix of the answer. Fields the seeds do not show are allowed only when listed in
``ADDITIONS`` (gpupool's documented additions).

Where the seeds contradict themselves the test says so in ``SEED_NOTES`` and checks the rule
instead of the literal:
- gpu-boosts shows hourSlots 3.38 then 3.37 for a 27.00 block (alternate cents), while
  unlimited shows 4.88, 4.88 for 39.00 (leftover cents to the earliest hours, as DESIGN.md and
  ``pricing.hourly_split`` say). The test expects 3.38 at hour 1.
- One response follows two subscribe requests in each seed; it matches the first request (one
  block) except, in unlimited, its ``hours`` (0 and 1, asia) which belong to the all-blocks
  request. Each request is checked against the fields that belong to it, the rest by the seeds'
  pricing rule (monthlyPrice = quantity x sum of block prices, slotCount = 8 x blocks x
  quantity, yearly amount = monthlyPrice x 12 x (1 - annualDiscount)).

The Stripe-dependent answers (400 "No payment method found — add a card first", the card
charged at subscribe, the reservation fee at pledge) run against an operator of the test's own
with billing on against localstripe (``test_billing_*``).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpupool import names
from gpupool.billing.localstripe import LocalStripe, free_port
from gpupool.devcluster import LocalCluster
from support.api import Reply, Stack, redact, start_stack
from support.objects import GROUP, VERSION, pool_body
from support.operator import ROOT, OperatorProcess
from support.stripe import OperatorWebhook, operator_env, reservation_fees, stripe_subscriptions
from support.waiting import wait_for

pytestmark = pytest.mark.integration
Obj = dict[str, Any]

SEEDS = ROOT.parent / "shared" / "seeds"
NO_PAYMENT_METHOD = "No payment method found — add a card first"
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

# ---- the seeds' examples, transcribed (test_transcription_matches_the_seeds checks them) -------

BOOSTS_POOL = "qwen3-397b-a17b"
INFRA_SPEC = "8\u00d7 H100 SXM5 \u00b7 50 tok/s guaranteed"  # as the seed writes it
BOOSTS: dict[str, Any] = {
    "requests": [("GET", "/api/pools", None),
                 ("GET", "/api/pools/pool_uuid", None),
                 ("POST", "/api/pools/pool_uuid/subscribe", {"blocks": ["americas"]}),
                 ("POST", "/api/pools/pool_uuid/subscribe",
                  {"blocks": ["night", "europe", "americas"], "quantity": 2}),
                 ("GET", "/api/pools/pool_uuid/my-pledge", None),
                 ("GET", "/api/pools/pool_uuid/my-key", None),
                 ("DELETE", "/api/pools/pool_uuid/pledge", None)],
    "list": {"success": True, "data": [{
        "id": "pool_uuid", "slug": "qwen3-397b-a17b", "modelId": "Qwen/Qwen3.5-397B-A17B",
        "modelName": "Qwen3.5-397B-A17B",
        "description": "Dedicated Qwen3.5 inference at guaranteed throughput.",
        "infraSpec": INFRA_SPEC, "status": "funding",
        "totalSlots": 10, "pledgedSlots": 3, "minPricePerDay": "27.00"}]},
    "detail": {"success": True, "data": {
        "id": "pool_uuid", "slug": "qwen3-397b-a17b", "modelId": "Qwen/Qwen3.5-397B-A17B",
        "status": "funding", "hourSlots": [
            {"id": "slot_uuid", "hour": 0, "slotIndex": 0, "pricePerDay": "3.38",
             "status": "available"},
            {"id": "slot_uuid", "hour": 1, "slotIndex": 0, "pricePerDay": "3.37",
             "status": "available"}]}},
    "subscribe": {"success": True, "data": {
        "id": "pledge_uuid", "poolId": "pool_uuid", "status": "pledged", "monthlyPrice": "27.00",
        "slotCount": 8}},
    "my-pledge": {"success": True, "data": {
        "id": "pledge_uuid", "status": "active", "monthlyPrice": "27.00",
        "currentPeriodEnd": "2026-05-04T00:00:00.000Z",
        "hours": [{"hour": 16, "slotIndex": 0, "pricePerDay": "3.38"}],
        "key": {"id": "key_uuid", "apiKey": "sk_pool_abc123...", "rpmLimit": 60,
                "tpmLimit": 100000, "isActive": True}}},
    "my-key": {"success": True, "data": {
        "id": "key_uuid", "apiKey": "sk_pool_abc123...", "rpmLimit": 60, "tpmLimit": 100000,
        "isActive": True}},
    "cancel": {"success": True, "data": {"canceled": True}},
}

UNLIMITED_POOL = "minimax-m3"
UNLIMITED: dict[str, Any] = {
    "requests": [("GET", "/api/pools", None),
                 ("GET", "/api/pools/minimax-m3", None),
                 ("POST", "/api/pools/minimax-m3/subscribe", {"blocks": ["americas"]}),
                 ("POST", "/api/pools/minimax-m3/subscribe",
                  {"blocks": ["asia", "europe", "americas"], "quantity": 2,
                   "billingCycle": "year"}),
                 ("GET", "/api/pools/minimax-m3/my-subscriptions", None),
                 ("GET", "/api/pools/minimax-m3/my-keys", None),
                 ("DELETE", "/api/pools/minimax-m3/pledge", None)],
    "list": {"success": True, "data": [{
        "id": "pool_uuid", "slug": "minimax-m3", "modelId": "MiniMax-M3",
        "modelName": "MiniMax M3", "description": "Dedicated MiniMax M3 with unlimited usage.",
        "status": "active", "totalSlots": 10, "minPricePerDay": "39.00",
        "manualProvisioning": False, "annualDiscount": 0.15}]},
    "detail": {"success": True, "data": {
        "id": "pool_uuid", "slug": "minimax-m3", "modelId": "MiniMax-M3", "status": "active",
        "hourSlots": [
            {"id": "slot_uuid", "hour": 0, "slotIndex": 0, "pricePerDay": "4.88",
             "status": "available"},
            {"id": "slot_uuid", "hour": 1, "slotIndex": 0, "pricePerDay": "4.88",
             "status": "available"}]}},
    "subscribe": {"success": True, "data": {
        "id": "subscription_uuid", "poolId": "pool_uuid", "status": "active",
        "monthlyPrice": "39.00",
        "hours": [{"hour": 0, "slotIndex": 0, "pricePerDay": "4.88"},
                  {"hour": 1, "slotIndex": 0, "pricePerDay": "4.88"}],
        "key": None}},
    "my-subscriptions": {"success": True, "data": [{
        "id": "subscription_uuid", "status": "active", "monthlyPrice": "39.00",
        "billingCycle": "month", "cancelAtPeriodEnd": False,
        "currentPeriodEnd": "2026-05-14T00:00:00.000Z",
        "hours": [{"hour": 16, "slotIndex": 0, "pricePerDay": "4.88"}],
        "key": {"id": "key_uuid", "apiKey": "sk_pool_abc123...", "isActive": True}}]},
    "cancel": {"success": True, "data": {"canceled": True}},
}

# Fields gpupool answers with beyond what a seed's example shows (documented in the OpenAPI
# document as "(gpupool)" or taken from the other seed).
ADDITIONS: dict[str, set[str]] = {
    "pool": {"pledgedSlots", "manualProvisioning", "annualDiscount", "reservationFee",
             "currency", "modelName", "description", "infraSpec", "totalSlots",
             "minPricePerDay", "blocks"},
    "subscription": {"poolId", "amount", "billingCycle", "cancelAtPeriodEnd",
                     "currentPeriodEnd", "blocks", "quantity", "slotCount", "hours", "key"},
    "key": {"rpmLimit", "tpmLimit", "concurrencyLimit", "gate", "subscriptionId"},
    "cancel": {"id", "status", "cancelAtPeriodEnd", "currentPeriodEnd"},
}

SEED_NOTES = {
    "boosts.detail.hourSlots[1].pricePerDay": (
        "gpu-boosts shows 3.37 at hour 1 of a 27.00 block; unlimited shows 4.88 at hour 1 of a "
        "39.00 block. Only 'leftover cents to the earliest hours' (DESIGN.md) gives the "
        "unlimited figure, and it gives 3.38 here."),
}


# ---- seed parsing (for the transcription check) -------------------------------------------------

def seed_examples(path: Path) -> tuple[list[Obj], list[tuple[str, str, Obj | None]]]:
    """The JSON answers and the curl requests of one seed document, in order."""
    text = path.read_text()
    answers: list[Obj] = []
    start = 0
    pattern = re.compile(r'\{\s*"success"')
    while (m := pattern.search(text, start)) is not None:
        depth = 0
        for end in range(m.start(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                break
        answers.append(json.loads(text[m.start():end + 1]))
        start = end + 1
    requests: list[tuple[str, str, Obj | None]] = []
    flat = text.replace("\\\n", " ")
    for m in re.finditer(r"curl (?:-X (\w+) )?https://[^/\s]+(/api/\S+)(.*?)(?=curl |$)", flat,
                         re.S):
        body = re.search(r"-d '([^']*)'", m.group(3))
        requests.append((m.group(1) or "GET", m.group(2),
                         json.loads(body.group(1)) if body else None))
    return answers, requests


def test_transcription_matches_the_seeds() -> None:
    if not SEEDS.is_dir():
        pytest.skip(f"seed documents not beside the repository ({SEEDS})")
    answers, requests = seed_examples(SEEDS / "gpu-boosts.txt")
    assert requests == BOOSTS["requests"]
    assert answers == [BOOSTS[k] for k in ("list", "detail", "subscribe", "my-pledge", "my-key",
                                           "cancel")]
    answers, requests = seed_examples(SEEDS / "unlimited-subscriptions.txt")
    assert requests == UNLIMITED["requests"]
    assert answers == [UNLIMITED[k] for k in ("list", "detail", "subscribe", "my-subscriptions",
                                              "cancel")]
    text = (SEEDS / "unlimited-subscriptions.txt").read_text()
    assert NO_PAYMENT_METHOD in text and "POST /api/keys/subscription" in text


# ---- matching ---------------------------------------------------------------------------------

def mismatches(seed: Any, actual: Any, ids: dict[str, str], where: str = "",
               kind: str | None = None, skip: frozenset[str] = frozenset()) -> list[str]:
    """How ``actual`` differs from the seed's example (empty: it matches). Never quotes a key."""
    if where in skip:
        return []
    out: list[str] = []
    if isinstance(seed, dict):
        if not isinstance(actual, dict):
            return [f"{where}: expected an object, got {type(actual).__name__}"]
        for k, v in seed.items():
            if k not in actual:
                out.append(f"{where}.{k}: missing")
                continue
            child_kind = {"key": "key", "hours": None}.get(k, kind)
            out += mismatches(v, actual[k], ids, f"{where}.{k}", child_kind, skip)
        extra = set(actual) - set(seed) - ADDITIONS.get(kind or "", set())
        if extra:
            out.append(f"{where}: undocumented fields {sorted(extra)}")
        return out
    if isinstance(seed, list):
        if not isinstance(actual, list) or len(actual) < len(seed):
            return [f"{where}: expected a list of at least {len(seed)}, got "
                    f"{redact(actual)!r}"[:300]]
        for i, v in enumerate(seed):
            out += mismatches(v, actual[i], ids, f"{where}[{i}]", kind, skip)
        return out
    if isinstance(seed, str) and seed.endswith("_uuid"):
        want = ids.get(seed)
        if not isinstance(actual, str) or not actual or (want is not None and actual != want):
            return [f"{where}: expected the {seed} ({want or 'a non-empty id'}), got {actual!r}"]
        return []
    if isinstance(seed, str) and seed.startswith("sk_pool_"):
        shaped = isinstance(actual, str) and bool(re.fullmatch(r"sk_pool_[A-Za-z0-9_-]{40,}",
                                                                actual))
        return [] if shaped else [f"{where}: not an sk_pool_ key"]
    if isinstance(seed, str) and TIME.match(seed):
        ok = isinstance(actual, str) and bool(TIME.match(actual))
        return [] if ok else [f"{where}: expected a time like {seed}, got {actual!r}"]
    if type(seed) is not type(actual) or seed != actual:
        return [f"{where}: expected {seed!r}, got {redact(actual)!r}"]
    return []


def assert_matches(seed: Obj, reply: Reply, ids: dict[str, str], kind: str,
                   skip: frozenset[str] = frozenset(), status: int = 200) -> None:
    assert reply.status == status, reply
    assert isinstance(reply.body, dict) and reply.body.get("success") is True, reply
    problems = mismatches(seed["data"], reply.body["data"], ids, "data", kind, skip)
    assert not problems, "\n".join(problems)


# ---- the stack --------------------------------------------------------------------------------

def boosts_pool(**spec: Any) -> Obj:
    """The gpu-boosts example pool: 10 seats over the blocks, every block 27.00, funding."""
    return pool_body(BOOSTS_POOL, model={
        "id": "Qwen/Qwen3.5-397B-A17B", "displayName": "Qwen3.5-397B-A17B",
        "description": "Dedicated Qwen3.5 inference at guaranteed throughput.",
        "infraSpec": INFRA_SPEC},
        seats=0, blocks={"asia": {"price": "27.00", "seats": 2},
                         "europe": {"price": "27.00", "seats": 5},
                         "americas": {"price": "27.00", "seats": 3}},
        activationThreshold=100, **spec)


def unlimited_pool(name: str = UNLIMITED_POOL, **spec: Any) -> Obj:
    """The unlimited example plan: active at once (threshold 0), 39.00 a block, 15% off yearly."""
    base: Obj = {"model": {"id": "MiniMax-M3", "displayName": "MiniMax M3",
                           "description": "Dedicated MiniMax M3 with unlimited usage."},
                 "seats": 0, "blocks": {"asia": {"price": "39.00", "seats": 4},
                                        "europe": {"price": "39.00", "seats": 3},
                                        "americas": {"price": "39.00", "seats": 3}},
                 "annualDiscount": "0.15", "activationThreshold": 0}
    return pool_body(name, **{**base, **spec})


def path(template: str, pool_id: str) -> str:
    return template.replace("pool_uuid", pool_id)


def only(items: list[Obj], slug: str) -> Obj:
    found = [p for p in items if p.get("slug") == slug]
    assert len(found) == 1, f"{slug} listed {len(found)} times"
    return found[0]


# ---- GPU Boosts ---------------------------------------------------------------------------------

def test_gpu_boosts_examples(stack: Stack) -> None:
    reqs = BOOSTS["requests"]
    stack.objs.create(boosts_pool())
    stack.objs.create(pool_body("draft-pool", published=False))
    pool = stack.wait_pool(BOOSTS_POOL, phase="funding")
    pool_id = pool["metadata"]["uid"]
    ids = {"pool_uuid": pool_id}
    me, other, third = (stack.caller("cus_boost_me", "me@example.com"),
                        stack.caller("cus_boost_other"), stack.caller("cus_boost_third"))

    # Someone else pledged 3 seat-blocks (europe x3) before: pledgedSlots 3 in the listing.
    r = other.post(path(reqs[2][1], pool_id), {"blocks": ["europe"], "quantity": 3})
    assert r.status == 201 and r.data["status"] == "pledged", r
    stack.wait_pool(BOOSTS_POOL, pledgedSlots=3)

    # GET /api/pools: not drafts.
    method, url, _ = reqs[0]
    r = me.request(method, url)
    assert r.status == 200 and isinstance(r.data, list), r
    assert "draft-pool" not in {p["slug"] for p in r.data}
    listed = {"success": True, "data": [only(r.data, BOOSTS_POOL)]}
    assert_matches(BOOSTS["list"], Reply(200, listed), ids, "pool")

    # GET /api/pools/:id by UUID (and the same by slug).
    method, url, _ = reqs[1]
    r = me.request(method, path(url, pool_id))
    assert_matches(BOOSTS["detail"], r, ids, "pool",
                   skip=frozenset({"data.hourSlots[1].pricePerDay"}))
    assert r.data["hourSlots"][1]["pricePerDay"] == "3.38", SEED_NOTES[
        "boosts.detail.hourSlots[1].pricePerDay"]
    assert len(r.data["hourSlots"]) == 8 * 10  # every hour of every seat
    taken = {(s["hour"], s["slotIndex"]) for s in r.data["hourSlots"] if s["status"] == "taken"}
    assert taken == {(h, i) for h in range(8, 16) for i in range(3)}  # other's europe seats
    assert me.get(f"/api/pools/{BOOSTS_POOL}").data == r.data
    assert me.get("/api/pools/draft-pool").status == 404

    # POST subscribe {"blocks": ["americas"]}: a pledge on a funding pool.
    method, url, body = reqs[2]
    r = me.request(method, path(url, pool_id), body)
    ids["pledge_uuid"] = r.data["id"]
    assert_matches(BOOSTS["subscribe"], r, ids, "subscription", status=201)
    mine = stack.sub_by_uid(r.data["id"])
    assert mine["spec"]["customer"] == {"id": "cus_boost_me", "email": "me@example.com"}
    assert mine["status"]["phase"] == "pledged"

    # POST subscribe night+europe+americas x2 (another customer; the seed's single response is
    # the first request's): monthlyPrice = 2 x (27 + 27 + 27), slotCount = 8 x 3 x 2.
    method, url, body = reqs[3]
    r = third.request(method, path(url, pool_id), body)
    assert r.status == 201, r
    shape = {**BOOSTS["subscribe"]["data"], "id": "third_uuid", "monthlyPrice": "162.00",
             "slotCount": 48}
    assert_matches({"data": shape}, r, {**ids, "third_uuid": r.data["id"]}, "subscription",
                   status=201)
    third_sub = stack.sub_by_uid(r.data["id"])
    assert third_sub["spec"]["blocks"] == ["asia", "europe", "americas"]  # night written asia
    stack.wait_pool(BOOSTS_POOL, pledgedSlots=10)
    assert me.post(path(url, pool_id), {"blocks": ["americas"]}).status == 409  # full now

    # DELETE .../pledge on a pledge: canceled at once, seats freed.
    method, url, _ = reqs[6]
    r = third.request(method, path(url, pool_id))
    assert_matches(BOOSTS["cancel"], r, ids, "cancel")
    assert r.data["status"] == "canceled" and r.data["id"] == third_sub["metadata"]["uid"]
    stack.wait_pool(BOOSTS_POOL, pledgedSlots=4)

    # The pool reaches its threshold (the platform lowers it) and activates: every pledge is
    # charged and gets its key.
    stack.objs.patch("pools", BOOSTS_POOL, {"spec": {"activationThreshold": 4}})
    stack.wait_pool(BOOSTS_POOL, phase="active")

    # GET my-pledge: active, with the key.
    method, url, _ = reqs[4]

    def active_with_key() -> Reply | None:
        reply = me.request(method, path(url, pool_id))
        return reply if reply.status == 200 and reply.data["key"] else None
    r = wait_for(active_with_key, timeout=60, message="my-pledge active with a key")
    assert_matches(BOOSTS["my-pledge"], r, ids, "subscription")
    assert [h["hour"] for h in r.data["hours"]] == list(range(16, 24))
    key_id = r.data["key"]["id"]
    secret = stack.objs.secret_data(names.key_secret_name(mine["metadata"]["name"]))
    assert secret is not None and key_id == secret["keyId"]
    same_key = r.data["key"]["apiKey"] == secret["apiKey"]
    assert same_key, "my-pledge's apiKey is not the key the operator issued"

    # GET my-key: only the key object.
    method, url, _ = reqs[5]
    r = me.request(method, path(url, pool_id))
    assert_matches(BOOSTS["my-key"], r, ids, "key")
    assert r.data["id"] == key_id

    # A new subscriber to the now active pool is active at once, with its key.
    r = other.post(path(reqs[2][1], pool_id), {"blocks": ["asia"]})
    assert r.status == 201 and r.data["status"] == "active", r
    assert mismatches(BOOSTS["my-key"]["data"], r.data["key"], ids, "key", "key") == []

    # DELETE .../pledge on an active subscription: it ends with the paid period.
    r = me.delete(path(reqs[6][1], pool_id))
    assert_matches(BOOSTS["cancel"], r, ids, "cancel")
    assert r.data["status"] == "active" and r.data["cancelAtPeriodEnd"] is True
    r = me.get(path(reqs[4][1], pool_id))
    assert r.data["status"] == "active" and r.data["key"]["isActive"] is True


# ---- Unlimited ----------------------------------------------------------------------------------

def test_unlimited_examples(stack: Stack) -> None:
    reqs = UNLIMITED["requests"]
    stack.objs.create(unlimited_pool())
    pool = stack.wait_pool(UNLIMITED_POOL, phase="active")
    pool_id = pool["metadata"]["uid"]
    ids = {"pool_uuid": pool_id}
    me, big = stack.caller("cus_unl_me"), stack.caller("cus_unl_big")

    # GET /api/pools: the active plan.
    r = me.get(reqs[0][1])
    listed = {"success": True, "data": [only(r.data, UNLIMITED_POOL)]}
    assert_matches(UNLIMITED["list"], Reply(r.status, listed), ids, "pool")

    # GET /api/pools/minimax-m3 (the slug), hour slots 4.88 each.
    r = me.get(reqs[1][1])
    assert_matches(UNLIMITED["detail"], r, ids, "pool")
    assert r.data["annualDiscount"] == 0.15

    # POST subscribe {"blocks": ["americas"]}: active at once, no key until asked for. The
    # seed's hours (0 and 1) are the all-blocks request's; these are americas' own.
    r = me.post(reqs[2][1], reqs[2][2])
    ids["subscription_uuid"] = r.data["id"]
    assert_matches(UNLIMITED["subscribe"], r, ids, "subscription", status=201,
                   skip=frozenset({"data.hours[0]", "data.hours[1]"}))
    assert r.data["hours"] == [{"hour": h, "slotIndex": 0, "pricePerDay": p} for h, p in
                               zip(range(16, 24), ["4.88"] * 4 + ["4.87"] * 4, strict=True)]
    assert r.data["key"] is None and r.data["billingCycle"] == "month"
    mine = stack.sub_by_uid(r.data["id"])
    assert mine["status"]["phase"] == "active" and mine["status"].get("keySecretName")
    # ... the operator did issue the key, but the API does not show it yet.
    assert me.get(f"/api/pools/{UNLIMITED_POOL}/my-key").status == 404
    assert me.get(reqs[5][1]).data == []

    # POST subscribe all blocks x2, yearly (another customer): the seed's hours, key null;
    # monthlyPrice = 2 x (39 x 3); the yearly amount takes the 15% off.
    r = big.post(reqs[3][1], reqs[3][2])
    shape = {**UNLIMITED["subscribe"]["data"], "id": "big_uuid", "monthlyPrice": "234.00"}
    assert_matches({"data": shape}, r, {**ids, "big_uuid": r.data["id"]}, "subscription",
                   status=201)
    monthly = Decimal("234.00")
    assert r.data["amount"] == str((monthly * 12 * (1 - Decimal("0.15"))).quantize(
        Decimal("0.01")))
    assert r.data["billingCycle"] == "year" and r.data["slotCount"] == 8 * 3 * 2

    # POST /api/keys/subscription: "create your key" (newest active subscription).
    r = me.post("/api/keys/subscription")
    assert r.status == 201, r
    assert r.data["subscriptionId"] == ids["subscription_uuid"] and r.data["poolId"] == pool_id
    key = r.data
    again = me.post("/api/keys/subscription", {"subscriptionId": ids["subscription_uuid"]})
    assert again.status == 200 and again.data == key, "asking again returns the same key"
    ann = stack.sub_by_uid(ids["subscription_uuid"])["metadata"]["annotations"]
    assert ann.get("gpupool.dev/key-requested-at")

    # GET my-subscriptions.
    r = me.get(reqs[4][1])
    assert_matches(UNLIMITED["my-subscriptions"], r, ids, "subscription")
    assert len(r.data) == 1 and r.data[0]["key"] == {k: v for k, v in key.items()
                                                    if k != "poolId"}

    # GET my-keys: every key of mine on the plan.
    r = me.get(reqs[5][1])
    assert r.status == 200 and [k["id"] for k in r.data] == [key["id"]], r
    assert mismatches(UNLIMITED["my-subscriptions"]["data"][0]["key"], r.data[0], ids, "",
                      "key") == []

    # DELETE .../pledge: cancels my most recent subscription at the period's end.
    r = me.delete(reqs[6][1])
    assert_matches(UNLIMITED["cancel"], r, ids, "cancel")
    r = me.get(reqs[4][1])
    assert r.data[0]["cancelAtPeriodEnd"] is True and r.data[0]["status"] == "active"
    assert r.data[0]["key"]["isActive"] is True  # works until currentPeriodEnd
    assert me.delete(reqs[6][1]).status == 404  # nothing left to cancel


def test_unlimited_manual_provisioning_is_pending_key(stack: Stack) -> None:
    """"If the plan has manual provisioning enabled, status will be pending_key and key will be
    null. You'll receive an email when your key is ready.\""""
    stack.objs.create(unlimited_pool("manual-plan", manualProvisioning=True))
    stack.wait_pool("manual-plan", phase="active")
    me = stack.caller("cus_manual")
    r = me.post("/api/pools/manual-plan/subscribe", {"blocks": ["europe"]})
    assert r.status == 201 and r.data["status"] == "pending_key" and r.data["key"] is None, r
    listed = me.get("/api/pools/manual-plan")
    assert listed.data["manualProvisioning"] is True
    assert me.post("/api/keys/subscription").status == 409
    assert me.get("/api/pools/manual-plan/my-key").status == 404

    # A platform engineer approves: the key is delivered without another call.
    name = stack.sub_by_uid(r.data["id"])["metadata"]["name"]
    stack.objs.patch("subscriptions", name, {"metadata": {"annotations": {
        names.ANNOTATION_APPROVED: "true"}}})
    key = wait_for(lambda: (k := me.get("/api/pools/manual-plan/my-key")).status == 200 and k,
                   timeout=30, message="the approved key")
    assert key.data["isActive"] is True and key.data["subscriptionId"] == r.data["id"]


def test_subscribe_refusals(stack: Stack) -> None:
    stack.objs.create(unlimited_pool("small", blocks={"europe": {"price": "39.00",
                                                                 "seats": 1}}))
    stack.wait_pool("small", phase="active")
    me = stack.caller("cus_refused")
    assert me.post("/api/pools/small/subscribe", {"blocks": ["asia"]}).status == 400
    for body, field in (({}, "blocks"), ({"blocks": []}, "blocks"),
                        ({"blocks": ["mars"]}, "blocks"),
                        ({"blocks": ["europe"], "quantity": 21}, "quantity"),
                        ({"blocks": ["europe"], "quantity": 0}, "quantity"),
                        ({"blocks": ["europe"], "quantity": "2"}, "quantity"),
                        ({"blocks": ["europe"], "billingCycle": "week"}, "billingCycle")):
        r = me.post("/api/pools/small/subscribe", body)
        assert r.status == 400 and field in r.error, (body, r)
    assert me.post("/api/pools/small/subscribe", content=b"{nope",
                   headers={"content-type": "application/json"}).status == 400
    assert me.post("/api/pools/nowhere/subscribe", {"blocks": ["europe"]}).status == 404
    assert me.post("/api/pools/small/subscribe", {"blocks": ["europe"]}).status == 201
    full = me.post("/api/pools/small/subscribe", {"blocks": ["europe"]})
    assert full.status == 409 and full.error == "Pool is full: no 1 seat free in europe", full
    # Nothing is left behind by a refusal: one Subscription, the accepted one.
    assert len(stack.objs.list_subs()) == 1


# ---- with billing: an operator of the test's own on localstripe ---------------------------------

@pytest.fixture
def billing_stack(cluster: LocalCluster, kube: client.ApiClient, own_namespace: str,
                  stripe_server: LocalStripe, tmp_path: Path) -> Iterator[tuple[Stack,
                                                                                LocalStripe]]:
    hook = OperatorWebhook(free_port())
    op = OperatorProcess(cluster.kubeconfig, name="operator-api-billing",
                         env={**operator_env(stripe_server, hook.port),
                              "GPUPOOL_RESYNC_SECONDS": "3600"},
                         namespaces=[own_namespace]).start()
    stack = None
    try:
        stack = start_stack(cluster, kube, own_namespace, tmp_path, "billing")
        yield stack, stripe_server
    finally:
        if stack is not None:
            stack.api.stop()
        op.stop()
        strip_finalizers(kube, own_namespace)


def strip_finalizers(kube: client.ApiClient, namespace: str) -> None:
    """After its operator stopped: let the namespace go (Subscriptions carry a finalizer)."""
    api = client.CustomObjectsApi(kube)
    for sub in api.list_namespaced_custom_object(GROUP, VERSION, namespace,
                                                 "subscriptions")["items"]:
        if sub["metadata"].get("finalizers"):
            with contextlib.suppress(ApiException):
                api.patch_namespaced_custom_object(GROUP, VERSION, namespace, "subscriptions",
                                                   sub["metadata"]["name"],
                                                   {"metadata": {"finalizers": None}})


def test_billing_no_payment_method_and_charges(billing_stack: tuple[Stack, LocalStripe]
                                               ) -> None:
    stack, stripe = billing_stack
    stack.objs.create(unlimited_pool())
    stack.objs.create(boosts_pool(reservationFee="1.00"))
    stack.wait_pool(UNLIMITED_POOL, phase="active")
    stack.wait_pool(BOOSTS_POOL, phase="funding")

    # "Prerequisite: you need a saved payment method before subscribing ... otherwise this
    # returns 400 "No payment method found — add a card first"."
    cardless = stack.caller(stripe.create_customer(None))
    r = cardless.post("/api/pools/minimax-m3/subscribe", {"blocks": ["americas"]})
    assert r.status == 400 and r.error == NO_PAYMENT_METHOD, r
    assert r.body == {"success": False, "error": NO_PAYMENT_METHOD}
    wait_for(lambda: not stack.objs.list_subs(), timeout=30,
             message="the refused Subscription deleted")
    assert cardless.get("/api/pools/minimax-m3/my-subscriptions").data == []

    # With a card: "Your card is charged immediately" -- one Stripe subscription, monthlyPrice.
    customer = stripe.create_customer()
    payer = stack.caller(customer)
    r = payer.post("/api/pools/minimax-m3/subscribe", {"blocks": ["americas"]})
    ids = {"pool_uuid": stack.uid("pools", UNLIMITED_POOL), "subscription_uuid": r.data["id"]}
    assert_matches(UNLIMITED["subscribe"], r, ids, "subscription", status=201,
                   skip=frozenset({"data.hours[0]", "data.hours[1]"}))
    charged = stripe_subscriptions(stripe, r.data["id"])
    assert [(s["status"], s["customer"]) for s in charged] == [("active", customer)]
    assert charged[0]["items"]["data"][0]["plan"]["amount"] == 3900
    assert payer.post("/api/keys/subscription").status == 201

    # GPU Boosts: "A $1 non-refundable reservation fee is charged to your card on file".
    r = payer.post(f"/api/pools/{BOOSTS_POOL}/subscribe", {"blocks": ["americas"]})
    ids = {"pool_uuid": stack.uid("pools", BOOSTS_POOL), "pledge_uuid": r.data["id"]}
    assert_matches(BOOSTS["subscribe"], r, ids, "subscription", status=201)
    fees = reservation_fees(stripe, r.data["id"])
    assert [(f["status"], f["amount"]) for f in fees] == [("succeeded", 100)]
