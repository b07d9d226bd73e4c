"""The Stripe steps the operator calls from its reconcile: idempotent, crash-safe, keyed by CR uid.

Exactly-once, in layers:

1. Before creating anything that moves money, look for what an earlier (possibly crashed) run
   made: objects carry ``metadata.gpupool_uid`` / ``gpupool_step`` and are found by *listing* the
   customer's objects (lists are read-after-write consistent; Stripe's search API is not, and
   localstripe has none).
2. Every money-moving create also carries an idempotency key ``gpupool-<uid>-<step>`` (later
   attempts after a decline append ``-<n>``), which covers a create whose answer was lost within
   Stripe's ~24 h window. localstripe ignores the key, so (1) is what tests exercise.
3. The operator records the step's outcome (ids) in status and does not call it again.

stripe-python is synchronous: each step runs as one unit in a small thread pool and the public
methods are ``async``. Every ``stripe`` exception is classified (:mod:`gpupool.billing.errors`).
Calls for the same uid are serialised inside one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import stripe
from stripe.params import (
    PaymentIntentCreateParams,
    PlanCreateParams,
    ProductCreateParams,
    SubscriptionCreateParams,
)

from gpupool.billing.config import BillingConfig
from gpupool.billing.errors import (
    BillingError,
    NoPaymentMethod,
    NotFound,
    PaymentDeclined,
    PermanentBillingError,
    RetryableBillingError,
    classify,
)
from gpupool.billing.results import (
    ENDED_STATUSES,
    LIVE_STATUSES,
    ChargeResult,
    SubscriptionResult,
    phase_for_status,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

META_UID = "gpupool_uid"
META_STEP = "gpupool_step"
META_ATTEMPT = "gpupool_attempt"
STEP_RESERVATION_FEE = "reservation_fee"
STEP_SUBSCRIPTION = "subscription"
STEP_RENEWAL = "renewal"

Interval = Literal["month", "year"]

_PAID_PI = frozenset({"succeeded", "requires_capture"})
_PENDING_PI = frozenset({"processing"})
_AUTH_REASON = ("The card needs the customer to authenticate this payment; "
                "add a card that can be charged without them")


def idempotency_key(uid: str, step: str, attempt: int = 1) -> str:
    """``gpupool-<uid>-<step>``; a later attempt (after a decline) gets ``-<attempt>``."""
    base = f"gpupool-{uid}-{step}"
    return base if attempt <= 1 else f"{base}-{attempt}"


def catalog_ids(pool_key: str, interval: str, amount_cents: int,
                currency: str) -> tuple[str, str]:
    """Deterministic (product id, plan id) for a pool's price point.

    Plans are immutable in amount, currency and interval, so those are part of the id; a pool
    charging two amounts has two plans under one product. Creating with a known id makes the
    catalog step idempotent without any search.
    """
    slug = re.sub(r"[^A-Za-z0-9_]+", "-", pool_key).strip("-")[:40] or "pool"
    digest = hashlib.sha256(pool_key.encode()).hexdigest()[:10]
    product = f"gpupool-{slug}-{digest}"
    return product, f"{product}-{interval}-{amount_cents}{currency.lower()}"


@dataclass(frozen=True)
class PaymentIntentInfo:
    """A PaymentIntent re-fetched after a webhook."""

    payment_intent_id: str
    status: str
    uid: str | None
    step: str | None
    amount_cents: int | None
    currency: str | None
    failure_reason: str | None

    @property
    def paid(self) -> bool:
        return self.status in _PAID_PI


@dataclass(frozen=True)
class _PaymentMethod:
    id: str
    type: str


def _plain(obj: Any) -> dict[str, Any]:
    if isinstance(obj, stripe.StripeObject):
        return obj.to_dict()
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"unexpected Stripe answer of type {type(obj).__name__}")


def _id_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, Mapping):
        ident = value.get("id")
        return ident if isinstance(ident, str) else None
    return None


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _attempt_of(obj: Mapping[str, Any]) -> int:
    raw = _meta(obj).get(META_ATTEMPT)
    try:
        return int(raw) if raw is not None else 1
    except (TypeError, ValueError):
        return 1


def _order(obj: Mapping[str, Any]) -> tuple[int, int, str]:
    created = obj.get("created")
    return (_attempt_of(obj), created if isinstance(created, int) else 0, str(obj.get("id")))


def _failed_payment_method(pi: Mapping[str, Any]) -> str | None:
    """The payment method an unsuccessful attempt used.

    Real Stripe clears ``payment_method`` after a failure and keeps it in
    ``last_payment_error.payment_method``; localstripe keeps it on the PaymentIntent.
    """
    error = pi.get("last_payment_error")
    if isinstance(error, Mapping):
        pm = _id_of(error.get("payment_method"))
        if pm:
            return pm
    return _id_of(pi.get("payment_method"))


def _failure_reason(pi: Mapping[str, Any] | None, fallback: str) -> tuple[str, str | None,
                                                                           str | None]:
    """(human reason, code, decline_code) of an unsuccessful PaymentIntent."""
    if pi is None:
        return fallback, None, None
    error = pi.get("last_payment_error")
    if isinstance(error, Mapping):
        message = error.get("message")
        code = error.get("code") if isinstance(error.get("code"), str) else None
        decline = error.get("decline_code") if isinstance(error.get("decline_code"), str) else None
        if isinstance(message, str) and message.strip():
            return message.strip(), code, decline
        return fallback, code, decline
    if pi.get("status") == "requires_action":
        return _AUTH_REASON, "authentication_required", None
    return fallback, None, None


_COMPAT_PI_LIST_ALL = "payment_intents.list without customer filter"
_COMPAT_PI_METHOD_TYPES = "payment_intents.create with payment_method_types"


def _refused_parameter(err: BillingError, param: str) -> bool:
    """localstripe's answer to a parameter it does not implement: 400 "Unexpected <param>"."""
    return err.http_status == 400 and f"Unexpected {param}" in err.reason


def _is_conflict(err: BillingError) -> bool:
    return err.http_status == 409 or err.code == "resource_already_exists"


class BillingService:
    """Stripe steps for one operator process. Create once; ``await close()`` at shutdown."""

    def __init__(self, config: BillingConfig, *,
                 client: stripe.StripeClient | None = None) -> None:
        self.config = config
        self._client: stripe.StripeClient | None = client
        if client is None and config.enabled:
            base = {"api": config.api_base.rstrip("/")} if config.api_base else None
            self._client = stripe.StripeClient(
                cast(str, config.api_key),
                base_addresses=base,  # type: ignore[arg-type]
                max_network_retries=config.max_network_retries,
                http_client=stripe.RequestsClient(timeout=config.timeout_seconds),
            )
        self._executor: ThreadPoolExecutor | None = None
        # Parameters the server turned out not to implement (localstripe), learnt at runtime.
        self._compat: set[str] = set()
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary())

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def client(self) -> stripe.StripeClient:
        if self._client is None:
            raise RuntimeError("billing is disabled: no Stripe API key configured")
        return self._client

    async def close(self) -> None:
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(executor.shutdown, wait=True))

    # ---- plumbing ---------------------------------------------------------------------------

    async def _run(self, lock_key: str | None, fn: Callable[..., T], *args: Any,
                   **kwargs: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.config.max_workers,
                                                thread_name_prefix="gpupool-stripe")
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs)
        if lock_key is None:
            return await loop.run_in_executor(self._executor, call)
        lock = self._locks.get(lock_key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[lock_key] = lock
        async with lock:
            # Shielded: if the caller is cancelled the thread still finishes its step, and the
            # lock is held until it has (a retry must not overlap a create in flight).
            future = loop.run_in_executor(self._executor, call)
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                await asyncio.wait([future])
                raise

    @staticmethod
    def _call(doing: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return _plain(fn(*args, **kwargs))
        except stripe.StripeError as exc:
            raise classify(exc, doing=doing) from None

    def _list(self, doing: str, fn: Callable[..., Any], params: dict[str, Any]
              ) -> list[dict[str, Any]]:
        try:
            page = fn(params=params)
            return [_plain(item) for item in page.auto_paging_iter()]
        except stripe.StripeError as exc:
            raise classify(exc, doing=doing) from None

    # ---- customers --------------------------------------------------------------------------

    def _default_payment_method(self, customer_id: str) -> _PaymentMethod | None:
        customer = self._call(
            "Reading the Stripe customer", self.client.v1.customers.retrieve, customer_id,
            params={"expand": ["invoice_settings.default_payment_method"]})
        if customer.get("deleted"):
            raise NotFound(f"Stripe customer {customer_id} was deleted")
        settings = customer.get("invoice_settings")
        pm = settings.get("default_payment_method") if isinstance(settings, Mapping) else None
        if isinstance(pm, Mapping) and _id_of(pm):
            return _PaymentMethod(cast(str, _id_of(pm)), str(pm.get("type") or "card"))
        if isinstance(pm, str) and pm:
            return _PaymentMethod(pm, "card")
        source = customer.get("default_source")
        if _id_of(source):
            # A legacy card/source; PaymentIntents accept its id as payment_method.
            return _PaymentMethod(cast(str, _id_of(source)), "card")
        return None

    async def has_default_payment_method(self, customer_id: str) -> bool:
        """Whether the customer has a default payment method to charge off-session.

        Billing off: always true. Raises :class:`NotFound` for an unknown or deleted customer.
        """
        if not self.enabled:
            return True
        return await self._run(None, self._default_payment_method, customer_id) is not None

    # ---- reservation fee --------------------------------------------------------------------

    def _payment_intents_for(self, customer_id: str, uid: str, step: str
                             ) -> list[dict[str, Any]]:
        doing = "Listing the customer's payments"
        items: list[dict[str, Any]] | None = None
        if _COMPAT_PI_LIST_ALL not in self._compat:
            try:
                items = self._list(doing, self.client.v1.payment_intents.list,
                                   {"customer": customer_id, "limit": 100})
            except PermanentBillingError as err:
                # A server that cannot filter payments by customer (localstripe): list them
                # all and filter here.
                if not _refused_parameter(err, "customer"):
                    raise
                self._compat.add(_COMPAT_PI_LIST_ALL)
        if items is None:
            items = self._list(doing, self.client.v1.payment_intents.list, {"limit": 100})
        found = [pi for pi in items
                 if _id_of(pi.get("customer")) == customer_id
                 and _meta(pi).get(META_UID) == uid and _meta(pi).get(META_STEP) == step]
        return sorted(found, key=_order)

    def _charge_result(self, pi: Mapping[str, Any], *, created_now: bool) -> ChargeResult:
        status = pi.get("status")
        pid = cast(str, pi.get("id"))
        if status in _PAID_PI or status in _PENDING_PI:
            return ChargeResult(state="succeeded" if status in _PAID_PI else "processing",
                                payment_intent_id=pid, amount_cents=pi.get("amount"),
                                currency=pi.get("currency"), created_now=created_now)
        reason, code, decline = _failure_reason(pi, "The payment failed")
        raise PaymentDeclined(reason, code=code, decline_code=decline, payment_intent_id=pid,
                              payment_method_id=_failed_payment_method(pi))

    def _charge_fee(self, uid: str, customer_id: str, amount_cents: int, currency: str,
                    step: str, description: str | None,
                    metadata: Mapping[str, str] | None) -> ChargeResult:
        earlier = self._payment_intents_for(customer_id, uid, step)
        for pi in earlier:
            if pi.get("status") in _PAID_PI or pi.get("status") in _PENDING_PI:
                return self._charge_result(pi, created_now=False)

        pm = self._default_payment_method(customer_id)
        if pm is None:
            raise NoPaymentMethod(customer_id)

        if earlier:
            last = earlier[-1]
            if _failed_payment_method(last) == pm.id:
                # Same card as the attempt that failed: report that failure, charge nothing.
                return self._charge_result(last, created_now=False)
            # A new card: close the earlier attempts so none of them can still succeed later.
            for pi in earlier:
                if pi.get("status") not in ("canceled",):
                    try:
                        self._call("Closing an earlier payment attempt",
                                   self.client.v1.payment_intents.cancel, cast(str, pi["id"]))
                    except BillingError as err:
                        raise RetryableBillingError(
                            f"{err.reason} (will look again)", kind="conflict",
                            delay=5.0) from None

        attempt = max((_attempt_of(pi) for pi in earlier), default=0) + 1
        meta = {**(metadata or {}), META_UID: uid, META_STEP: step, META_ATTEMPT: str(attempt)}
        if description:
            meta["gpupool_description"] = description[:500]
        params: PaymentIntentCreateParams = {
            "amount": amount_cents,
            "currency": currency.lower(),
            "customer": customer_id,
            "payment_method": pm.id,
            "confirm": True,
            "off_session": True,
            "metadata": meta,
        }
        if _COMPAT_PI_METHOD_TYPES in self._compat:
            cast(dict[str, Any], params)["payment_method_types"] = [pm.type]
        else:
            # Dynamic payment methods without redirects: no return_url needed off-session.
            # (``payment_method_types`` is refused from API version 2026-09-30 on.)
            params["automatic_payment_methods"] = {"enabled": True, "allow_redirects": "never"}
        key = idempotency_key(uid, step, attempt)
        log.info("charging %s %s to customer %s for %s/%s (attempt %d)",
                 amount_cents, currency, customer_id, uid, step, attempt)
        try:
            try:
                pi = self._call("Charging the reservation fee",
                                self.client.v1.payment_intents.create,
                                params=params, options={"idempotency_key": key})
            except PermanentBillingError as err:
                if not _refused_parameter(err, "automatic_payment_methods"):
                    raise
                # A server without dynamic payment methods (localstripe) refuses the parameter
                # before creating anything: name the payment method type instead.
                self._compat.add(_COMPAT_PI_METHOD_TYPES)
                legacy = cast(dict[str, Any], dict(params))
                legacy.pop("automatic_payment_methods", None)
                legacy["payment_method_types"] = [pm.type]
                pi = self._call("Charging the reservation fee",
                                self.client.v1.payment_intents.create,
                                params=legacy, options={"idempotency_key": key})
        except PaymentDeclined as err:
            err.payment_method_id = err.payment_method_id or pm.id
            if err.payment_intent_id is None:  # real Stripe names it in the error; others not
                with contextlib.suppress(BillingError):
                    made = [p for p in self._payment_intents_for(customer_id, uid, step)
                            if _attempt_of(p) == attempt]
                    err.payment_intent_id = _id_of(made[-1]) if made else None
            raise
        return self._charge_result(pi, created_now=True)

    async def charge_reservation_fee(self, uid: str, customer_id: str, amount_cents: int,
                                     currency: str = "usd", *,
                                     step: str = STEP_RESERVATION_FEE,
                                     description: str | None = None,
                                     metadata: Mapping[str, str] | None = None) -> ChargeResult:
        """Charge a one-off fee once per (uid, step), off-session, to the default payment method.

        Finds an earlier PaymentIntent of this uid and step first (paid or settling: returned as
        is). After a decline the same card is not charged again (the decline is raised again);
        a changed default card gets a new attempt, and earlier attempts are cancelled first.
        Raises :class:`NoPaymentMethod`, :class:`PaymentDeclined`, or another
        :class:`BillingError`. Billing off, or a zero amount: succeeds with no call.
        """
        if amount_cents < 0:
            raise ValueError("amount_cents must not be negative")
        if not self.enabled or amount_cents == 0:
            return ChargeResult(state="succeeded", amount_cents=amount_cents,
                                currency=currency.lower(), skipped=True)
        return await self._run(f"{uid}/{step}", self._charge_fee, uid, customer_id,
                               amount_cents, currency, step, description, metadata)

    async def find_reservation_fee(self, uid: str, customer_id: str, *,
                                   step: str = STEP_RESERVATION_FEE) -> ChargeResult | None:
        """The paid (or settling) fee PaymentIntent of this uid and step, if any; no charge."""
        if not self.enabled:
            return None

        def find() -> ChargeResult | None:
            for pi in self._payment_intents_for(customer_id, uid, step):
                if pi.get("status") in _PAID_PI or pi.get("status") in _PENDING_PI:
                    return self._charge_result(pi, created_now=False)
            return None

        return await self._run(f"{uid}/{step}", find)

    async def fetch_payment_intent(self, payment_intent_id: str) -> PaymentIntentInfo:
        """Re-read a PaymentIntent (after a webhook) instead of trusting the event payload."""
        if not self.enabled:
            raise RuntimeError("billing is disabled")
        pi = await self._run(None, self._call, "Reading the payment",
                             self.client.v1.payment_intents.retrieve, payment_intent_id)
        status = str(pi.get("status") or "")
        reason = None
        if status not in _PAID_PI and status not in _PENDING_PI:
            reason = _failure_reason(pi, "The payment failed")[0]
        meta = _meta(pi)
        return PaymentIntentInfo(payment_intent_id=str(pi.get("id")), status=status,
                                 uid=meta.get(META_UID), step=meta.get(META_STEP),
                                 amount_cents=pi.get("amount"), currency=pi.get("currency"),
                                 failure_reason=reason)

    # ---- catalog ----------------------------------------------------------------------------

    def _ensure_product(self, product_id: str, name: str, pool_key: str) -> None:
        try:
            self._call("Reading the Stripe product", self.client.v1.products.retrieve,
                       product_id)
            return
        except NotFound:
            pass
        params: ProductCreateParams = {"id": product_id, "name": name[:250] or product_id,
                                       "metadata": {"gpupool_pool": pool_key[:500]}}
        try:
            self._call("Creating the Stripe product", self.client.v1.products.create,
                       params=params)
        except BillingError as err:
            if not _is_conflict(err):
                raise

    def _ensure_plan(self, pool_key: str, pool_name: str, amount_cents: int, currency: str,
                     interval: str, nickname: str | None) -> dict[str, Any]:
        product_id, plan_id = catalog_ids(pool_key, interval, amount_cents, currency)
        try:
            plan = self._call("Reading the Stripe plan", self.client.v1.plans.retrieve, plan_id)
        except NotFound:
            self._ensure_product(product_id, f"GPU pool {pool_name}", pool_key)
            params: PlanCreateParams = {
                "id": plan_id, "product": product_id, "amount": amount_cents,
                "currency": currency.lower(), "interval": interval,
                "metadata": {"gpupool_pool": pool_key[:500]},
            }
            if nickname:
                params["nickname"] = nickname[:250]
            try:
                plan = self._call("Creating the Stripe plan", self.client.v1.plans.create,
                                  params=params)
            except BillingError as err:
                if not _is_conflict(err):
                    raise
                plan = self._call("Reading the Stripe plan", self.client.v1.plans.retrieve,
                                  plan_id)
        if (plan.get("amount") != amount_cents or str(plan.get("currency")).lower()
                != currency.lower() or plan.get("interval") != interval):
            raise PermanentBillingError(
                f"Stripe plan {plan_id} does not match {amount_cents} {currency}/{interval}",
                kind="catalog")
        if plan.get("active") is False:
            plan = self._call("Reactivating the Stripe plan", self.client.v1.plans.update,
                              plan_id, params={"active": True})
        return plan

    # ---- subscriptions ----------------------------------------------------------------------

    def _subscriptions_for(self, customer_id: str, uid: str) -> list[dict[str, Any]]:
        items = self._list("Listing the customer's subscriptions",
                           self.client.v1.subscriptions.list,
                           {"customer": customer_id, "status": "all", "limit": 100})
        found = [s for s in items
                 if _meta(s).get(META_UID) == uid and _id_of(s.get("customer")) == customer_id]
        return sorted(found, key=_order)

    def _invoice_payment_intent(self, invoice: Mapping[str, Any]) -> dict[str, Any] | None:
        """The PaymentIntent of an invoice's latest payment attempt, for either API shape."""
        if "payment_intent" in invoice:  # API versions before 2025-03-31 (and localstripe)
            value = invoice.get("payment_intent")
            if isinstance(value, Mapping):
                return dict(value)
            if isinstance(value, str) and value:
                return self._call("Reading the payment", self.client.v1.payment_intents.retrieve,
                                  value)
            return None
        invoice_id = _id_of(invoice)
        if not invoice_id:
            return None
        try:
            payments = self._list("Reading the invoice payments",
                                  self.client.v1.invoice_payments.list,
                                  {"invoice": invoice_id, "limit": 10,
                                   "expand": ["data.payment.payment_intent"]})
        except PermanentBillingError:
            return None
        for entry in payments:  # newest first
            payment = entry.get("payment")
            pi = payment.get("payment_intent") if isinstance(payment, Mapping) else None
            if isinstance(pi, Mapping):
                return dict(pi)
            if isinstance(pi, str) and pi:
                return self._call("Reading the payment",
                                  self.client.v1.payment_intents.retrieve, pi)
        return None

    def _latest_invoice(self, sub: Mapping[str, Any]) -> dict[str, Any] | None:
        invoice = sub.get("latest_invoice")
        if isinstance(invoice, Mapping):
            return dict(invoice)
        if isinstance(invoice, str) and invoice:
            return self._call("Reading the invoice", self.client.v1.invoices.retrieve, invoice)
        return None

    def _first_payment_declined(self, sub: Mapping[str, Any],
                                invoice: Mapping[str, Any] | None = None) -> PaymentDeclined:
        invoice = invoice if invoice is not None else self._latest_invoice(sub)
        pi = self._invoice_payment_intent(invoice) if invoice else None
        reason, code, decline = _failure_reason(pi, "The subscription's first payment failed")
        return PaymentDeclined(reason, code=code, decline_code=decline,
                               payment_intent_id=_id_of(pi),
                               subscription_id=_id_of(sub),
                               payment_method_id=_failed_payment_method(pi) if pi else None)

    def _settle_incomplete(self, sub: dict[str, Any], customer_id: str,
                           uid: str) -> SubscriptionResult:
        """A subscription whose first invoice is unpaid (declined at creation).

        Paid meanwhile: return it. Same default card as the failed attempt: raise the decline
        again. A new default card: pay the open invoice once with it.
        """
        sub_id = cast(str, sub["id"])
        invoice = self._latest_invoice(sub)
        pi = self._invoice_payment_intent(invoice) if invoice else None
        if pi is not None and (pi.get("status") in _PAID_PI or pi.get("status") in _PENDING_PI):
            fresh = self._retrieve_subscription(sub_id)
            return SubscriptionResult.from_stripe(fresh)
        pm = self._default_payment_method(customer_id)
        if pm is None:
            raise NoPaymentMethod(customer_id)
        failed_pm = _failed_payment_method(pi) if pi else None
        if invoice is None or invoice.get("status") != "open" or failed_pm in (None, pm.id):
            raise self._first_payment_declined(sub, invoice)
        log.info("retrying the first invoice of subscription %s for %s with a new card",
                 sub_id, uid)
        try:
            self._call("Paying the subscription's first invoice", self.client.v1.invoices.pay,
                       cast(str, invoice["id"]),
                       options={"idempotency_key":
                                f"{idempotency_key(uid, STEP_SUBSCRIPTION)}-pay-{pm.id}"})
        except PaymentDeclined as err:
            err.subscription_id = sub_id
            raise
        fresh = self._retrieve_subscription(sub_id)
        if fresh.get("status") == "incomplete":
            raise self._first_payment_declined(fresh)
        return SubscriptionResult.from_stripe(fresh)

    def _retrieve_subscription(self, sub_id: str) -> dict[str, Any]:
        return self._call("Reading the Stripe subscription", self.client.v1.subscriptions.retrieve,
                          sub_id)

    def _ensure_subscription(self, uid: str, customer_id: str, pool_key: str, pool_name: str,
                             amount_cents: int, currency: str, interval: str, quantity: int,
                             description: str | None,
                             metadata: Mapping[str, str] | None) -> SubscriptionResult:
        subs = self._subscriptions_for(customer_id, uid)
        live = [s for s in subs if s.get("status") in LIVE_STATUSES]
        if live:
            if len(live) > 1:
                log.warning("uid %s has %d live Stripe subscriptions: %s", uid, len(live),
                            ", ".join(str(s.get("id")) for s in live))
            return SubscriptionResult.from_stripe(live[0])
        canceled = [s for s in subs if s.get("status") == "canceled"]
        if canceled:
            # Ended on Stripe's side (by us or in the dashboard): never re-subscribe silently.
            return SubscriptionResult.from_stripe(canceled[-1])
        incomplete = [s for s in subs if s.get("status") == "incomplete"]
        if incomplete:
            return self._settle_incomplete(incomplete[-1], customer_id, uid)

        # None yet, or only expired first attempts: create.
        pm = self._default_payment_method(customer_id)
        if pm is None:
            raise NoPaymentMethod(customer_id)
        plan = self._ensure_plan(pool_key, pool_name, amount_cents, currency, interval,
                                 description)
        attempt = max((_attempt_of(s) for s in subs), default=0) + 1
        meta = {**(metadata or {}), META_UID: uid, META_STEP: STEP_SUBSCRIPTION,
                META_ATTEMPT: str(attempt), "gpupool_pool": pool_key[:500],
                "gpupool_quantity": str(quantity)}
        if description:
            meta["gpupool_description"] = description[:500]
        params: SubscriptionCreateParams = {
            "customer": customer_id,
            "items": [{"plan": plan["id"], "quantity": 1}],
            "metadata": meta,
            "payment_behavior": "allow_incomplete",
            "expand": ["latest_invoice"],
        }
        log.info("creating a Stripe subscription for %s: %s %s per %s (attempt %d)",
                 uid, amount_cents, currency, interval, attempt)
        sub = self._call("Creating the Stripe subscription", self.client.v1.subscriptions.create,
                         params=params,
                         options={"idempotency_key":
                                  idempotency_key(uid, STEP_SUBSCRIPTION, attempt)})
        if sub.get("status") == "incomplete":
            invoice = sub.get("latest_invoice")
            raise self._first_payment_declined(
                sub, dict(invoice) if isinstance(invoice, Mapping) else None)
        return SubscriptionResult.from_stripe(sub, created_now=True)

    async def ensure_subscription(self, uid: str, customer_id: str, *, pool_key: str,
                                  pool_name: str, amount_cents: int, currency: str = "usd",
                                  interval: Interval = "month", quantity: int = 1,
                                  description: str | None = None,
                                  metadata: Mapping[str, str] | None = None
                                  ) -> SubscriptionResult:
        """The one Stripe subscription of this uid, created if there is none yet.

        ``amount_cents`` is the whole amount per cycle (monthly price, or the discounted yearly
        amount); it is billed as one plan item of quantity 1 under a per-pool product
        (``quantity`` is recorded in metadata). An existing live subscription is returned as is;
        a canceled one too (the operator maps it to ``canceled``). A declined first payment
        raises :class:`PaymentDeclined` (with ``subscription_id``; the subscription stays
        ``incomplete``, never active); called again after the customer's default card changed,
        the open first invoice is paid with the new card. Billing off: ``active``, no call.
        """
        if interval not in ("month", "year"):
            raise ValueError(f"interval must be month or year, not {interval!r}")
        if amount_cents < 0:
            raise ValueError("amount_cents must not be negative")
        if not self.enabled:
            return SubscriptionResult(subscription_id=None, status="active", phase="active",
                                      amount_cents=amount_cents, currency=currency.lower(),
                                      interval=interval, skipped=True)
        return await self._run(f"{uid}/{STEP_SUBSCRIPTION}", self._ensure_subscription, uid,
                               customer_id, pool_key, pool_name, amount_cents, currency,
                               interval, quantity, description, metadata)

    async def find_subscription(self, uid: str, customer_id: str) -> SubscriptionResult | None:
        """This uid's Stripe subscription without creating one: the live one, else the latest."""
        if not self.enabled:
            return None

        def find() -> SubscriptionResult | None:
            subs = self._subscriptions_for(customer_id, uid)
            live = [s for s in subs if s.get("status") in LIVE_STATUSES]
            chosen = live[0] if live else (subs[-1] if subs else None)
            return SubscriptionResult.from_stripe(chosen) if chosen else None

        return await self._run(f"{uid}/{STEP_SUBSCRIPTION}", find)

    async def fetch_subscription(self, subscription_id: str) -> SubscriptionResult:
        """Re-read a subscription (resync, webhooks). Raises :class:`NotFound` if unknown."""
        if not self.enabled:
            return _disabled_result(subscription_id)
        sub = await self._run(None, self._retrieve_subscription, subscription_id)
        return SubscriptionResult.from_stripe(sub)

    def _retry_past_due(self, subscription_id: str, customer_id: str,
                        uid: str) -> SubscriptionResult:
        sub = self._retrieve_subscription(subscription_id)
        if sub.get("status") != "past_due":
            return SubscriptionResult.from_stripe(sub)
        invoice = self._latest_invoice(sub)
        if invoice is None or invoice.get("status") != "open":
            return SubscriptionResult.from_stripe(sub)
        pi = self._invoice_payment_intent(invoice)
        failed_pm = _failed_payment_method(pi) if pi else None
        pm = self._default_payment_method(customer_id)
        if pm is None or failed_pm in (None, pm.id):
            return SubscriptionResult.from_stripe(sub)
        invoice_id = cast(str, invoice["id"])
        log.info("paying the open invoice %s of subscription %s for %s with a new card",
                 invoice_id, subscription_id, uid)
        # Declined too: it stays past_due, and this card is not tried on this invoice again.
        with contextlib.suppress(PaymentDeclined):
            self._call("Paying the past-due invoice", self.client.v1.invoices.pay, invoice_id,
                       options={"idempotency_key":
                                f"{idempotency_key(uid, STEP_RENEWAL)}-{invoice_id}-pay-{pm.id}"})
        return SubscriptionResult.from_stripe(self._retrieve_subscription(subscription_id))

    async def retry_past_due(self, subscription_id: str, customer_id: str,
                             uid: str) -> SubscriptionResult:
        """A ``past_due`` subscription's open invoice, paid once with the customer's default
        payment method if that is not the one its last attempt failed with (a new card is not
        left waiting for Stripe's next scheduled retry). Anything else: the subscription as is.
        """
        if not self.enabled:
            return _disabled_result(subscription_id)
        return await self._run(f"{uid}/{STEP_RENEWAL}", self._retry_past_due, subscription_id,
                               customer_id, uid)

    def _set_cancel_at_period_end(self, subscription_id: str, flag: bool) -> SubscriptionResult:
        sub = self._retrieve_subscription(subscription_id)
        if sub.get("status") in ENDED_STATUSES or bool(sub.get("cancel_at_period_end")) == flag:
            return SubscriptionResult.from_stripe(sub)
        # No idempotency key: the update is idempotent by itself, and a replayed key would
        # swallow a later flip back.
        sub = self._call("Updating the Stripe subscription", self.client.v1.subscriptions.update,
                         subscription_id, params={"cancel_at_period_end": flag})
        return SubscriptionResult.from_stripe(sub)

    async def set_cancel_at_period_end(self, subscription_id: str,
                                       flag: bool) -> SubscriptionResult:
        """Set (or clear) cancel-at-period-end; no-op when already so or already ended."""
        if not self.enabled:
            return _disabled_result(subscription_id, cancel_at_period_end=flag)
        return await self._run(f"sub/{subscription_id}", self._set_cancel_at_period_end,
                               subscription_id, flag)

    def _cancel_now(self, subscription_id: str) -> SubscriptionResult:
        try:
            sub = self._retrieve_subscription(subscription_id)
        except NotFound:
            return SubscriptionResult(subscription_id=subscription_id, status="canceled",
                                      phase="canceled")
        if sub.get("status") in ENDED_STATUSES:
            return SubscriptionResult.from_stripe(sub)
        try:
            sub = self._call("Canceling the Stripe subscription",
                             self.client.v1.subscriptions.cancel, subscription_id)
        except PermanentBillingError:
            sub = self._retrieve_subscription(subscription_id)  # canceled meanwhile?
            if sub.get("status") not in ENDED_STATUSES:
                raise
        return SubscriptionResult.from_stripe(sub)

    async def cancel_now(self, subscription_id: str) -> SubscriptionResult:
        """Cancel immediately (no refund, no proration). Already ended or unknown: no-op."""
        if not self.enabled:
            return SubscriptionResult(subscription_id=subscription_id, status="canceled",
                                      phase="canceled", skipped=True)
        return await self._run(f"sub/{subscription_id}", self._cancel_now, subscription_id)


def _disabled_result(subscription_id: str | None, *,
                     cancel_at_period_end: bool = False) -> SubscriptionResult:
    return SubscriptionResult(subscription_id=subscription_id, status="active",
                              phase=phase_for_status("active"),
                              cancel_at_period_end=cancel_at_period_end, skipped=True)
