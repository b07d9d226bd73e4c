"""Webhook verification, de-duplication, event -> object mapping, and the Starlette app."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from gpupool.billing import (
    BillingConfig,
    EventDeduplicator,
    WebhookVerificationError,
    event_targets,
    verify_event,
    webhook_app,
)
from gpupool.billing.localstripe import signed_event
from gpupool.webhook_server import find_subscription

SECRET = "whsec_unit_test"


def test_good_signature_gives_the_event() -> None:
    body, headers = signed_event("invoice.paid", {"id": "in_1", "object": "invoice"}, SECRET,
                                 event_id="evt_1")
    event = verify_event(body, headers["Stripe-Signature"], SECRET)
    assert (event["id"], event["type"]) == ("evt_1", "invoice.paid")
    assert event["data"]["object"]["id"] == "in_1"
    assert isinstance(event, dict)


@pytest.mark.parametrize("case", ["wrong secret", "tampered", "no header", "garbage header",
                                  "stale", "no secret", "not json"])
def test_bad_signatures_are_refused(case: str) -> None:
    body, headers = signed_event("invoice.paid", {"id": "in_1"}, SECRET)
    header: str | None = headers["Stripe-Signature"]
    secret: str | None = SECRET
    if case == "wrong secret":
        body, headers = signed_event("invoice.paid", {"id": "in_1"}, "whsec_other")
        header = headers["Stripe-Signature"]
    elif case == "tampered":
        body = body.replace(b"in_1", b"in_2")
    elif case == "no header":
        header = None
    elif case == "garbage header":
        header = "nonsense"
    elif case == "stale":
        body, headers = signed_event("invoice.paid", {"id": "in_1"}, SECRET,
                                     timestamp=int(time.time()) - 3600)
        header = headers["Stripe-Signature"]
    elif case == "no secret":
        secret = None
    elif case == "not json":
        body = b"not json"
        from stripe import WebhookSignature

        header = WebhookSignature.generate_signature_header(body.decode(), SECRET)
    with pytest.raises(WebhookVerificationError):
        verify_event(body, header, secret)


def test_deduplicator_is_bounded_and_lru() -> None:
    dedup = EventDeduplicator(capacity=3)
    assert [dedup.claim(e) for e in ("a", "b", "c")] == [True, True, True]
    assert not dedup.claim("a")  # seen; also refreshed
    assert dedup.claim("d")  # evicts the least recent: "b"
    assert len(dedup) == 3
    assert "b" not in dedup and "a" in dedup
    assert dedup.claim("b")
    dedup.release("b")
    assert dedup.claim("b")
    with pytest.raises(ValueError):
        EventDeduplicator(capacity=0)


def _event(etype: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"id": "evt_x", "type": etype, "data": {"object": obj}}


def test_targets_of_subscription_events() -> None:
    t = event_targets(_event("customer.subscription.updated", {
        "id": "sub_1", "object": "subscription", "customer": "cus_1",
        "metadata": {"gpupool_uid": "uid-1"}}))
    assert (t.subscription_id, t.customer_id, t.uid, t.payment_intent_id) == \
        ("sub_1", "cus_1", "uid-1", None)


def test_targets_of_old_shape_invoice_events() -> None:
    t = event_targets(_event("invoice.payment_failed", {
        "id": "in_1", "object": "invoice", "customer": "cus_1", "subscription": "sub_1",
        "payment_intent": "pi_1", "subscription_details": {"metadata": {"gpupool_uid": "u"}}}))
    assert (t.subscription_id, t.invoice_id, t.payment_intent_id, t.uid) == \
        ("sub_1", "in_1", "pi_1", "u")


def test_targets_of_new_shape_invoice_events() -> None:
    t = event_targets(_event("invoice.paid", {
        "id": "in_2", "object": "invoice", "customer": "cus_2",
        "parent": {"type": "subscription_details", "subscription_details": {
            "subscription": "sub_2", "metadata": {"gpupool_uid": "u2"}}}}))
    assert (t.subscription_id, t.uid, t.customer_id) == ("sub_2", "u2", "cus_2")
    lines_only = event_targets(_event("invoice.payment_failed", {
        "id": "in_3", "object": "invoice", "lines": {"data": [{"parent": {
            "subscription_item_details": {"subscription": "sub_3"}}}]}}))
    assert lines_only.subscription_id == "sub_3"


def test_targets_of_payment_events() -> None:
    pi = event_targets(_event("payment_intent.payment_failed", {
        "id": "pi_1", "object": "payment_intent", "customer": "cus_1",
        "metadata": {"gpupool_uid": "u", "gpupool_step": "reservation_fee"}}))
    assert (pi.payment_intent_id, pi.uid, pi.subscription_id) == ("pi_1", "u", None)
    charge = event_targets(_event("charge.failed", {
        "id": "ch_1", "object": "charge", "payment_intent": "pi_2", "customer": "cus_1"}))
    assert charge.payment_intent_id == "pi_2"
    paid = event_targets(_event("invoice_payment.paid", {
        "id": "inpay_1", "object": "invoice_payment", "invoice": "in_1",
        "payment": {"type": "payment_intent", "payment_intent": "pi_3"}}))
    assert (paid.invoice_id, paid.payment_intent_id) == ("in_1", "pi_3")


def test_targets_of_customer_events() -> None:
    cus = event_targets(_event("customer.updated", {"id": "cus_1", "object": "customer"}))
    assert cus.customer_id == "cus_1" and cus.subscription_id is None
    pm = event_targets(_event("payment_method.attached", {
        "id": "pm_1", "object": "payment_method", "customer": "cus_2"}))
    assert pm.customer_id == "cus_2" and not pm.empty
    assert event_targets(_event("balance.available", {"object": "balance"})).empty


def _world_of(*subs: tuple[str, str, str, str]) -> Any:
    """A controller stand-in holding only the watch's subscriptions (name, customer, phase,
    Stripe subscription id): ``find_subscription`` reads nothing else."""
    held = {("ns", name): {"metadata": {"name": name, "uid": f"uid-{name}"},
                           "spec": {"customer": {"id": customer}},
                           "status": {"phase": phase, "billing": {"subscriptionId": sub_id}}}
            for name, customer, phase, sub_id in subs}
    return SimpleNamespace(world=SimpleNamespace(subs=held))


def test_an_event_about_the_customer_alone_wakes_its_subscriptions_waiting_on_payment() -> None:
    ctl = _world_of(("declined", "cus_1", "past_due", "sub_1"),
                    ("cardless", "cus_1", "pending", ""),
                    ("fine", "cus_1", "active", "sub_2"),
                    ("other", "cus_2", "past_due", "sub_3"))
    attached = _event("payment_method.attached", {"id": "pm_1", "object": "payment_method",
                                                  "customer": "cus_1"})
    assert sorted(k[1] for k in find_subscription(ctl, attached)) == ["cardless", "declined"]
    updated = _event("customer.updated", {"id": "cus_2", "object": "customer"})
    assert [k[1] for k in find_subscription(ctl, updated)] == ["other"]
    # An event that names a Stripe subscription concerns that one only, whatever its customer.
    renewal = _event("invoice.payment_failed", {"id": "in_1", "object": "invoice",
                                                "subscription": "sub_2", "customer": "cus_1"})
    assert [k[1] for k in find_subscription(ctl, renewal)] == ["fine"]


# ---- the app ------------------------------------------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.fail = 0

    async def __call__(self, event: dict[str, Any]) -> None:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("handler failed")
        self.events.append(event)


def _client(config: BillingConfig, recorder: Recorder) -> httpx.AsyncClient:
    app = webhook_app(config, recorder)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_app_accepts_verified_events_once() -> None:
    recorder = Recorder()
    body, headers = signed_event("customer.subscription.updated",
                                 {"id": "sub_1", "object": "subscription"}, SECRET)
    async with _client(BillingConfig(webhook_secret=SECRET), recorder) as client:
        first = await client.post("/stripe/webhook", content=body, headers=headers)
        second = await client.post("/stripe/webhook", content=body, headers=headers)
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.json()["duplicate"] is True
    assert [e["data"]["object"]["id"] for e in recorder.events] == ["sub_1"]


async def test_app_refuses_bad_signatures_and_calls_nothing() -> None:
    recorder = Recorder()
    body, headers = signed_event("invoice.paid", {"id": "in_1"}, "whsec_wrong", event_id="evt_1")
    async with _client(BillingConfig(webhook_secret=SECRET), recorder) as client:
        bad = await client.post("/stripe/webhook", content=body, headers=headers)
        unsigned = await client.post("/stripe/webhook", content=json.dumps({"id": "evt"}))
        wrong_method = await client.get("/stripe/webhook")
        assert (bad.status_code, unsigned.status_code, wrong_method.status_code) == \
            (400, 400, 405)
        assert recorder.events == []
        # The refused event id was not remembered: the genuine event still gets through.
        body, headers = signed_event("invoice.paid", {"id": "in_1"}, SECRET, event_id="evt_1")
        good = await client.post("/stripe/webhook", content=body, headers=headers)
    assert good.status_code == 200 and [e["id"] for e in recorder.events] == ["evt_1"]


async def test_app_releases_an_event_whose_handler_failed() -> None:
    recorder = Recorder()
    recorder.fail = 1
    body, headers = signed_event("invoice.payment_failed", {"id": "in_1"}, SECRET)
    async with _client(BillingConfig(webhook_secret=SECRET), recorder) as client:
        failed = await client.post("/stripe/webhook", content=body, headers=headers)
        retried = await client.post("/stripe/webhook", content=body, headers=headers)
    assert (failed.status_code, retried.status_code) == (500, 200)
    assert len(recorder.events) == 1


async def test_app_without_a_secret_is_unavailable() -> None:
    recorder = Recorder()
    body, headers = signed_event("invoice.paid", {"id": "in_1"}, SECRET)
    async with _client(BillingConfig(api_key="sk_test_x"), recorder) as client:
        answer = await client.post("/stripe/webhook", content=body, headers=headers)
    assert answer.status_code == 503
    assert recorder.events == []


async def test_app_never_logs_the_secret_or_body(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    body, headers = signed_event("invoice.paid", {"id": "in_secretive"}, "whsec_wrong")
    caplog.set_level("DEBUG")
    async with _client(BillingConfig(webhook_secret=SECRET), recorder) as client:
        await client.post("/stripe/webhook", content=body, headers=headers)
    assert SECRET not in caplog.text and "in_secretive" not in caplog.text
