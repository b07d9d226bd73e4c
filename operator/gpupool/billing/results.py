"""What a billing step tells the operator to record, and the pure readers behind it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

BillingPhase = Literal["active", "past_due", "canceled"]
ChargeState = Literal["succeeded", "processing"]

# Stripe subscription status -> gpupool phase. ``incomplete`` is the first invoice not paid (a
# declined card at creation): never active. ``paused`` (trial ended without a payment method)
# has no working payment either.
_PHASES: dict[str, BillingPhase] = {
    "active": "active",
    "trialing": "active",
    "past_due": "past_due",
    "unpaid": "past_due",
    "incomplete": "past_due",
    "paused": "past_due",
    "canceled": "canceled",
    "incomplete_expired": "canceled",
}

LIVE_STATUSES = frozenset({"active", "trialing", "past_due", "unpaid", "paused"})
ENDED_STATUSES = frozenset({"canceled", "incomplete_expired"})


def phase_for_status(status: str | None) -> BillingPhase:
    """The gpupool phase for a Stripe subscription status. Unknown statuses fail closed."""
    return _PHASES.get(status or "", "past_due")


def _field(obj: Any, key: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key)
    try:
        return obj[key]
    except (KeyError, TypeError, IndexError):
        return None


def current_period_end(subscription: Mapping[str, Any]) -> int | None:
    """Unix time the paid period ends.

    Older API versions (and localstripe) carry ``current_period_end`` on the subscription; since
    2025-03-31.basil it lives on each subscription item (``items.data[].current_period_end``).
    With several items the subscription is paid until the earliest of them ends.
    """
    top = _as_int(_field(subscription, "current_period_end"))
    if top is not None:
        return top
    items = _field(subscription, "items")
    data = _field(items, "data") if items is not None else None
    if not isinstance(data, list):
        return None
    ends = [end for item in data
            if (end := _as_int(_field(item, "current_period_end"))) is not None]
    return min(ends) if ends else None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def to_datetime(ts: int | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=UTC)


def format_time(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with a Z, as Kubernetes writes times."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ChargeResult:
    """Outcome of a one-off charge (the reservation fee).

    ``state`` is ``succeeded`` (money taken, do not charge again) or ``processing`` (an
    asynchronous method is still settling: record the id, re-check later). Declines raise
    :class:`~gpupool.billing.errors.PaymentDeclined` instead. ``skipped`` is true when billing is
    off and nothing was charged.
    """

    state: ChargeState
    payment_intent_id: str | None = None
    amount_cents: int | None = None
    currency: str | None = None
    created_now: bool = False
    skipped: bool = False

    def as_status(self) -> dict[str, Any]:
        return {"paymentIntentId": self.payment_intent_id, "state": self.state}


@dataclass(frozen=True)
class SubscriptionResult:
    """A Stripe subscription as the operator should record it.

    ``phase`` is the gpupool phase Stripe's ``status`` implies (:func:`phase_for_status`).
    ``current_period_end`` is None when unknown (or when billing is off).
    """

    subscription_id: str | None
    status: str
    phase: BillingPhase
    current_period_end: datetime | None = None
    cancel_at_period_end: bool = False
    customer_id: str | None = None
    plan_id: str | None = None
    amount_cents: int | None = None
    currency: str | None = None
    interval: str | None = None
    latest_invoice_id: str | None = None
    failure_reason: str | None = None
    created_now: bool = False
    skipped: bool = False

    @classmethod
    def from_stripe(cls, sub: Mapping[str, Any], *, created_now: bool = False,
                    failure_reason: str | None = None) -> SubscriptionResult:
        status = str(sub.get("status") or "")
        items = _field(sub.get("items"), "data") if sub.get("items") is not None else None
        first = items[0] if isinstance(items, list) and items else {}
        # A plan (legacy Plans API, used here) or a price (newer integrations).
        plan = _field(first, "plan") or _field(first, "price") or sub.get("plan")
        plan = plan if isinstance(plan, Mapping) else {}
        amount = _as_int(plan.get("amount"))
        return cls(
            subscription_id=sub.get("id"),
            status=status,
            phase=phase_for_status(status),
            current_period_end=to_datetime(current_period_end(sub)),
            cancel_at_period_end=bool(sub.get("cancel_at_period_end")),
            customer_id=_id_of(sub.get("customer")),
            plan_id=_id_of(plan),
            amount_cents=amount if amount is not None else _as_int(plan.get("unit_amount")),
            currency=plan.get("currency"),
            interval=plan.get("interval") or _field(plan.get("recurring"), "interval"),
            latest_invoice_id=_id_of(sub.get("latest_invoice")),
            failure_reason=failure_reason,
            created_now=created_now,
        )

    def as_status(self) -> dict[str, Any]:
        """camelCase fields for the Subscription's status."""
        return {
            "subscriptionId": self.subscription_id,
            "subscriptionStatus": self.status,
            "currentPeriodEnd": format_time(self.current_period_end),
            "cancelAtPeriodEnd": self.cancel_at_period_end,
        }


def _id_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, Mapping):
        ident = value.get("id")
        return ident if isinstance(ident, str) else None
    return None
