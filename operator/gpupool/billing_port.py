"""What the reconciles need from billing. ``gpupool.billing`` implements it with Stripe;
``NoBilling`` serves internal platforms where charge steps succeed at once."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Protocol


@dataclass(frozen=True)
class Outcome:
    ok: bool
    id: str | None = None
    status: str | None = None
    """Stripe subscription status when known (active, past_due, incomplete, canceled...)."""
    current_period_end: datetime | None = None
    reason: str | None = None
    """Human reason of a refusal (a card decline), for a condition."""


class Billing(Protocol):
    enabled: bool

    async def has_payment_method(self, customer_id: str) -> bool: ...

    async def charge_reservation(self, uid: str, customer_id: str, amount: Decimal,
                                 currency: str, description: str) -> Outcome: ...

    async def ensure_subscription(self, uid: str, customer_id: str, pool: str, amount: Decimal,
                                  currency: str, interval: str, description: str) -> Outcome: ...

    async def fetch_subscription(self, subscription_id: str) -> Outcome: ...

    async def retry_past_due(self, subscription_id: str, customer_id: str, uid: str) -> Outcome:
        """Pay a past_due subscription's open invoice once with a new default card."""

    async def set_cancel_at_period_end(self, subscription_id: str, flag: bool) -> None: ...

    async def cancel_now(self, subscription_id: str) -> None: ...


class NoBilling:
    enabled = False

    async def has_payment_method(self, customer_id: str) -> bool:
        return True

    async def charge_reservation(self, uid: str, customer_id: str, amount: Decimal,
                                 currency: str, description: str) -> Outcome:
        return Outcome(ok=True)

    async def ensure_subscription(self, uid: str, customer_id: str, pool: str, amount: Decimal,
                                  currency: str, interval: str, description: str) -> Outcome:
        return Outcome(ok=True, status="active")

    async def fetch_subscription(self, subscription_id: str) -> Outcome:
        return Outcome(ok=True, status="active")

    async def retry_past_due(self, subscription_id: str, customer_id: str, uid: str) -> Outcome:
        return Outcome(ok=True, status="active")

    async def set_cancel_at_period_end(self, subscription_id: str, flag: bool) -> None:
        return None

    async def cancel_now(self, subscription_id: str) -> None:
        return None
