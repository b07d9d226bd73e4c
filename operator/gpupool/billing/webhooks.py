"""Stripe webhooks: verify, de-duplicate, and say what to re-fetch. Never trust the payload.

Stripe (and localstripe) deliver events at least once and in any order. The operator therefore
uses an event only as a hint: :func:`event_targets` names the subscription / payment intent /
customer it concerns, and the operator re-reads that object from Stripe and reconciles.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import stripe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gpupool.billing.config import BillingConfig
from gpupool.billing.errors import WebhookVerificationError

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/stripe/webhook"
SIGNATURE_HEADER = "Stripe-Signature"

Event = dict[str, Any]
EventCallback = Callable[[Event], Awaitable[None]]


def verify_event(payload: bytes, sig_header: str | None, secret: str | None, *,
                 tolerance: int = stripe.Webhook.DEFAULT_TOLERANCE) -> Event:
    """Check the ``Stripe-Signature`` of a raw body and return the event as a plain dict.

    Raises :class:`WebhookVerificationError` on a missing/bad/stale signature, a missing secret,
    or a body that is not a Stripe event.
    """
    if not secret:
        raise WebhookVerificationError("no webhook signing secret configured")
    if not sig_header:
        raise WebhookVerificationError("missing Stripe-Signature header")
    try:
        event = stripe.Webhook.construct_event(payload, sig_header, secret, tolerance)
    except stripe.SignatureVerificationError:
        raise WebhookVerificationError("bad Stripe-Signature") from None
    except (ValueError, UnicodeDecodeError):
        raise WebhookVerificationError("body is not a Stripe event") from None
    data = event.to_dict()
    if not isinstance(data.get("id"), str) or not isinstance(data.get("type"), str):
        raise WebhookVerificationError("event without id or type")
    return data


class EventDeduplicator:
    """Remembers the last ``capacity`` event ids (LRU), so a redelivered event is handled once.

    ``claim`` before handling; ``release`` if handling failed so Stripe's retry is handled.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._seen

    def claim(self, event_id: str) -> bool:
        """True the first time an id is seen (handle it); False for a duplicate."""
        if event_id in self._seen:
            self._seen.move_to_end(event_id)
            return False
        self._seen[event_id] = None
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True

    def release(self, event_id: str) -> None:
        self._seen.pop(event_id, None)


@dataclass(frozen=True)
class EventTargets:
    """What an event is about. Re-fetch these; do not act on the payload."""

    event_id: str
    type: str
    subscription_id: str | None = None
    payment_intent_id: str | None = None
    invoice_id: str | None = None
    customer_id: str | None = None
    uid: str | None = None  # the gpupool uid from metadata, when the payload carries it

    @property
    def empty(self) -> bool:
        return not (self.subscription_id or self.payment_intent_id or self.customer_id)


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _ident(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, Mapping) and isinstance(value.get("id"), str):
        return value["id"]
    return None


def _uid(*metas: Any) -> str | None:
    for meta in metas:
        if isinstance(meta, Mapping) and isinstance(meta.get("gpupool_uid"), str):
            return meta["gpupool_uid"]
    return None


def _invoice_subscription(inv: Mapping[str, Any]) -> str | None:
    found = (_ident(inv.get("subscription"))  # API before 2025-03-31
             or _ident(_get(inv, "parent", "subscription_details", "subscription")))
    if found:
        return found
    lines = _get(inv, "lines", "data")
    for line in lines if isinstance(lines, list) else []:
        found = (_ident(_get(line, "parent", "subscription_item_details", "subscription"))
                 or _ident(_get(line, "subscription")))
        if found:
            return found
    return None


def event_targets(event: Mapping[str, Any]) -> EventTargets:
    """Map an event to the Stripe objects to re-fetch (subscription, payment intent, customer).

    Handles ``customer.subscription.*``, ``invoice.*`` (old ``invoice.subscription`` and newer
    ``parent.subscription_details``), ``invoice_payment.*``, ``payment_intent.*``, ``charge.*``,
    ``customer.*``, ``payment_method.*`` and ``setup_intent.*``; anything else gives only the
    customer, if any.
    """
    etype = str(event.get("type") or "")
    obj = _get(event, "data", "object")
    obj = obj if isinstance(obj, Mapping) else {}
    kind = str(obj.get("object") or etype.rsplit(".", 1)[0])
    sub = pi = inv = None
    customer = _ident(obj.get("customer"))
    uid = _uid(obj.get("metadata"))

    if kind == "subscription" or etype.startswith("customer.subscription."):
        sub = _ident(obj)
    elif kind == "invoice" or etype.startswith("invoice."):
        inv = _ident(obj)
        sub = _invoice_subscription(obj)
        pi = _ident(obj.get("payment_intent"))
        uid = uid or _uid(_get(obj, "subscription_details", "metadata"),
                          _get(obj, "parent", "subscription_details", "metadata"))
    elif kind == "invoice_payment" or etype.startswith("invoice_payment."):
        inv = _ident(obj.get("invoice"))
        pi = _ident(_get(obj, "payment", "payment_intent"))
    elif kind == "payment_intent" or etype.startswith("payment_intent."):
        pi = _ident(obj)
        inv = _ident(obj.get("invoice"))
    elif kind == "charge" or etype.startswith("charge."):
        pi = _ident(obj.get("payment_intent"))
        inv = _ident(obj.get("invoice"))
    elif kind == "customer" or (etype.startswith("customer.") and "." not in etype[9:]):
        customer = _ident(obj)
    # payment_method.*, setup_intent.*, customer.source.*: the customer field above is enough.
    return EventTargets(event_id=str(event.get("id") or ""), type=etype, subscription_id=sub,
                        payment_intent_id=pi, invoice_id=inv, customer_id=customer, uid=uid)


MAX_BODY_BYTES = 1 << 20  # Stripe events are far smaller


def webhook_app(config: BillingConfig, on_event: EventCallback, *,
                dedup: EventDeduplicator | None = None, path: str = WEBHOOK_PATH) -> Starlette:
    """A Starlette app serving ``POST /stripe/webhook``.

    400 for a bad signature or body (nothing else happens); 200 after ``on_event`` handled a
    verified event, or at once for a duplicate; 500 if ``on_event`` raised (the event is released
    so Stripe's retry is handled); 503 when no signing secret is configured; 413 over 1 MiB.
    Logs event ids and types only, never bodies or secrets. Stripe waits only seconds for the
    answer: ``on_event`` should enqueue work (e.g. poke a reconcile), not do it.
    """
    seen = dedup if dedup is not None else EventDeduplicator()

    async def receive(request: Request) -> JSONResponse:
        if not config.webhook_secret:
            return JSONResponse({"error": "webhooks are not configured"}, status_code=503)
        payload = await request.body()
        if len(payload) > MAX_BODY_BYTES:
            return JSONResponse({"error": "body too large"}, status_code=413)
        try:
            event = verify_event(payload, request.headers.get(SIGNATURE_HEADER),
                                 config.webhook_secret,
                                 tolerance=config.webhook_tolerance_seconds)
        except WebhookVerificationError as err:
            log.warning("refused a Stripe webhook: %s", err)
            return JSONResponse({"error": str(err)}, status_code=400)
        event_id = event["id"]
        if not seen.claim(event_id):
            log.debug("duplicate Stripe event %s (%s) ignored", event_id, event["type"])
            return JSONResponse({"received": True, "duplicate": True})
        try:
            await on_event(event)
        except Exception:
            seen.release(event_id)
            log.exception("handling Stripe event %s (%s) failed", event_id, event["type"])
            return JSONResponse({"error": "handler failed"}, status_code=500)
        return JSONResponse({"received": True})

    app = Starlette(routes=[Route(path, receive, methods=["POST"])])
    app.state.dedup = seen
    return app
