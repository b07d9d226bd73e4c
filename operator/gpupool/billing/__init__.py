"""Stripe billing for gpupool: config, idempotent steps, error classes, webhooks.

No kopf here. Wiring, in the operator:

* ``config = BillingConfig.from_env()`` (``GPUPOOL_STRIPE_API_KEY``,
  ``GPUPOOL_STRIPE_WEBHOOK_SECRET``, ``GPUPOOL_STRIPE_API_BASE``) or
  ``BillingConfig.from_secret_data(secret.data)`` (``apiKey``, ``webhookSecret``, ``apiBase``);
  ``billing = BillingService(config)`` once per process, ``await billing.close()`` at
  shutdown. Without a key every step succeeds at once (``skipped``).
* Steps are keyed by the Subscription's ``metadata.uid``; call them from the reconcile, record
  the returned ids in status, and do not call a step again once its outcome is recorded.
* ``except RetryableBillingError as e: raise kopf.TemporaryError(e.reason, delay=e.delay)``;
  ``except BillingError as e``: a status condition with ``e.reason`` (``NoPaymentMethod`` ->
  ``pending``; ``PaymentDeclined`` -> not active, ``e.subscription_id``/``e.payment_intent_id``).
* ``webhook_app(config, on_event)`` is a Starlette app (``POST /stripe/webhook``); ``on_event``
  gets verified, de-duplicated events; use ``event_targets(event)`` and re-fetch
  (``fetch_subscription`` / ``fetch_payment_intent``) rather than trusting the payload.
"""

from gpupool.billing.config import BillingConfig
from gpupool.billing.errors import (
    NO_PAYMENT_METHOD_MESSAGE,
    BillingError,
    NoPaymentMethod,
    NotFound,
    PaymentDeclined,
    PermanentBillingError,
    RetryableBillingError,
    WebhookVerificationError,
    classify,
)
from gpupool.billing.results import (
    BillingPhase,
    ChargeResult,
    SubscriptionResult,
    current_period_end,
    phase_for_status,
)
from gpupool.billing.service import (
    STEP_RESERVATION_FEE,
    STEP_SUBSCRIPTION,
    BillingService,
    PaymentIntentInfo,
    catalog_ids,
    idempotency_key,
)
from gpupool.billing.webhooks import (
    WEBHOOK_PATH,
    EventDeduplicator,
    EventTargets,
    event_targets,
    verify_event,
    webhook_app,
)

__all__ = [
    "NO_PAYMENT_METHOD_MESSAGE",
    "STEP_RESERVATION_FEE",
    "STEP_SUBSCRIPTION",
    "WEBHOOK_PATH",
    "BillingConfig",
    "BillingError",
    "BillingPhase",
    "BillingService",
    "ChargeResult",
    "EventDeduplicator",
    "EventTargets",
    "NoPaymentMethod",
    "NotFound",
    "PaymentDeclined",
    "PaymentIntentInfo",
    "PermanentBillingError",
    "RetryableBillingError",
    "SubscriptionResult",
    "WebhookVerificationError",
    "catalog_ids",
    "classify",
    "current_period_end",
    "event_targets",
    "idempotency_key",
    "phase_for_status",
    "verify_event",
    "webhook_app",
]
