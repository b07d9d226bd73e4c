"""Every stripe exception becomes a retryable or a permanent BillingError."""

from __future__ import annotations

import pytest
import stripe

from gpupool.billing import (
    BillingError,
    NotFound,
    PaymentDeclined,
    PermanentBillingError,
    RetryableBillingError,
    classify,
)


def _body(message: str, **extra: object) -> dict[str, object]:
    return {"error": {"message": message, **extra}}


def test_network_errors_are_retryable() -> None:
    err = classify(stripe.APIConnectionError("Connection refused"))
    assert isinstance(err, RetryableBillingError) and err.retryable and err.kind == "network"


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_retryable(status: int) -> None:
    err = classify(stripe.APIError("boom", http_status=status, json_body=_body("boom")))
    assert isinstance(err, RetryableBillingError) and err.http_status == status


def test_rate_limits_are_retryable_with_retry_after() -> None:
    err = classify(stripe.RateLimitError("slow down", http_status=429,
                                         headers={"Retry-After": "7"}))
    assert isinstance(err, RetryableBillingError)
    assert err.kind == "rate_limited" and err.delay == 7.0


def test_lock_conflicts_are_retryable() -> None:
    err = classify(stripe.APIError("lock", http_status=409,
                                   json_body=_body("lock", code="lock_timeout")))
    assert isinstance(err, RetryableBillingError) and err.code == "lock_timeout"


def test_card_errors_are_permanent_with_the_decline_message() -> None:
    exc = stripe.CardError(
        "Your card has insufficient funds.", None, "card_declined", http_status=402,
        json_body=_body("Your card has insufficient funds.", type="card_error",
                        code="card_declined", decline_code="insufficient_funds",
                        payment_intent={"id": "pi_123", "status": "requires_payment_method"},
                        payment_method={"id": "pm_123"}))
    err = classify(exc)
    assert isinstance(err, PaymentDeclined) and not err.retryable
    assert err.reason == "Your card has insufficient funds."
    assert (err.code, err.decline_code) == ("card_declined", "insufficient_funds")
    assert (err.payment_intent_id, err.payment_method_id) == ("pi_123", "pm_123")


def test_invalid_requests_are_permanent() -> None:
    err = classify(stripe.InvalidRequestError("No such plan", "plan", code="parameter_invalid",
                                              http_status=400,
                                              json_body=_body("No such plan")),
                   doing="Creating the subscription")
    assert isinstance(err, PermanentBillingError) and not err.retryable
    assert err.reason == "Creating the subscription: No such plan"


def test_missing_resources_are_not_found() -> None:
    err = classify(stripe.InvalidRequestError("No such customer: 'cus_x'", "id",
                                              code="resource_missing", http_status=404))
    assert isinstance(err, NotFound) and not err.retryable


def test_authentication_errors_never_echo_the_key() -> None:
    exc = stripe.AuthenticationError("Invalid API Key provided: sk_test_abcdefgh",
                                     http_status=401)
    err = classify(exc)
    assert isinstance(err, PermanentBillingError) and err.kind == "auth"
    assert "sk_test" not in err.reason and "sk_test" not in str(err)


def test_idempotency_misuse_is_permanent() -> None:
    err = classify(stripe.IdempotencyError("Keys for idempotent requests can only be used "
                                           "with the same parameters", http_status=400))
    assert isinstance(err, PermanentBillingError) and err.kind == "idempotency"


def test_unreadable_answers_are_retryable() -> None:
    assert classify(stripe.APIError("Invalid response body from API")).retryable


def test_billing_errors_pass_through() -> None:
    original = PermanentBillingError("x")
    assert classify(original) is original
    assert isinstance(classify(RuntimeError("?")), BillingError)
