"""Phase mapping, the current_period_end reader (both API shapes) and result records."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import stripe

from gpupool.billing import SubscriptionResult, current_period_end, phase_for_status

PERIOD_END = 1_795_000_000  # 2026-11-18T...


@pytest.mark.parametrize(("status", "phase"), [
    ("active", "active"),
    ("trialing", "active"),
    ("past_due", "past_due"),
    ("unpaid", "past_due"),
    ("incomplete", "past_due"),  # a declined first payment is never active
    ("paused", "past_due"),
    ("canceled", "canceled"),
    ("incomplete_expired", "canceled"),
    ("something_new", "past_due"),  # unknown: fail closed
    (None, "past_due"),
])
def test_phase_for_status(status: str | None, phase: str) -> None:
    assert phase_for_status(status) == phase


def test_period_end_on_the_subscription() -> None:
    """API versions before 2025-03-31 and localstripe."""
    assert current_period_end({"id": "sub_1", "current_period_end": PERIOD_END,
                               "items": {"data": [{"id": "si_1"}]}}) == PERIOD_END


def test_period_end_on_the_items() -> None:
    """2025-03-31.basil and later: only the items carry it; the earliest one counts."""
    sub = {"id": "sub_1", "items": {"object": "list", "data": [
        {"id": "si_1", "current_period_end": PERIOD_END + 86400},
        {"id": "si_2", "current_period_end": PERIOD_END},
    ]}}
    assert current_period_end(sub) == PERIOD_END


def test_period_end_absent() -> None:
    assert current_period_end({"id": "sub_1"}) is None
    assert current_period_end({"id": "sub_1", "items": {"data": []}}) is None
    assert current_period_end({"id": "sub_1", "current_period_end": None,
                               "items": {"data": [{"current_period_end": None}]}}) is None


def test_period_end_reads_stripe_objects() -> None:
    sub = stripe.Subscription.construct_from(
        {"id": "sub_1", "object": "subscription",
         "items": {"object": "list", "data": [{"id": "si_1", "object": "subscription_item",
                                                "current_period_end": PERIOD_END}]}},
        "sk_test_x")
    assert current_period_end(sub) == PERIOD_END  # type: ignore[arg-type]


def test_result_from_an_old_shape_subscription() -> None:
    result = SubscriptionResult.from_stripe({
        "id": "sub_1", "status": "active", "customer": "cus_1", "cancel_at_period_end": True,
        "current_period_end": PERIOD_END, "latest_invoice": "in_1",
        "items": {"data": [{"id": "si_1", "quantity": 1, "plan": {
            "id": "plan_1", "amount": 3900, "currency": "usd", "interval": "month"}}]},
    })
    assert result.subscription_id == "sub_1"
    assert result.phase == "active"
    assert result.cancel_at_period_end
    assert result.current_period_end == datetime.fromtimestamp(PERIOD_END, tz=UTC)
    assert (result.plan_id, result.amount_cents, result.currency, result.interval) == \
        ("plan_1", 3900, "usd", "month")
    assert result.latest_invoice_id == "in_1"
    assert result.as_status() == {
        "subscriptionId": "sub_1", "subscriptionStatus": "active",
        "currentPeriodEnd": datetime.fromtimestamp(PERIOD_END, tz=UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"),
        "cancelAtPeriodEnd": True,
    }


def test_result_from_a_new_shape_subscription() -> None:
    result = SubscriptionResult.from_stripe({
        "id": "sub_2", "status": "past_due", "customer": {"id": "cus_2"},
        "latest_invoice": {"id": "in_2"},
        "items": {"data": [{"id": "si_1", "current_period_end": PERIOD_END,
                            "price": {"id": "price_1", "unit_amount": 135660,
                                      "currency": "usd", "recurring": {"interval": "year"}}}]},
    })
    assert result.phase == "past_due"
    assert result.customer_id == "cus_2" and result.latest_invoice_id == "in_2"
    assert result.current_period_end == datetime.fromtimestamp(PERIOD_END, tz=UTC)
    assert (result.amount_cents, result.interval) == (135660, "year")
    assert result.as_status()["currentPeriodEnd"].endswith("Z")


def test_result_without_period_end() -> None:
    result = SubscriptionResult.from_stripe({"id": "sub_3", "status": "incomplete"})
    assert result.current_period_end is None
    assert result.as_status()["currentPeriodEnd"] is None
    assert result.phase == "past_due"
