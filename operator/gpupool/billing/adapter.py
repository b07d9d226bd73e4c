"""The operator's billing port implemented with the Stripe service layer.

Retryable Stripe trouble (network, 5xx, 429) becomes ``RetryLater`` so the work queue tries the
step again after the delay; card and request errors become an ``Outcome`` with a reason for a
status condition. No raw Stripe exception reaches a reconcile.
"""

from __future__ import annotations

from collections.abc import Awaitable
from decimal import Decimal

from gpupool.billing.config import BillingConfig
from gpupool.billing.errors import (
    BillingError,
    NotFound,
    PaymentDeclined,
    RetryableBillingError,
)
from gpupool.billing.results import SubscriptionResult
from gpupool.billing.service import BillingService
from gpupool.billing_port import Outcome
from gpupool.metrics import Metrics
from gpupool.pricing import to_cents
from gpupool.workqueue import RetryLater


class StripeBilling:
    enabled = True

    def __init__(self, service: BillingService, config: BillingConfig,
                 metrics: Metrics | None = None) -> None:
        self.service = service
        self.config = config
        self.metrics = metrics or Metrics()

    @classmethod
    def from_env(cls) -> StripeBilling:
        config = BillingConfig.from_env()
        return cls(BillingService(config), config)

    def _count(self, op: str, outcome: str) -> None:
        self.metrics.stripe_call(op, outcome)

    async def has_payment_method(self, customer_id: str) -> bool:
        try:
            ok = await self.service.has_default_payment_method(customer_id)
        except RetryableBillingError as exc:
            self._count("payment_method", "retry")
            raise RetryLater(exc.delay, exc.reason) from None
        except BillingError:
            self._count("payment_method", "error")
            return False
        self._count("payment_method", "ok")
        return ok

    async def charge_reservation(self, uid: str, customer_id: str, amount: Decimal,
                                 currency: str, description: str) -> Outcome:
        try:
            result = await self.service.charge_reservation_fee(
                uid, customer_id, to_cents(amount), currency, description=description)
        except RetryableBillingError as exc:
            self._count("reservation_fee", "retry")
            raise RetryLater(exc.delay, exc.reason) from None
        except PaymentDeclined as exc:
            self._count("reservation_fee", "declined")
            return Outcome(ok=False, id=exc.payment_intent_id, reason=exc.reason)
        except BillingError as exc:
            self._count("reservation_fee", "error")
            return Outcome(ok=False, reason=exc.reason)
        if result.state != "succeeded":
            self._count("reservation_fee", "processing")
            raise RetryLater(10, f"reservation fee {result.state}")
        self._count("reservation_fee", "ok")
        return Outcome(ok=True, id=result.payment_intent_id)

    async def ensure_subscription(self, uid: str, customer_id: str, pool: str, amount: Decimal,
                                  currency: str, interval: str, description: str) -> Outcome:
        try:
            result = await self.service.ensure_subscription(
                uid, customer_id, pool_key=pool, pool_name=pool.rsplit("/", 1)[-1],
                amount_cents=to_cents(amount), currency=currency,
                interval="year" if interval == "year" else "month", description=description)
        except RetryableBillingError as exc:
            self._count("subscription", "retry")
            raise RetryLater(exc.delay, exc.reason) from None
        except PaymentDeclined as exc:
            self._count("subscription", "declined")
            return Outcome(ok=False, id=exc.subscription_id, status="incomplete",
                           reason=exc.reason)
        except BillingError as exc:
            self._count("subscription", "error")
            return Outcome(ok=False, reason=exc.reason)
        self._count("subscription", "ok")
        return Outcome(ok=True, id=result.subscription_id, status=result.status,
                       current_period_end=result.current_period_end,
                       reason=result.failure_reason)

    async def fetch_subscription(self, subscription_id: str) -> Outcome:
        return await self._read("fetch", subscription_id,
                                self.service.fetch_subscription(subscription_id))

    async def retry_past_due(self, subscription_id: str, customer_id: str, uid: str) -> Outcome:
        return await self._read("retry_past_due", subscription_id,
                                self.service.retry_past_due(subscription_id, customer_id, uid))

    async def _read(self, op: str, subscription_id: str,
                    call: Awaitable[SubscriptionResult]) -> Outcome:
        """A subscription as Stripe has it now; one it does not know has ended."""
        try:
            result = await call
        except RetryableBillingError as exc:
            self._count(op, "retry")
            raise RetryLater(exc.delay, exc.reason) from None
        except NotFound:
            self._count(op, "not_found")
            return Outcome(ok=True, id=subscription_id, status="canceled")
        except BillingError as exc:
            self._count(op, "error")
            raise RetryLater(60, exc.reason) from None
        self._count(op, "ok")
        return Outcome(ok=True, id=result.subscription_id, status=result.status,
                       current_period_end=result.current_period_end,
                       reason=result.failure_reason)

    async def set_cancel_at_period_end(self, subscription_id: str, flag: bool) -> None:
        try:
            await self.service.set_cancel_at_period_end(subscription_id, flag)
        except RetryableBillingError as exc:
            raise RetryLater(exc.delay, exc.reason) from None
        self._count("cancel_at_period_end", "ok")

    async def cancel_now(self, subscription_id: str) -> None:
        try:
            await self.service.cancel_now(subscription_id)
        except RetryableBillingError as exc:
            raise RetryLater(exc.delay, exc.reason) from None
        self._count("cancel_now", "ok")

    async def close(self) -> None:
        await self.service.close()
