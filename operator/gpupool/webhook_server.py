"""Stripe webhooks, served by the operator's own process (one Deployment, one Service port).

Events are verified and de-duplicated by ``gpupool.billing.webhooks``; the operator never trusts
their payload: it finds the Subscription they concern and reconciles it, which re-fetches the
Stripe subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import uvicorn

from gpupool.billing import BillingConfig, event_targets, webhook_app

if TYPE_CHECKING:
    from gpupool.controller import Controller

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # kopf owns the process's signals.
        yield


WAITING_ON_THE_CUSTOMER = ("pending", "past_due")
"""Phases a change of the customer (a new card, new invoice settings) may move on."""


def find_subscription(ctl: Controller, event: dict[str, Any]) -> list[tuple[str, str]]:
    """The subscriptions an event concerns. An event about the customer alone
    (``payment_method.attached``, ``customer.updated``...) concerns that customer's subscriptions
    that wait on a payment: a new card is tried at once, not at the next periodic re-check."""
    targets = event_targets(event)
    by_customer = targets.customer_id if not (targets.subscription_id or targets.uid or
                                              targets.payment_intent_id or
                                              targets.invoice_id) else None
    found = []
    for key, sub in ctl.world.subs.items():
        status = sub.get("status") or {}
        billing = status.get("billing") or {}
        if (targets.subscription_id and billing.get("subscriptionId") == targets.subscription_id) \
                or (targets.uid and sub["metadata"].get("uid") == targets.uid) \
                or (targets.payment_intent_id and billing.get("reservationPaymentIntentId")
                    == targets.payment_intent_id) \
                or (by_customer and status.get("phase") in WAITING_ON_THE_CUSTOMER
                    and ((sub.get("spec") or {}).get("customer") or {}).get("id")
                    == by_customer):
            found.append(key)
    return found


async def serve(ctl: Controller, config: BillingConfig, port: int) -> None:
    async def on_event(event: dict[str, Any]) -> None:
        keys = find_subscription(ctl, event)
        log.info("stripe event %s (%s): %d subscription(s) to reconcile", event.get("id"),
                 event.get("type"), len(keys))
        for key in keys:
            ctl.subs.add(key)

    app = webhook_app(config, on_event)
    server = _EmbeddedServer(uvicorn.Config(app, host="0.0.0.0", port=port, log_level="warning",
                                            access_log=False, lifespan="off"))
    try:
        await server.serve()
    except asyncio.CancelledError:
        server.should_exit = True
        raise
