"""Stripe test fixtures: a real localstripe, a billing service on it, a webhook receiver.

Use with ``pytest_plugins = ["support.stripe"]`` in a test module (or list it in the rootdir
conftest). The helpers themselves (``LocalStripe``, ``WebhookReceiver``, ``wait_until``,
``signed_event``) live in :mod:`gpupool.billing.localstripe`, so test modules import them from
there and this module is only loaded as a plugin.

- ``localstripe_server`` (session): one ``localstripe --port P --from-scratch`` process; its log
  goes to pytest's basetemp. Skips when localstripe is not installed, unless
  ``GPUPOOL_REQUIRE_STRIPE=1``.
- ``stripe_server``: the same server, emptied (``DELETE /_config/data``) and with no webhooks.
- ``billing``: a :class:`BillingService` on it (webhook secret :data:`WEBHOOK_SECRET`).
- ``webhook_receiver``: the operator's webhook app served by uvicorn on a free port in the test's
  event loop, registered with localstripe; collects verified, de-duplicated events.

Helpers for tests that run the operator itself with billing on: ``operator_env`` (the Stripe
environment for ``OperatorProcess``), ``OperatorWebhook`` (signed events to the operator's webhook
port), ``reservation_fees`` / ``stripe_subscriptions`` (what localstripe holds for a
Subscription's uid), ``make_past_due`` / ``pay_invoice`` (a failed and a recovered payment),
``StripeOutage`` (a proxy that answers chosen requests with a 5xx).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from gpupool.billing import BillingService
from gpupool.billing.localstripe import (
    CARD_DECLINES_CHARGES,
    CARD_OK,
    WEBHOOK_SECRET,
    LocalStripe,
    WebhookReceiver,
    find_binary,
    signed_event,
)
from gpupool.billing.webhooks import WEBHOOK_PATH
from support.waiting import wait_for


def _require_localstripe() -> None:
    try:
        find_binary()
    except FileNotFoundError as exc:
        if os.environ.get("GPUPOOL_REQUIRE_STRIPE") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def localstripe_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStripe]:
    _require_localstripe()
    log = tmp_path_factory.mktemp("localstripe") / "localstripe.log"
    with LocalStripe(log_path=log) as server:
        yield server


@pytest.fixture
def stripe_server(localstripe_server: LocalStripe) -> LocalStripe:
    localstripe_server.reset()
    return localstripe_server


@pytest.fixture
async def billing(stripe_server: LocalStripe) -> AsyncIterator[BillingService]:
    service = BillingService(stripe_server.billing_config(webhook_secret=WEBHOOK_SECRET))
    try:
        yield service
    finally:
        await service.close()


@pytest.fixture
async def webhook_receiver(stripe_server: LocalStripe) -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver(stripe_server.billing_config(webhook_secret=WEBHOOK_SECRET))
    await receiver.start()
    stripe_server.register_webhook("gpupool-test", receiver.url, WEBHOOK_SECRET)
    try:
        yield receiver
    finally:
        stripe_server.unregister_webhook("gpupool-test")
        await receiver.stop()


# ---- helpers for tests that run the operator with billing on ------------------------------------

def operator_env(server: LocalStripe, webhook_port: int, *,
                 webhook_secret: str = WEBHOOK_SECRET,
                 api_base: str | None = None) -> dict[str, str]:
    """The environment that turns the operator's Stripe billing on, against ``server`` (or a
    proxy in front of it at ``api_base``).

    Holds the test server's API key: pass it to ``OperatorProcess(env=...)``, never print it.
    """
    return {"GPUPOOL_STRIPE_API_KEY": server.api_key,
            "GPUPOOL_STRIPE_API_BASE": api_base or server.url,
            "GPUPOOL_STRIPE_WEBHOOK_SECRET": webhook_secret,
            "GPUPOOL_WEBHOOK_PORT": str(webhook_port)}


class OperatorWebhook:
    """Posts (signed) Stripe events to an operator's ``POST /stripe/webhook``."""

    def __init__(self, port: int, secret: str = WEBHOOK_SECRET) -> None:
        self.port = port
        self.secret = secret

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{WEBHOOK_PATH}"

    def post_raw(self, body: bytes, headers: Mapping[str, str] | None = None) -> httpx.Response:
        return httpx.post(self.url, content=body, headers=dict(headers or {}), timeout=10.0)

    def post(self, event_type: str, obj: Mapping[str, Any], *, secret: str | None = None,
             event_id: str | None = None) -> httpx.Response:
        """``obj`` as the ``data.object`` of a ``event_type`` event, signed with ``secret``
        (default: the operator's)."""
        body, headers = signed_event(event_type, obj, secret or self.secret, event_id=event_id)
        return self.post_raw(body, headers)

    def ready(self) -> bool:
        """True once the operator's webhook server answers (an unsigned post gets 400)."""
        try:
            return self.post_raw(b"{}").status_code == 400
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_for(self.ready, timeout=timeout, interval=0.1,
                 message=f"operator webhook server on port {self.port}")


def of_uid(server: LocalStripe, resource: str, uid: str, **params: Any) -> list[dict[str, Any]]:
    """Every ``resource`` object whose ``metadata.gpupool_uid`` is ``uid``."""
    return [o for o in server.list_all(resource, **params)
            if (o.get("metadata") or {}).get("gpupool_uid") == uid]


def reservation_fees(server: LocalStripe, uid: str) -> list[dict[str, Any]]:
    """The reservation-fee PaymentIntents (any status) the operator made for a Subscription."""
    return [pi for pi in of_uid(server, "payment_intents", uid)
            if pi["metadata"].get("gpupool_step") == "reservation_fee"]


def stripe_subscriptions(server: LocalStripe, uid: str) -> list[dict[str, Any]]:
    """The Stripe subscriptions (any status) the operator made for a Subscription."""
    return of_uid(server, "subscriptions", uid, status="all")


def stripe_subscription(server: LocalStripe, subscription_id: str) -> dict[str, Any]:
    return server.client.v1.subscriptions.retrieve(subscription_id).to_dict()


def make_past_due(server: LocalStripe, subscription_id: str) -> dict[str, Any]:
    """Turn an active localstripe subscription ``past_due`` through a real failed payment.

    localstripe has no clock to renew with, and paying an invoice that fails
    (``POST /v1/invoices/{id}/pay``) leaves the subscription as it was. The one path that runs
    its ``_on_recurring_payment_failure`` is an invoice the subscription creates itself: a plan
    change with a different billing interval. So: the customer's default card becomes one whose
    charges are declined (4000000000000341), and the subscription moves to a plan of the same
    product billed every 2 months at twice the price (the proration credit of the unused month
    leaves one month's amount due). That invoice is charged at once, declined, and the
    subscription becomes ``past_due`` with the invoice ``open``. Returns the invoice.
    """
    sub = stripe_subscription(server, subscription_id)
    item = sub["items"]["data"][0]
    plan = item["plan"]
    server.set_default_card(sub["customer"], CARD_DECLINES_CHARGES)
    longer = server.client.v1.plans.create(params={
        "product": plan["product"], "amount": 2 * plan["amount"], "currency": plan["currency"],
        "interval": plan["interval"], "interval_count": 2 * int(plan.get("interval_count") or 1),
        "metadata": {"gpupool_test": "past_due"}})
    updated = server.client.v1.subscriptions.update(
        subscription_id, params={"items": [{"id": item["id"], "plan": longer.id}]}).to_dict()
    assert updated["status"] == "past_due", f"localstripe left it {updated['status']}"
    invoice = server.client.v1.invoices.retrieve(updated["latest_invoice"]).to_dict()
    assert invoice["status"] == "open" and invoice["amount_due"] > 0, invoice["status"]
    return invoice


def pay_invoice(server: LocalStripe, invoice_id: str, payment_method: str = CARD_OK
                ) -> dict[str, Any]:
    """The customer adds a working card and the open invoice is paid (the subscription is
    ``active`` again). Returns the paid invoice."""
    invoice = server.client.v1.invoices.retrieve(invoice_id).to_dict()
    server.set_default_card(invoice["customer"], payment_method)
    paid = server.client.v1.invoices.pay(invoice_id).to_dict()
    assert paid["status"] == "paid", paid["status"]
    return paid


class StripeOutage:
    """A forwarding proxy in front of localstripe that answers chosen requests with a Stripe 5xx.

    Point the operator's ``GPUPOOL_STRIPE_API_BASE`` at :attr:`url`. While ``failing`` is set,
    every request it matches (``(method, path) -> bool``) gets ``503`` with a Stripe error body
    and ``Retry-After`` and never reaches localstripe; everything else is forwarded as is.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.failing: Callable[[str, str], bool] | None = None
        self.refused: list[tuple[str, str]] = []
        self.retry_after = 2
        outage = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                if outage.failing is not None and outage.failing(self.command, path):
                    outage.refused.append((self.command, path))
                    self._answer(503, {"Content-Type": "application/json",
                                       "Retry-After": str(outage.retry_after)},
                                 json.dumps({"error": {"type": "api_error",
                                                       "message": "injected outage"}}).encode())
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection")}
                resp = httpx.request(self.command, outage.upstream + self.path, content=body,
                                     headers=headers, timeout=30.0)
                self._answer(resp.status_code,
                             {k: v for k, v in resp.headers.items()
                              if k.lower() not in ("content-length", "transfer-encoding",
                                                   "connection", "content-encoding")},
                             resp.content)

            def _answer(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="stripe-outage", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> StripeOutage:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
