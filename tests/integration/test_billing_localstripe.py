"""Billing steps against a real localstripe (no Kubernetes needed)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from decimal import Decimal
from typing import Any, Literal

import httpx
import pytest

from gpupool import pricing
from gpupool.billing import (
    NO_PAYMENT_METHOD_MESSAGE,
    BillingService,
    NoPaymentMethod,
    NotFound,
    PaymentDeclined,
    SubscriptionResult,
    event_targets,
    idempotency_key,
)
from gpupool.billing.localstripe import (
    CARD_DECLINES_CHARGES,
    WEBHOOK_SECRET,
    LocalStripe,
    WebhookReceiver,
    signed_event,
    wait_until,
)
from gpupool.blocks import Block

POOL_KEY = "default/qwen"


async def subscribe(service: BillingService, uid: str, customer: str, amount_cents: int = 3900,
                    interval: Literal["month", "year"] = "month",
                    **kwargs: Any) -> SubscriptionResult:
    return await service.ensure_subscription(uid, customer, pool_key=POOL_KEY, pool_name="qwen",
                                             amount_cents=amount_cents, interval=interval,
                                             **kwargs)


def new_uid() -> str:
    return str(uuid.uuid4())


def fees_for(server: LocalStripe, uid: str) -> list[dict[str, Any]]:
    return [pi for pi in server.list_all("payment_intents")
            if pi["metadata"].get("gpupool_uid") == uid]


def subs_for(server: LocalStripe, uid: str) -> list[dict[str, Any]]:
    return [s for s in server.list_all("subscriptions", status="all")
            if s["metadata"].get("gpupool_uid") == uid]


def succeeded_charges(server: LocalStripe, customer: str) -> list[dict[str, Any]]:
    return [c for c in server.list_all("charges", customer=customer)
            if c["status"] == "succeeded"]


# ---- reservation fee ----------------------------------------------------------------------------

async def test_fee_is_charged_once_over_five_calls(stripe_server: LocalStripe,
                                                   billing: BillingService) -> None:
    customer = stripe_server.create_customer()
    uid = new_uid()
    results = [await billing.charge_reservation_fee(uid, customer, 100, "usd") for _ in range(5)]

    assert {r.payment_intent_id for r in results} == {results[0].payment_intent_id}
    assert [r.created_now for r in results] == [True, False, False, False, False]
    assert all(r.state == "succeeded" for r in results)
    fees = fees_for(stripe_server, uid)
    assert len(fees) == 1
    assert fees[0]["amount"] == 100 and fees[0]["currency"] == "usd"
    assert fees[0]["status"] == "succeeded"
    assert fees[0]["metadata"]["gpupool_step"] == "reservation_fee"
    assert len(succeeded_charges(stripe_server, customer)) == 1


async def test_concurrent_calls_charge_once(stripe_server: LocalStripe,
                                            billing: BillingService) -> None:
    customer = stripe_server.create_customer()
    uid = new_uid()
    results = await asyncio.gather(
        *(billing.charge_reservation_fee(uid, customer, 100, "usd") for _ in range(5)))
    assert len({r.payment_intent_id for r in results}) == 1
    assert len(fees_for(stripe_server, uid)) == 1


async def test_fee_found_after_a_crash_right_after_the_create(stripe_server: LocalStripe,
                                                              billing: BillingService) -> None:
    customer = stripe_server.create_customer()
    uid = new_uid()

    # 1. What the step sends, sent by hand, and the answer thrown away (the process "died").
    by_hand: dict[str, Any] = {
        "amount": 100, "currency": "usd", "customer": customer,
        "payment_method": _default_pm(stripe_server, customer), "confirm": True,
        "off_session": True, "payment_method_types": ["card"],
        "metadata": {"gpupool_uid": uid, "gpupool_step": "reservation_fee",
                     "gpupool_attempt": "1"}}
    stripe_server.client.v1.payment_intents.create(
        params=by_hand,  # type: ignore[arg-type]
        options={"idempotency_key": idempotency_key(uid, "reservation_fee")})
    result = await billing.charge_reservation_fee(uid, customer, 100, "usd")
    assert not result.created_now
    assert len(fees_for(stripe_server, uid)) == 1

    # 2. The real create path, crashing after Stripe answered: a fresh service must find it.
    uid2 = new_uid()
    crashing = BillingService(stripe_server.billing_config())
    real_create = crashing.client.v1.payment_intents.create

    def create_then_crash(*args: Any, **kwargs: Any) -> Any:
        real_create(*args, **kwargs)
        raise KeyboardInterrupt("operator killed after the create")

    crashing.client.v1.payment_intents.create = create_then_crash  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        await crashing.charge_reservation_fee(uid2, customer, 100, "usd")
    await crashing.close()
    assert len(fees_for(stripe_server, uid2)) == 1

    again = await billing.charge_reservation_fee(uid2, customer, 100, "usd")
    assert not again.created_now
    assert again.payment_intent_id == fees_for(stripe_server, uid2)[0]["id"]
    assert len(fees_for(stripe_server, uid2)) == 1
    assert len(succeeded_charges(stripe_server, customer)) == 2  # one per uid


async def test_fee_without_payment_method_waits_for_a_card(stripe_server: LocalStripe,
                                                           billing: BillingService) -> None:
    customer = stripe_server.create_customer(payment_method=None)
    uid = new_uid()
    assert not await billing.has_default_payment_method(customer)
    with pytest.raises(NoPaymentMethod) as info:
        await billing.charge_reservation_fee(uid, customer, 100, "usd")
    assert info.value.reason == NO_PAYMENT_METHOD_MESSAGE
    assert not info.value.retryable
    assert fees_for(stripe_server, uid) == []

    stripe_server.set_default_card(customer)
    assert await billing.has_default_payment_method(customer)
    result = await billing.charge_reservation_fee(uid, customer, 100, "usd")
    assert result.state == "succeeded" and result.created_now


async def test_declined_fee_is_not_retried_on_the_same_card(stripe_server: LocalStripe,
                                                            billing: BillingService) -> None:
    customer = stripe_server.create_customer(CARD_DECLINES_CHARGES)
    uid = new_uid()
    for _ in range(3):
        with pytest.raises(PaymentDeclined) as info:
            await billing.charge_reservation_fee(uid, customer, 100, "usd")
        assert info.value.reason == "Your card was declined."
        assert info.value.code == "card_declined"
        assert not info.value.retryable
        assert info.value.payment_intent_id == fees_for(stripe_server, uid)[0]["id"]
    assert len(fees_for(stripe_server, uid)) == 1  # one attempt, not three

    # A new default card: one new attempt, the failed one is closed.
    stripe_server.set_default_card(customer)
    result = await billing.charge_reservation_fee(uid, customer, 100, "usd")
    assert result.state == "succeeded"
    fees = sorted(fees_for(stripe_server, uid), key=lambda p: p["metadata"]["gpupool_attempt"])
    assert [f["status"] for f in fees] == ["canceled", "succeeded"]
    assert await billing.charge_reservation_fee(uid, customer, 100, "usd") == \
        dataclasses.replace(result, created_now=False)
    assert len(succeeded_charges(stripe_server, customer)) == 1


async def test_unknown_customer_is_a_permanent_error(billing: BillingService) -> None:
    with pytest.raises(NotFound) as info:
        await billing.charge_reservation_fee(new_uid(), "cus_doesnotexist", 100, "usd")
    assert not info.value.retryable


# ---- subscriptions ------------------------------------------------------------------------------

PRICES = {Block.ASIA: Decimal("39.00"), Block.EUROPE: Decimal("27.50"),
          Block.AMERICAS: Decimal("10.01")}


@pytest.mark.parametrize(
    ("blocks", "quantity", "cycle", "discount"),
    [((Block.ASIA, Block.EUROPE), 2, "month", Decimal("0.15")),
     ((Block.ASIA, Block.EUROPE), 2, "year", Decimal("0.15")),
     # 10.01 x 12 x 0.875 = 105.105: half-up gives 105.11 (banker's rounding would give 105.10)
     ((Block.AMERICAS,), 1, "year", Decimal("0.125"))])
async def test_subscription_amounts(stripe_server: LocalStripe, billing: BillingService,
                                    blocks: tuple[Block, ...], quantity: int,
                                    cycle: Literal["month", "year"], discount: Decimal) -> None:
    monthly = pricing.monthly_price(PRICES, blocks, quantity)
    amount = pricing.to_cents(pricing.cycle_amount(monthly, cycle, discount))
    if blocks == (Block.AMERICAS,):
        assert amount == 10511
    customer = stripe_server.create_customer()
    uid = new_uid()

    result = await subscribe(billing, uid, customer, amount, cycle, currency="usd",
                             quantity=quantity,
                             description=f"{quantity} seat(s) in {'+'.join(blocks)}")
    assert result.status == "active" and result.phase == "active" and result.created_now
    assert result.amount_cents == amount and result.interval == cycle
    assert result.current_period_end is not None

    subs = subs_for(stripe_server, uid)
    assert len(subs) == 1
    item = subs[0]["items"]["data"][0]
    assert item["plan"]["amount"] == amount and item["quantity"] == 1
    assert item["plan"]["interval"] == cycle
    invoices = stripe_server.list_all("invoices", subscription=subs[0]["id"])
    assert [(i["amount_paid"], i["status"]) for i in invoices] == [(amount, "paid")]
    days = (result.current_period_end - _created(subs[0])).days
    assert (days in range(28, 32)) if cycle == "month" else (days in (365, 366))


async def test_one_subscription_per_uid_even_after_a_crash(stripe_server: LocalStripe,
                                                           billing: BillingService) -> None:
    customer = stripe_server.create_customer()
    uid = new_uid()
    crashing = BillingService(stripe_server.billing_config())
    real_create = crashing.client.v1.subscriptions.create

    def create_then_crash(*args: Any, **kwargs: Any) -> Any:
        real_create(*args, **kwargs)
        raise KeyboardInterrupt("operator killed after the create")

    crashing.client.v1.subscriptions.create = create_then_crash  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        await subscribe(crashing, uid, customer)
    await crashing.close()

    results = [await subscribe(billing, uid, customer)
               for _ in range(3)]
    assert len({r.subscription_id for r in results}) == 1
    assert not any(r.created_now for r in results)
    assert len(subs_for(stripe_server, uid)) == 1
    # Two uids of one customer on one pool share the plan but not the subscription.
    other = await subscribe(billing, new_uid(), customer)
    assert other.subscription_id != results[0].subscription_id
    assert other.plan_id == results[0].plan_id
    assert len(stripe_server.list_all("plans")) == 1


async def test_declined_card_leaves_no_active_subscription(stripe_server: LocalStripe,
                                                           billing: BillingService) -> None:
    customer = stripe_server.create_customer(CARD_DECLINES_CHARGES)
    uid = new_uid()
    with pytest.raises(PaymentDeclined) as info:
        await subscribe(billing, uid, customer)
    err = info.value
    assert not err.retryable
    assert err.reason == "Your card was declined."
    assert err.subscription_id is not None

    subs = subs_for(stripe_server, uid)
    assert [s["status"] for s in subs] == ["incomplete"]
    assert (await billing.fetch_subscription(err.subscription_id)).phase == "past_due"

    # Retried on the same card: the same decline, no new subscription, no new charge attempt.
    pis_before = len(stripe_server.list_all("payment_intents"))
    with pytest.raises(PaymentDeclined):
        await subscribe(billing, uid, customer)
    assert len(subs_for(stripe_server, uid)) == 1
    assert len(stripe_server.list_all("payment_intents")) == pis_before

    # The customer adds a working card: the open first invoice is paid, same subscription.
    stripe_server.set_default_card(customer)
    result = await subscribe(billing, uid, customer)
    assert result.subscription_id == err.subscription_id
    assert result.phase == "active"
    assert len(subs_for(stripe_server, uid)) == 1


async def test_subscription_without_payment_method(stripe_server: LocalStripe,
                                                   billing: BillingService) -> None:
    customer = stripe_server.create_customer(payment_method=None)
    uid = new_uid()
    with pytest.raises(NoPaymentMethod):
        await subscribe(billing, uid, customer)
    assert subs_for(stripe_server, uid) == []
    stripe_server.set_default_card(customer)
    assert (await subscribe(billing, uid, customer)).phase == "active"


async def test_cancel_at_period_end_then_now(stripe_server: LocalStripe,
                                             billing: BillingService) -> None:
    customer = stripe_server.create_customer()
    uid = new_uid()
    sub = await subscribe(billing, uid, customer)
    assert sub.subscription_id is not None

    flagged = await billing.set_cancel_at_period_end(sub.subscription_id, True)
    assert flagged.cancel_at_period_end and flagged.phase == "active"
    assert flagged.current_period_end == sub.current_period_end
    assert (await billing.set_cancel_at_period_end(sub.subscription_id, True)) == flagged
    assert (await billing.fetch_subscription(sub.subscription_id)).cancel_at_period_end
    # ensure_subscription keeps returning the same (still active) subscription.
    assert (await subscribe(billing, uid, customer)
            ).subscription_id == sub.subscription_id

    unflagged = await billing.set_cancel_at_period_end(sub.subscription_id, False)
    assert not unflagged.cancel_at_period_end

    canceled = await billing.cancel_now(sub.subscription_id)
    assert canceled.status == "canceled" and canceled.phase == "canceled"
    assert (await billing.cancel_now(sub.subscription_id)).phase == "canceled"
    assert (await billing.set_cancel_at_period_end(sub.subscription_id, True)).phase == \
        "canceled"
    # Canceled on Stripe: never silently re-subscribed.
    again = await subscribe(billing, uid, customer)
    assert again.subscription_id == sub.subscription_id and again.phase == "canceled"
    assert len(subs_for(stripe_server, uid)) == 1
    found = await billing.find_subscription(uid, customer)
    assert found is not None and found.subscription_id == sub.subscription_id


async def test_fetch_unknown_subscription(billing: BillingService) -> None:
    with pytest.raises(NotFound):
        await billing.fetch_subscription("sub_doesnotexist")
    assert (await billing.cancel_now("sub_doesnotexist")).phase == "canceled"


# ---- webhooks -----------------------------------------------------------------------------------

async def test_localstripe_webhooks_are_verified_and_map_to_objects(
        stripe_server: LocalStripe, billing: BillingService,
        webhook_receiver: WebhookReceiver) -> None:
    customer = stripe_server.create_customer()
    uid = new_uid()
    fee = await billing.charge_reservation_fee(uid, customer, 100, "usd")
    sub = await subscribe(billing, uid, customer)

    fee_events = await wait_until(
        lambda: [e for e in webhook_receiver.of_type("payment_intent.succeeded")
                 if event_targets(e).payment_intent_id == fee.payment_intent_id],
        message="payment_intent.succeeded of the fee delivered")
    targets = event_targets(fee_events[0])
    info = await billing.fetch_payment_intent(targets.payment_intent_id)  # type: ignore[arg-type]
    assert info.paid and info.uid == uid and info.step == "reservation_fee"

    created = await wait_until(
        lambda: [e for e in webhook_receiver.of_type("customer.subscription.created")
                 if event_targets(e).subscription_id == sub.subscription_id],
        message="customer.subscription.created delivered")
    assert event_targets(created[0]).uid == uid
    paid = await wait_until(
        lambda: [e for e in webhook_receiver.of_type("invoice.payment_succeeded")
                 if event_targets(e).subscription_id == sub.subscription_id],
        message="invoice.payment_succeeded delivered")
    assert event_targets(paid[0]).customer_id == customer
    assert len({e["id"] for e in webhook_receiver.events}) == len(webhook_receiver.events)


async def test_each_event_handled_once_when_delivered_twice(
        stripe_server: LocalStripe, billing: BillingService,
        webhook_receiver: WebhookReceiver) -> None:
    # A second registration to the same receiver: localstripe posts every event twice.
    stripe_server.register_webhook("gpupool-test-twice", webhook_receiver.url, WEBHOOK_SECRET)
    customer = stripe_server.create_customer()
    fee = await billing.charge_reservation_fee(new_uid(), customer, 100, "usd")

    def fee_events() -> list[dict[str, Any]]:
        return [e for e in webhook_receiver.of_type("payment_intent.succeeded")
                if event_targets(e).payment_intent_id == fee.payment_intent_id]

    event_id = (await wait_until(fee_events, message="payment_intent.succeeded delivered"))[0]["id"]
    await wait_until(lambda: webhook_receiver.dedup.deliveries.get(event_id, 0) >= 2,
                     message="the second delivery arrived")
    assert len(fee_events()) == 1
    ids = [e["id"] for e in webhook_receiver.events]
    assert len(ids) == len(set(ids))

    body, headers = signed_event("customer.subscription.updated",
                                 {"id": "sub_x", "object": "subscription"}, WEBHOOK_SECRET)
    async with httpx.AsyncClient() as http:
        answers = [await http.post(webhook_receiver.url, content=body, headers=headers)
                   for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[1].json().get("duplicate") is True
    assert len(webhook_receiver.of_type("customer.subscription.updated")) == 1


async def test_bad_signature_is_refused_and_changes_nothing(
        webhook_receiver: WebhookReceiver) -> None:
    body, headers = signed_event("invoice.payment_failed",
                                 {"id": "in_x", "object": "invoice", "subscription": "sub_x"},
                                 "whsec_wrong")
    async with httpx.AsyncClient() as http:
        refused = await http.post(webhook_receiver.url, content=body, headers=headers)
        unsigned = await http.post(webhook_receiver.url, content=body)
        good_body, good_headers = signed_event("invoice.payment_failed",
                                               {"id": "in_x", "object": "invoice",
                                                "subscription": "sub_x"}, WEBHOOK_SECRET)
        tampered = await http.post(webhook_receiver.url, content=good_body + b" ",
                                   headers=good_headers)
    assert [refused.status_code, unsigned.status_code, tampered.status_code] == [400, 400, 400]
    assert webhook_receiver.events == []
    assert len(webhook_receiver.dedup) == 0


async def test_failed_handler_lets_the_redelivery_through(
        webhook_receiver: WebhookReceiver) -> None:
    body, headers = signed_event("invoice.paid", {"id": "in_y", "object": "invoice",
                                                  "subscription": "sub_y"}, WEBHOOK_SECRET)
    webhook_receiver.fail_next = 1
    async with httpx.AsyncClient() as http:
        first = await http.post(webhook_receiver.url, content=body, headers=headers)
        second = await http.post(webhook_receiver.url, content=body, headers=headers)
    assert (first.status_code, second.status_code) == (500, 200)
    assert [event_targets(e).subscription_id for e in webhook_receiver.events] == ["sub_y"]


# ---- helpers ------------------------------------------------------------------------------------

def _default_pm(server: LocalStripe, customer: str) -> str:
    cus = server.client.v1.customers.retrieve(customer).to_dict()
    return str(cus["invoice_settings"]["default_payment_method"])


def _created(sub: dict[str, Any]) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(sub["start_date"], tz=UTC)
