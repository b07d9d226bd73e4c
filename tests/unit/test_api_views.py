"""``gpupool.api.views``: Pools, Subscriptions and key Secrets as the seeds' JSON, no cluster.
Every answer is also validated against the pydantic shapes the OpenAPI document is made from."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from gpupool import keys
from gpupool.api import schemas, views
from gpupool.blocks import Block
from gpupool.subscription_service import NO_PAYMENT_METHOD

Obj = dict[str, Any]
POOL_UID = "3f1c8b7e-2a4d-4c1e-9b0a-1234567890ab"


def pool(**spec: Any) -> Obj:
    base: Obj = {"model": {"id": "MiniMax-M3", "displayName": "MiniMax M3",
                           "description": "Dedicated MiniMax M3 with unlimited usage."},
                 "seats": 2, "blocks": {"asia": {"price": "39.00"},
                                        "americas": {"price": "27.00", "seats": 1}},
                 "annualDiscount": "0.15", "published": True}
    base.update(spec)
    return {"metadata": {"name": "minimax-m3", "uid": POOL_UID},
            "spec": base,
            "status": {"phase": "active", "totalSlots": 3, "pledgedSlots": 1,
                       "ledger": {"sub-a": {"uid": "u-a", "seats": {"asia": [1]}}}}}


def sub(phase: str = "active", **meta: Any) -> Obj:
    return {
        "metadata": {"name": "sub-a", "uid": "u-a", "generation": 1,
                     "creationTimestamp": "2026-01-01T00:00:00Z", **meta},
        "spec": {"poolRef": {"name": "minimax-m3"}, "customer": {"id": "cus_a"},
                 "blocks": ["night"], "quantity": 1, "billingCycle": "year"},
        "status": {"phase": phase, "observedGeneration": 1, "monthlyPrice": "39.00",
                   "amount": "397.80", "slotCount": 8, "currentPeriodEnd": "2026-05-04T00:00:00Z",
                   "slots": [{"hour": h, "slotIndex": 1, "pricePerDay": p} for h, p in
                             zip(range(8), ["4.88"] * 4 + ["4.87"] * 4, strict=True)],
                   "keySecretName": "sub-a-key", "gate": "open"},
    }


def secret(subscription: str = "sub-a") -> Obj:
    return {"data": keys.encode({"apiKey": "sk_pool_" + "x" * 43, "keyId": "key_0123",
                                 "subscription": subscription, "rpm": "60", "tpm": "100000",
                                 "concurrency": "4"})}


def test_pool_summary_has_both_seeds_fields() -> None:
    p = pool()
    out = views.pool_summary(p)
    schemas.PoolSummary.model_validate(out)
    assert out == {"id": POOL_UID, "slug": "minimax-m3", "modelId": "MiniMax-M3",
                   "modelName": "MiniMax M3",
                   "description": "Dedicated MiniMax M3 with unlimited usage.", "infraSpec": "",
                   "status": "active", "totalSlots": 3, "pledgedSlots": 1,
                   "minPricePerDay": "27.00", "manualProvisioning": False,
                   "annualDiscount": 0.15, "reservationFee": "1.00", "currency": "usd"}


def test_hour_slots_seat_by_seat_with_status_from_the_ledger() -> None:
    detail = views.pool_detail(pool())
    schemas.PoolDetail.model_validate(detail)
    slots = detail["hourSlots"]
    assert len(slots) == 8 * 2 + 8 * 1
    assert [(s["slotIndex"], s["hour"]) for s in slots[:9]] == \
        [(0, h) for h in range(8)] + [(0, 16)]
    taken = {(s["hour"], s["slotIndex"]) for s in slots if s["status"] == "taken"}
    assert taken == {(h, 1) for h in range(8)}
    assert [s["pricePerDay"] for s in slots[:8]] == ["4.88"] * 4 + ["4.87"] * 4
    assert len({s["id"] for s in slots}) == len(slots)
    assert views.pool_detail(pool())["hourSlots"][0]["id"] == slots[0]["id"]  # stable
    assert detail["blocks"] == [
        {"block": "asia", "startHour": 0, "endHour": 7, "price": "39.00", "seats": 2,
         "available": 1},
        {"block": "americas", "startHour": 16, "endHour": 23, "price": "27.00", "seats": 1,
         "available": 1}]


@pytest.mark.parametrize(("change", "visible"), [
    ({}, True), ({"spec": {"published": False}}, False), ({"status": {"phase": "draft"}}, False),
    ({"status": {}}, False), ({"spec": {"seats": -1}}, False),
    ({"status": {"phase": "paused"}}, True), ({"status": {"phase": "funding"}}, True)])
def test_which_pools_are_shown(change: Obj, visible: bool) -> None:
    p = pool()
    for part, values in change.items():
        p[part] = {**p[part], **values} if values else {}
    assert views.pool_visible(p) is visible


def test_find_pool_by_uid_or_slug() -> None:
    pools = [pool()]
    assert views.find_pool(pools, POOL_UID) is pools[0]
    assert views.find_pool(pools, POOL_UID.upper()) is pools[0]
    assert views.find_pool(pools, "minimax-m3") is pools[0]
    assert views.find_pool(pools, "other") is None
    assert views.is_uuid(POOL_UID) and not views.is_uuid("minimax-m3")


@pytest.mark.parametrize(("body", "blocks", "quantity", "cycle"), [
    ({"blocks": ["americas"]}, (Block.AMERICAS,), 1, "month"),
    ({"blocks": ["night", "europe", "americas"], "quantity": 2},
     (Block.ASIA, Block.EUROPE, Block.AMERICAS), 2, "month"),
    ({"blocks": ["americas", "asia", "night"], "quantity": 20, "billingCycle": "year"},
     (Block.ASIA, Block.AMERICAS), 20, "year"),
    ({"blocks": ["europe"], "quantity": 3.0, "extra": True}, (Block.EUROPE,), 3, "month"),
])
def test_parse_subscribe(body: Obj, blocks: tuple[Block, ...], quantity: int, cycle: str) -> None:
    assert views.parse_subscribe(body) == views.SubscribeRequest(blocks, quantity, cycle)


@pytest.mark.parametrize(("body", "field"), [
    (None, "JSON object"), ([], "JSON object"), ({}, "blocks"), ({"blocks": []}, "blocks"),
    ({"blocks": "europe"}, "blocks"), ({"blocks": [1]}, "blocks"),
    ({"blocks": ["Europe"]}, "blocks"), ({"blocks": ["mars"]}, "blocks"),
    ({"blocks": ["europe"], "quantity": 0}, "quantity"),
    ({"blocks": ["europe"], "quantity": 21}, "quantity"),
    ({"blocks": ["europe"], "quantity": True}, "quantity"),
    ({"blocks": ["europe"], "quantity": "2"}, "quantity"),
    ({"blocks": ["europe"], "quantity": 1.5}, "quantity"),
    ({"blocks": ["europe"], "billingCycle": "week"}, "billingCycle"),
    ({"blocks": ["europe"], "billingCycle": None}, "billingCycle"),
])
def test_parse_subscribe_refuses(body: object, field: str) -> None:
    with pytest.raises(views.BadRequest, match=field):
        views.parse_subscribe(body)


def test_pre_check() -> None:
    p = pool()
    req = views.parse_subscribe
    assert views.pre_check(p, req({"blocks": ["asia"]})) is None
    assert views.pre_check(p, req({"blocks": ["europe"]})) == views.Refusal(
        400, "This pool does not sell the europe block")
    assert views.pre_check(p, req({"blocks": ["asia"], "quantity": 2})) == views.Refusal(
        409, "Pool is full: no 2 seats free in asia")
    paused = pool(paused=True)
    assert views.pre_check(paused, req({"blocks": ["asia"]})).status == 409  # type: ignore[union-attr]
    assert views.quote(p, req({"blocks": ["night", "americas"], "quantity": 2})) == ("132.00", 32)


@pytest.mark.parametrize(("phase", "reason", "message", "expected"), [
    ("pledged", None, None, views.Decision(True, 201)),
    ("active", None, None, views.Decision(True, 201)),
    ("pending_key", None, None, views.Decision(True, 201)),
    ("pending", "Queued", "waiting", None),
    ("pending", "NoPaymentMethod", NO_PAYMENT_METHOD,
     views.Decision(False, 400, NO_PAYMENT_METHOD)),
    ("pending", "PoolFull", "no 2 free seat(s) in europe, americas; waiting in line",
     views.Decision(False, 409, "Pool is full: no 2 seats free in europe, americas")),
    ("pending", "ReservationDeclined", "Your card was declined.",
     views.Decision(False, 402, "Payment failed: Your card was declined.")),
    ("pending", "PoolPaused", "pool x is paused", views.Decision(
        False, 409, "This pool is paused and takes no new subscriptions")),
])
def test_decision(phase: str, reason: str | None, message: str | None,
                  expected: views.Decision | None) -> None:
    s = sub(phase)
    if reason:
        s["status"]["conditions"] = [{"type": "SeatsHeld", "status": "False", "reason": reason,
                                      "message": message}]
    assert views.decision(s, quantity=2) == expected


def test_decision_waits_for_the_current_generation_and_reads_a_failed_charge() -> None:
    s = sub("pending")
    s["status"]["conditions"] = [{"type": "SeatsHeld", "status": "False",
                                  "reason": "NoPaymentMethod", "message": NO_PAYMENT_METHOD}]
    s["status"]["observedGeneration"] = 0
    assert views.decision(s) is None
    s = sub("past_due")
    s["status"]["conditions"] = [{"type": "Charged", "status": "False", "reason": "PaymentFailed",
                                  "message": "Your card was declined."}]
    assert views.decision(s) == views.Decision(False, 402,
                                               "Payment failed: Your card was declined.")


def test_subscription_view_and_key() -> None:
    s = sub()
    key = views.key_view(secret(), s)
    assert key is not None
    schemas.Key.model_validate(key)
    assert {k: v for k, v in key.items() if k != "apiKey"} == {
        "id": "key_0123", "rpmLimit": 60, "tpmLimit": 100000, "concurrencyLimit": 4,
        "isActive": True, "gate": "open", "subscriptionId": "u-a"}
    out = views.subscription_view(s, POOL_UID, key)
    schemas.Subscription.model_validate(out)
    assert out["currentPeriodEnd"] == "2026-05-04T00:00:00.000Z"
    assert out["blocks"] == ["asia"] and out["billingCycle"] == "year"
    assert out["hours"][0] == {"hour": 0, "slotIndex": 1, "pricePerDay": "4.88"}
    assert out["monthlyPrice"] == "39.00" and out["amount"] == "397.80"
    # past_due: the key is suspended; a key Secret of another subscription is never shown.
    assert views.key_view(secret(), sub("past_due"))["isActive"] is False  # type: ignore[index]
    assert views.key_view(secret("someone-else"), s) is None
    assert views.key_view(None, s) is None


def test_key_delivery() -> None:
    assert views.key_revealed(sub())  # made with kubectl: shown once issued
    on_request = sub(annotations={views.ANNOTATION_KEY_DELIVERY: views.DELIVERY_ON_REQUEST})
    assert not views.key_revealed(on_request)
    on_request["metadata"]["annotations"][views.ANNOTATION_KEY_REQUESTED] = "2026-01-01T00:00Z"
    assert views.key_revealed(on_request)
    assert views.key_on_request(pool(activationThreshold=0))
    assert not views.key_on_request(pool(activationThreshold=5))
    assert not views.key_on_request(pool(manualProvisioning=True))


def test_current_and_cancelable_pick_the_newest() -> None:
    old, new = sub(), sub()
    new["metadata"] = {**new["metadata"], "name": "sub-b", "uid": "u-b",
                       "creationTimestamp": "2026-01-01T00:00:00Z",
                       "annotations": {views.ANNOTATION_REQUESTED_AT: "2026-01-01T00:00:00.5Z"}}
    assert views.current([old, new]) is new
    new["status"]["phase"] = "canceled"
    assert views.current([old, new]) is old
    assert views.cancelable([old, new]) is old
    old["spec"]["cancelAtPeriodEnd"] = True
    assert views.cancelable([old, new]) is None
    assert views.current([]) is None


def test_subscription_body_writes_blocks_normalized() -> None:
    from datetime import UTC, datetime

    body = views.subscription_body(
        name="minimax-m3-0a1b2c3d", pool="minimax-m3", customer_id="cus_a", email=None,
        request=views.parse_subscribe({"blocks": ["night", "americas"], "quantity": 2}),
        on_request=True, mgmt_key_id="mkid_0", requested_at=datetime(2026, 1, 1, tzinfo=UTC))
    assert body["spec"] == {"poolRef": {"name": "minimax-m3"}, "customer": {"id": "cus_a"},
                            "blocks": ["asia", "americas"], "quantity": 2,
                            "billingCycle": "month"}
    assert body["metadata"]["annotations"][views.ANNOTATION_KEY_DELIVERY] == "on-request"
    from gpupool.models import parse_subscription_spec

    parse_subscription_spec(copy.deepcopy(body["spec"]))  # what the operator accepts
