"""Test support: a localstripe server, signed test events, a webhook receiver.

Nothing here is used by the operator itself; tests (``tests/support/stripe.py`` fixtures) and
local runs use it.

``localstripe`` (PyPI, a dev extra) is a stateful fake of the Stripe API. Facts this harness
relies on (read from localstripe 1.15.10's source):

* ``localstripe --port P [--from-scratch]`` listens on ``::`` (IPv4 too); any ``sk_...`` key is
  accepted. Without ``--from-scratch`` it reloads ``/tmp/localstripe.pickle``, which every
  instance on the machine writes -- so this harness always passes ``--from-scratch``.
* ``DELETE /_config/data`` empties the store (registered webhooks stay);
  ``POST /_config/webhooks/{id}`` with ``url``, ``secret`` and optional ``events`` registers (or
  replaces) a receiver. Events are posted about one second after they happen, signed
  ``Stripe-Signature: t=...,v1=...``. It never sends ``invoice.paid`` or
  ``customer.subscription.updated``: post those with :func:`signed_event`.
* Test payment methods: ``pm_card_visa`` (4242...: works), ``pm_card_chargeCustomerFail``
  (4000000000000341: attaches, then every charge is declined: a PaymentIntent with
  ``confirm=true`` answers 402 ``card_declined`` and a subscription stays ``incomplete``),
  ``pm_card_visa_chargeDeclined`` (4000000000000002: refused already at attach).
* No ``/v1/prices``, no search endpoints, no idempotency keys, PaymentIntents cannot be listed
  by customer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import stripe
import uvicorn

from gpupool.billing.config import BillingConfig
from gpupool.billing.webhooks import EventDeduplicator, webhook_app

T = TypeVar("T")

WEBHOOK_SECRET = "whsec_gpupool_test_secret"

CARD_OK = "pm_card_visa"
CARD_DECLINES_CHARGES = "pm_card_chargeCustomerFail"
CARD_REFUSED_AT_ATTACH = "pm_card_visa_chargeDeclined"
CARD_NUMBER_DECLINES_CHARGES = "4000000000000341"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_binary() -> str:
    """``localstripe`` next to the running interpreter (the venv), else on PATH."""
    candidate = Path(sys.executable).parent / "localstripe"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("localstripe")
    if found is None:
        raise FileNotFoundError("localstripe is not installed (pip install -e '.[dev]')")
    return found


class LocalStripe:
    """One localstripe process on a free loopback port.

    >>> with LocalStripe() as ls:                     # doctest: +SKIP
    ...     config = ls.billing_config(webhook_secret="whsec_test")
    """

    def __init__(self, *, port: int | None = None, binary: str | None = None,
                 log_path: str | os.PathLike[str] | None = None,
                 start_timeout: float = 20.0) -> None:
        self.port = port
        self.binary = binary or find_binary()
        self.log_path = Path(log_path) if log_path else None
        self.start_timeout = start_timeout
        self.api_key = "sk_test_" + secrets.token_hex(12)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._webhook_ids: set[str] = set()
        self._client: stripe.StripeClient | None = None

    # ---- process ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> LocalStripe:
        if self.running:
            return self
        last_error = "did not start"
        requested = self.port
        for _ in range(1 if requested else 5):  # a probed free port can be taken meanwhile
            port = requested or free_port()
            self._log = (open(self.log_path, "ab") if self.log_path  # noqa: SIM115
                         else subprocess.DEVNULL)
            self._proc = subprocess.Popen(
                [self.binary, "--port", str(port), "--from-scratch"],
                stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
            self.port = port
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    last_error = f"exited with {self._proc.returncode}"
                    break
                try:
                    httpx.delete(f"{self.url}/_config/data", timeout=1.0).raise_for_status()
                    return self
                except httpx.HTTPError:
                    time.sleep(0.05)  # poll interval, bounded by the deadline
            else:
                last_error = f"no answer within {self.start_timeout}s"
            self.stop()
            self.port = requested
        raise RuntimeError(f"localstripe {last_error}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> LocalStripe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- configuration ----------------------------------------------------------------------

    def reset(self) -> None:
        """Empty the store and silence every webhook this harness registered."""
        for webhook_id in list(self._webhook_ids):
            self.unregister_webhook(webhook_id)
        httpx.delete(f"{self.url}/_config/data", timeout=5.0).raise_for_status()

    def register_webhook(self, webhook_id: str, url: str, secret: str,
                         events: list[str] | None = None) -> None:
        body: dict[str, Any] = {"url": url, "secret": secret}
        if events is not None:
            body["events"] = events
        httpx.post(f"{self.url}/_config/webhooks/{webhook_id}", json=body,
                   timeout=5.0).raise_for_status()
        self._webhook_ids.add(webhook_id)

    def unregister_webhook(self, webhook_id: str) -> None:
        # localstripe cannot delete a webhook; an empty event filter makes it deliver nothing.
        httpx.post(f"{self.url}/_config/webhooks/{webhook_id}",
                   json={"url": "http://127.0.0.1:9/", "secret": "unused", "events": []},
                   timeout=5.0).raise_for_status()
        self._webhook_ids.discard(webhook_id)

    def billing_config(self, *, webhook_secret: str | None = None) -> BillingConfig:
        return BillingConfig(api_key=self.api_key, webhook_secret=webhook_secret,
                             api_base=self.url, timeout_seconds=10.0)

    @property
    def client(self) -> stripe.StripeClient:
        if self._client is None:
            self._client = stripe.StripeClient(self.api_key, base_addresses={"api": self.url},
                                               http_client=stripe.RequestsClient(timeout=10))
        return self._client

    # ---- fixtures ---------------------------------------------------------------------------

    def create_customer(self, payment_method: str | None = CARD_OK, *,
                        email: str | None = None) -> str:
        """A customer; with ``payment_method`` attached and made the invoice default."""
        params: dict[str, Any] = {}
        if email:
            params["email"] = email
        customer = self.client.v1.customers.create(params=params)  # type: ignore[arg-type]
        if payment_method is not None:
            self.set_default_card(customer.id, payment_method)
        return str(customer.id)

    def set_default_card(self, customer_id: str, payment_method: str = CARD_OK) -> str:
        """Attach a (test) payment method and make it the default; returns the new pm id."""
        pm = self.client.v1.payment_methods.attach(payment_method,
                                                   params={"customer": customer_id})
        self.client.v1.customers.update(
            customer_id, params={"invoice_settings": {"default_payment_method": pm.id}})
        return str(pm.id)

    def list_all(self, resource: str, **params: Any) -> list[dict[str, Any]]:
        """Every object of a kind (``payment_intents``, ``subscriptions``, ``charges``...)."""
        out: list[dict[str, Any]] = []
        starting_after: str | None = None
        while True:
            query = {"limit": 100, **params}
            if starting_after:
                query["starting_after"] = starting_after
            resp = httpx.get(f"{self.url}/v1/{resource}", params=query,
                             headers={"Authorization": f"Bearer {self.api_key}"}, timeout=10.0)
            resp.raise_for_status()
            page = resp.json()
            out.extend(page["data"])
            if not page.get("has_more") or not page["data"]:
                return out
            starting_after = page["data"][-1]["id"]


def signed_event(event_type: str, obj: Mapping[str, Any], secret: str, *,
                 event_id: str | None = None, timestamp: int | None = None
                 ) -> tuple[bytes, dict[str, str]]:
    """A Stripe event body and headers signed with ``secret``, as Stripe would post them."""
    ts = int(time.time()) if timestamp is None else timestamp
    event = {
        "id": event_id or "evt_" + secrets.token_hex(12),
        "object": "event",
        "type": event_type,
        "created": ts,
        "livemode": False,
        "api_version": "2017-08-15",
        "data": {"object": dict(obj)},
    }
    payload = json.dumps(event, separators=(",", ":"))
    header = stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=ts)
    return payload.encode(), {"Content-Type": "application/json", "Stripe-Signature": header}


async def wait_until(predicate: Callable[[], T | Awaitable[T]], timeout: float = 15.0,
                     interval: float = 0.05, message: str | None = None) -> T:
    """Poll ``predicate`` (sync or async) until truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        value = predicate()
        if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        last = value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message or 'condition'} not true after {timeout}s "
                                 f"(last value {last!r})")
        await asyncio.sleep(interval)


class CountingDeduplicator(EventDeduplicator):
    """Also counts deliveries per event id (so a test can wait for a redelivery to arrive)."""

    def __init__(self, capacity: int = 1000) -> None:
        super().__init__(capacity)
        self.deliveries: dict[str, int] = {}

    def claim(self, event_id: str) -> bool:
        self.deliveries[event_id] = self.deliveries.get(event_id, 0) + 1
        return super().claim(event_id)


class WebhookReceiver:
    """``webhook_app`` on 127.0.0.1:<free port>, recording every event it handled."""

    def __init__(self, config: BillingConfig) -> None:
        self.config = config
        self.events: list[dict[str, Any]] = []
        self.dedup = CountingDeduplicator()
        self.fail_next = 0  # make the next N callbacks raise (to test redelivery)
        self.port = free_port()
        self.app = webhook_app(config, self._on_event, dedup=self.dedup)
        self._server = uvicorn.Server(uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off",
            access_log=False))
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stripe/webhook"

    async def _on_event(self, event: dict[str, Any]) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise RuntimeError("handler failure requested by the test")
        self.events.append(event)

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == event_type]

    async def start(self) -> WebhookReceiver:
        self._task = asyncio.create_task(self._server.serve())
        await wait_until(lambda: self._server.started or self._task.done(),  # type: ignore
                         timeout=10, message="webhook receiver started")
        if self._task.done():
            self._task.result()
        return self

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout=10)


@contextlib.contextmanager
def running_localstripe(**kwargs: Any) -> Iterator[LocalStripe]:
    server = LocalStripe(**kwargs)
    try:
        yield server.start()
    finally:
        server.stop()
