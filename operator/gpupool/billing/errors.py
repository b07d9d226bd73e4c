"""What went wrong talking to Stripe, sorted into "try again later" and "tell the user".

Every call into stripe-python goes through :func:`classify`, so no raw ``stripe`` exception leaves
this package. The operator maps :class:`RetryableBillingError` to ``kopf.TemporaryError`` (with
:attr:`RetryableBillingError.delay`) and any other :class:`BillingError` to a status condition
carrying :attr:`BillingError.reason`.
"""

from __future__ import annotations

from typing import Any

import stripe

NO_PAYMENT_METHOD_MESSAGE = "No payment method found — add a card first"


class BillingError(Exception):
    """A billing step failed. ``reason`` is one human line, safe for a status condition."""

    retryable: bool = False

    def __init__(self, reason: str, *, kind: str = "error", code: str | None = None,
                 http_status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.code = code
        self.http_status = http_status

    def __str__(self) -> str:
        return self.reason


class RetryableBillingError(BillingError):
    """Network trouble, Stripe 5xx, 429 or a lock conflict: the same step may simply be retried."""

    retryable = True

    def __init__(self, reason: str, *, kind: str = "unavailable", code: str | None = None,
                 http_status: int | None = None, delay: float = 10.0) -> None:
        super().__init__(reason, kind=kind, code=code, http_status=http_status)
        self.delay = delay


class PermanentBillingError(BillingError):
    """Retrying the same call will not help until something changes (a card, a request, a key)."""


class NoPaymentMethod(PermanentBillingError):
    """The customer has no default payment method; retried once one is added."""

    def __init__(self, customer_id: str) -> None:
        super().__init__(NO_PAYMENT_METHOD_MESSAGE, kind="no_payment_method",
                         code="no_payment_method")
        self.customer_id = customer_id


class PaymentDeclined(PermanentBillingError):
    """The card was declined (or needs the customer present to authenticate).

    Carries the Stripe object the attempt left behind, so the operator can record it.
    """

    def __init__(self, reason: str, *, code: str | None = None, decline_code: str | None = None,
                 payment_intent_id: str | None = None, subscription_id: str | None = None,
                 payment_method_id: str | None = None, http_status: int | None = 402) -> None:
        super().__init__(reason, kind="declined", code=code, http_status=http_status)
        self.decline_code = decline_code
        self.payment_intent_id = payment_intent_id
        self.subscription_id = subscription_id
        self.payment_method_id = payment_method_id


class NotFound(PermanentBillingError):
    def __init__(self, reason: str, *, code: str | None = "resource_missing") -> None:
        super().__init__(reason, kind="not_found", code=code, http_status=404)


class WebhookVerificationError(Exception):
    """A webhook body whose signature (or shape) does not check out: answer 400, change nothing."""


def _error_body(exc: stripe.StripeError) -> dict[str, Any]:
    body = exc.json_body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"]
    return {}


def _header(exc: stripe.StripeError, name: str) -> str | None:
    for key, value in (exc.headers or {}).items():
        if key.lower() == name:
            return str(value)
    return None


def _message(exc: stripe.StripeError, fallback: str) -> str:
    err = _error_body(exc)
    message = err.get("message") if isinstance(err.get("message"), str) else None
    return (message or getattr(exc, "_message", None) or fallback).strip()


def _retry_delay(exc: stripe.StripeError, default: float) -> float:
    value = _header(exc, "retry-after")
    if value is not None:
        try:
            return max(1.0, min(float(value), 300.0))
        except ValueError:
            pass
    return default


def classify(exc: BaseException, *, doing: str = "Stripe request") -> BillingError:
    """Turn an exception raised by stripe-python into a :class:`BillingError`."""
    if isinstance(exc, BillingError):
        return exc
    if not isinstance(exc, stripe.StripeError):
        return RetryableBillingError(f"{doing} failed: {type(exc).__name__}", kind="unexpected")

    status = exc.http_status
    err = _error_body(exc)
    code = exc.code or (err.get("code") if isinstance(err.get("code"), str) else None)

    if isinstance(exc, stripe.APIConnectionError):
        return RetryableBillingError(f"{doing}: cannot reach Stripe", kind="network", code=code,
                                     delay=5.0)
    if isinstance(exc, stripe.RateLimitError) or status == 429:
        return RetryableBillingError(f"{doing}: rate limited by Stripe", kind="rate_limited",
                                     code=code, http_status=status,
                                     delay=_retry_delay(exc, 5.0))
    if isinstance(exc, stripe.CardError) or status == 402:
        pi = err.get("payment_intent")
        pm = err.get("payment_method")
        return PaymentDeclined(
            _message(exc, "Your card was declined."), code=code,
            decline_code=err.get("decline_code") if isinstance(err.get("decline_code"), str)
            else None,
            payment_intent_id=pi.get("id") if isinstance(pi, dict) else None,
            payment_method_id=pm.get("id") if isinstance(pm, dict) else None,
            http_status=status)
    if isinstance(exc, stripe.AuthenticationError) or status == 401:
        # Stripe's own text masks the key, but say nothing about it at all.
        return PermanentBillingError(f"{doing}: Stripe rejected the API key", kind="auth",
                                     code=code, http_status=status)
    if isinstance(exc, stripe.PermissionError) or status == 403:
        return PermanentBillingError(f"{doing}: the API key may not do this", kind="permission",
                                     code=code, http_status=status)
    if isinstance(exc, stripe.IdempotencyError):
        return PermanentBillingError(f"{doing}: {_message(exc, 'idempotency key reused')}",
                                     kind="idempotency", code=code, http_status=status)
    if status is not None and (status >= 500 or status == 409):
        # 409: lock_timeout / idempotency_key_in_use -- another request holds the object.
        return RetryableBillingError(f"{doing}: Stripe answered {status}", kind="unavailable",
                                     code=code, http_status=status,
                                     delay=_retry_delay(exc, 10.0))
    if isinstance(exc, stripe.InvalidRequestError) or status in (400, 404):
        message = _message(exc, "invalid request")
        if status == 404 or code == "resource_missing":
            return NotFound(f"{doing}: {message}", code=code)
        return PermanentBillingError(f"{doing}: {message}", kind="invalid_request", code=code,
                                     http_status=status)
    if status is None:
        # No HTTP answer we understood (e.g. an unreadable body): treat like a network error.
        return RetryableBillingError(f"{doing}: unreadable answer from Stripe", kind="network",
                                     code=code)
    return PermanentBillingError(f"{doing}: {_message(exc, 'Stripe error')}", code=code,
                                 http_status=status)
