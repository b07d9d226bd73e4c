"""BillingService without localstripe: billing off, error classes end to end, and the request
shapes of today's Stripe API (a canned-answer HTTP server stands in for api.stripe.com)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from gpupool.billing import (
    NO_PAYMENT_METHOD_MESSAGE,
    BillingConfig,
    BillingService,
    NoPaymentMethod,
    PaymentDeclined,
    PermanentBillingError,
    RetryableBillingError,
    catalog_ids,
    idempotency_key,
)
from gpupool.billing.localstripe import free_port

API_KEY = "sk_test_unitsecret0123456789"
UID = "0b6c2a4e-1111-4222-8333-944455556666"


# ---- billing off --------------------------------------------------------------------------------

async def test_disabled_billing_succeeds_at_once_without_calls() -> None:
    service = BillingService(BillingConfig())
    assert not service.enabled
    with pytest.raises(RuntimeError):
        _ = service.client
    assert await service.has_default_payment_method("cus_x")
    fee = await service.charge_reservation_fee(UID, "cus_x", 100, "usd")
    assert fee.state == "succeeded" and fee.skipped and fee.payment_intent_id is None
    sub = await service.ensure_subscription(UID, "cus_x", pool_key="ns/p", pool_name="p",
                                            amount_cents=3900, interval="year")
    assert sub.phase == "active" and sub.skipped and sub.subscription_id is None
    assert (await service.set_cancel_at_period_end("sub_x", True)).cancel_at_period_end
    assert (await service.cancel_now("sub_x")).phase == "canceled"
    assert (await service.fetch_subscription("sub_x")).skipped
    assert await service.find_subscription(UID, "cus_x") is None
    assert await service.find_reservation_fee(UID, "cus_x") is None
    assert service._executor is None  # nothing ran in a thread
    await service.close()


async def test_zero_fee_is_not_charged() -> None:
    service = BillingService(BillingConfig(api_key=API_KEY, api_base="http://127.0.0.1:9"))
    fee = await service.charge_reservation_fee(UID, "cus_x", 0, "usd")
    assert fee.skipped and fee.state == "succeeded"
    with pytest.raises(ValueError):
        await service.charge_reservation_fee(UID, "cus_x", -1, "usd")
    with pytest.raises(ValueError):
        await service.ensure_subscription(UID, "cus_x", pool_key="p", pool_name="p",
                                          amount_cents=1, interval="week")  # type: ignore
    await service.close()


def test_idempotency_keys_and_catalog_ids() -> None:
    assert idempotency_key(UID, "reservation_fee") == f"gpupool-{UID}-reservation_fee"
    assert idempotency_key(UID, "subscription", 3) == f"gpupool-{UID}-subscription-3"
    product, plan = catalog_ids("team-a/Qwen 3.5 (397B)", "year", 135660, "USD")
    assert product.startswith("gpupool-team-a-Qwen-3-5-397B-")
    assert plan == f"{product}-year-135660usd"
    assert all(c.isalnum() or c in "-_" for c in plan)
    assert catalog_ids("a/b", "month", 1, "usd") != catalog_ids("a-b", "month", 1, "usd")
    assert len(catalog_ids("x" * 300, "month", 1, "usd")[1]) < 100


# ---- a canned Stripe --------------------------------------------------------------------------

@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    headers: dict[str, str]


Handler = Callable[[Seen], tuple[int, dict[str, Any]]]


@dataclass
class FakeStripe:
    routes: dict[tuple[str, str], Handler] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    def route(self, method: str, path: str, handler: Handler | dict[str, Any],
              status: int = 200) -> None:
        self.routes[(method, path)] = (handler if callable(handler)
                                       else lambda _req: (status, handler))

    def requests(self, method: str, path: str) -> list[Seen]:
        return [r for r in self.seen if (r.method, r.path) == (method, path)]


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    fake = FakeStripe()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode() if length else ""
            seen = Seen(self.command, parts.path, parse_qs(parts.query), parse_qs(body),
                        {k.lower(): v for k, v in self.headers.items()})
            fake.seen.append(seen)
            handler = fake.routes.get((self.command, parts.path))
            status, answer = handler(seen) if handler else (404, _error(
                "invalid_request_error", f"Unrecognized request URL ({parts.path})",
                code="resource_missing"))
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


def _error(etype: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"type": etype, "message": message, **extra}}


def _list(data: list[dict[str, Any]], url: str) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": False, "url": url}


CUSTOMER = {"id": "cus_1", "object": "customer", "default_source": None,
            "invoice_settings": {"default_payment_method": {
                "id": "pm_1", "object": "payment_method", "type": "card"}}}


@pytest.fixture
async def service(fake_stripe: FakeStripe) -> Any:
    svc = BillingService(BillingConfig(api_key=API_KEY, api_base=fake_stripe.url,
                                       timeout_seconds=5))
    yield svc
    await svc.close()


# ---- errors through the whole stack -----------------------------------------------------------

async def test_unreachable_stripe_is_retryable() -> None:
    svc = BillingService(BillingConfig(api_key=API_KEY, api_base=f"http://127.0.0.1:{free_port()}",
                                       timeout_seconds=2))
    with pytest.raises(RetryableBillingError) as info:
        await svc.charge_reservation_fee(UID, "cus_1", 100, "usd")
    assert info.value.kind == "network"
    await svc.close()


@pytest.mark.parametrize(("status", "kind"), [(500, "unavailable"), (503, "unavailable"),
                                              (429, "rate_limited"), (409, "unavailable")])
async def test_server_trouble_is_retryable(fake_stripe: FakeStripe, service: BillingService,
                                           status: int, kind: str) -> None:
    fake_stripe.route("GET", "/v1/customers/cus_1",
                      _error("api_error", "try later", code="lock_timeout"), status)
    with pytest.raises(RetryableBillingError) as info:
        await service.has_default_payment_method("cus_1")
    assert info.value.kind == kind and info.value.http_status == status


async def test_bad_key_is_permanent_and_not_echoed(fake_stripe: FakeStripe,
                                                   service: BillingService) -> None:
    fake_stripe.route("GET", "/v1/customers/cus_1",
                      _error("invalid_request_error", f"Invalid API Key provided: {API_KEY}"),
                      401)
    with pytest.raises(PermanentBillingError) as info:
        await service.has_default_payment_method("cus_1")
    assert info.value.kind == "auth" and API_KEY not in str(info.value)
    auth = fake_stripe.seen[-1].headers["authorization"]
    assert auth == f"Bearer {API_KEY}"


# ---- today's API shapes -----------------------------------------------------------------------

async def test_fee_request_shape(fake_stripe: FakeStripe, service: BillingService) -> None:
    fake_stripe.route("GET", "/v1/payment_intents", _list([], "/v1/payment_intents"))
    fake_stripe.route("GET", "/v1/customers/cus_1", CUSTOMER)
    fake_stripe.route("POST", "/v1/payment_intents", {
        "id": "pi_1", "object": "payment_intent", "status": "succeeded", "amount": 100,
        "currency": "usd", "customer": "cus_1", "metadata": {}})

    fee = await service.charge_reservation_fee(UID, "cus_1", 100, "USD")
    assert (fee.state, fee.payment_intent_id, fee.created_now) == ("succeeded", "pi_1", True)

    listing = fake_stripe.requests("GET", "/v1/payment_intents")[0]
    assert listing.query["customer"] == ["cus_1"]  # found by listing, not by search
    create = fake_stripe.requests("POST", "/v1/payment_intents")[0]
    form = {k: v[0] for k, v in create.form.items()}
    assert create.headers["idempotency-key"] == f"gpupool-{UID}-reservation_fee"
    assert form["amount"] == "100" and form["currency"] == "usd"
    assert form["customer"] == "cus_1" and form["payment_method"] == "pm_1"
    assert form["confirm"] == "true" and form["off_session"] == "true"
    assert form["automatic_payment_methods[enabled]"] == "true"
    assert form["automatic_payment_methods[allow_redirects]"] == "never"
    assert "payment_method_types[0]" not in form  # refused from 2026-09-30 on
    assert form["metadata[gpupool_uid]"] == UID
    assert form["metadata[gpupool_step]"] == "reservation_fee"


async def test_fee_decline_carries_stripe_details(fake_stripe: FakeStripe,
                                                  service: BillingService) -> None:
    fake_stripe.route("GET", "/v1/payment_intents", _list([], "/v1/payment_intents"))
    fake_stripe.route("GET", "/v1/customers/cus_1", CUSTOMER)
    fake_stripe.route("POST", "/v1/payment_intents", _error(
        "card_error", "Your card has insufficient funds.", code="card_declined",
        decline_code="insufficient_funds",
        payment_intent={"id": "pi_9", "object": "payment_intent",
                        "status": "requires_payment_method"},
        payment_method={"id": "pm_1", "object": "payment_method"}), 402)
    with pytest.raises(PaymentDeclined) as info:
        await service.charge_reservation_fee(UID, "cus_1", 100, "usd")
    err = info.value
    assert (err.reason, err.decline_code, err.payment_intent_id) == \
        ("Your card has insufficient funds.", "insufficient_funds", "pi_9")
    assert not err.retryable

    # Called again: the failed attempt is found (real Stripe moves the card into
    # last_payment_error) and, the card being the same, nothing is charged.
    fake_stripe.route("GET", "/v1/payment_intents", _list([{
        "id": "pi_9", "object": "payment_intent", "status": "requires_payment_method",
        "customer": "cus_1", "payment_method": None, "created": 1,
        "metadata": {"gpupool_uid": UID, "gpupool_step": "reservation_fee",
                     "gpupool_attempt": "1"},
        "last_payment_error": {"type": "card_error", "code": "card_declined",
                               "decline_code": "insufficient_funds",
                               "message": "Your card has insufficient funds.",
                               "payment_method": {"id": "pm_1"}}}], "/v1/payment_intents"))
    with pytest.raises(PaymentDeclined) as again:
        await service.charge_reservation_fee(UID, "cus_1", 100, "usd")
    assert again.value.payment_intent_id == "pi_9"
    assert len(fake_stripe.requests("POST", "/v1/payment_intents")) == 1


async def test_no_payment_method(fake_stripe: FakeStripe, service: BillingService) -> None:
    fake_stripe.route("GET", "/v1/payment_intents", _list([], "/v1/payment_intents"))
    fake_stripe.route("GET", "/v1/customers/cus_1", {
        "id": "cus_1", "object": "customer", "default_source": None,
        "invoice_settings": {"default_payment_method": None}})
    assert not await service.has_default_payment_method("cus_1")
    with pytest.raises(NoPaymentMethod) as info:
        await service.charge_reservation_fee(UID, "cus_1", 100, "usd")
    assert str(info.value) == NO_PAYMENT_METHOD_MESSAGE
    assert fake_stripe.requests("POST", "/v1/payment_intents") == []


def _catalog(fake: FakeStripe, amount: int, interval: str) -> str:
    product, plan = catalog_ids("ns/pool", interval, amount, "usd")
    state = {"plan": False}

    def get_plan(_req: Seen) -> tuple[int, dict[str, Any]]:
        if not state["plan"]:
            return 404, _error("invalid_request_error", f"No such plan: '{plan}'",
                               code="resource_missing")
        return 200, {"id": plan, "object": "plan", "amount": amount, "currency": "usd",
                     "interval": interval, "active": True, "product": product}

    def create_plan(req: Seen) -> tuple[int, dict[str, Any]]:
        state["plan"] = True  # another worker won the race: already exists
        return 400, _error("invalid_request_error", "Plan already exists.",
                           code="resource_already_exists")

    fake.route("GET", f"/v1/plans/{plan}", get_plan)
    fake.route("POST", "/v1/plans", create_plan)
    fake.route("GET", f"/v1/products/{product}", _error(
        "invalid_request_error", "No such product", code="resource_missing"), 404)
    fake.route("POST", "/v1/products", {"id": product, "object": "product"})
    return plan


async def test_subscription_request_and_answer_shapes(fake_stripe: FakeStripe,
                                                      service: BillingService) -> None:
    plan = _catalog(fake_stripe, 135660, "year")
    fake_stripe.route("GET", "/v1/subscriptions", _list([], "/v1/subscriptions"))
    fake_stripe.route("GET", "/v1/customers/cus_1", CUSTOMER)
    fake_stripe.route("POST", "/v1/subscriptions", {
        "id": "sub_1", "object": "subscription", "status": "active", "customer": "cus_1",
        "cancel_at_period_end": False, "latest_invoice": {"id": "in_1", "object": "invoice"},
        "items": {"object": "list", "data": [{
            "id": "si_1", "object": "subscription_item", "quantity": 1,
            "current_period_end": 1_826_000_000,
            "plan": {"id": plan, "object": "plan", "amount": 135660, "currency": "usd",
                     "interval": "year"}}]}})

    result = await service.ensure_subscription(UID, "cus_1", pool_key="ns/pool",
                                               pool_name="pool", amount_cents=135660,
                                               interval="year", quantity=2)
    assert (result.subscription_id, result.phase, result.created_now) == ("sub_1", "active", True)
    assert result.current_period_end is not None
    assert int(result.current_period_end.timestamp()) == 1_826_000_000  # from the item

    listing = fake_stripe.requests("GET", "/v1/subscriptions")[0]
    assert listing.query["status"] == ["all"] and listing.query["customer"] == ["cus_1"]
    create = fake_stripe.requests("POST", "/v1/subscriptions")[0]
    form = {k: v[0] for k, v in create.form.items()}
    assert create.headers["idempotency-key"] == f"gpupool-{UID}-subscription"
    assert form["items[0][plan]"] == plan and form["items[0][quantity]"] == "1"
    assert form["payment_behavior"] == "allow_incomplete"
    assert form["metadata[gpupool_uid]"] == UID and form["metadata[gpupool_quantity]"] == "2"
    assert not any(k.startswith("items[0][price") for k in form)  # Plans, not Prices
    # The plan existed by the time we tried to create it: read back, not failed.
    assert len(fake_stripe.requests("GET", f"/v1/plans/{plan}")) == 2


async def test_declined_first_invoice_in_the_new_invoice_shape(fake_stripe: FakeStripe,
                                                               service: BillingService) -> None:
    _catalog(fake_stripe, 3900, "month")
    fake_stripe.route("GET", "/v1/subscriptions", _list([], "/v1/subscriptions"))
    fake_stripe.route("GET", "/v1/customers/cus_1", CUSTOMER)
    fake_stripe.route("POST", "/v1/subscriptions", {
        "id": "sub_2", "object": "subscription", "status": "incomplete", "customer": "cus_1",
        # 2025-03-31.basil and later: no payment_intent on the invoice.
        "latest_invoice": {"id": "in_2", "object": "invoice", "status": "open"},
        "items": {"object": "list", "data": []}})
    fake_stripe.route("GET", "/v1/invoice_payments", _list([{
        "id": "inpay_1", "object": "invoice_payment", "invoice": "in_2",
        "payment": {"type": "payment_intent", "payment_intent": {
            "id": "pi_2", "object": "payment_intent", "status": "requires_payment_method",
            "payment_method": None,
            "last_payment_error": {"code": "card_declined", "decline_code": "generic_decline",
                                   "message": "Your card was declined.",
                                   "payment_method": {"id": "pm_1"}}}}}],
        "/v1/invoice_payments"))

    with pytest.raises(PaymentDeclined) as info:
        await service.ensure_subscription(UID, "cus_1", pool_key="ns/pool", pool_name="pool",
                                          amount_cents=3900)
    err = info.value
    assert (err.reason, err.subscription_id, err.payment_intent_id, err.payment_method_id) == \
        ("Your card was declined.", "sub_2", "pi_2", "pm_1")
    assert fake_stripe.requests("GET", "/v1/invoice_payments")[0].query["invoice"] == ["in_2"]
