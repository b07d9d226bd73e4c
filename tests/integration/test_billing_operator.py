"""The operator with Stripe billing on, end to end: the real API server, the real operator process
(its own, in an ``x-`` namespace the shared operator ignores), a real localstripe, and signed
webhooks posted to the operator's own webhook port.

Webhook tests run the operator with a one-hour resync, so whatever happens within seconds of an
event was done because of that event.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import random
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, cast

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpupool import names, pricing
from gpupool.billing.localstripe import (
    CARD_DECLINES_CHARGES,
    CARD_OK,
    WEBHOOK_SECRET,
    LocalStripe,
    free_port,
    signed_event,
)
from gpupool.blocks import Block
from gpupool.devcluster import LocalCluster
from support.objects import GROUP, VERSION, Objects, condition, pool_body, sub_body
from support.operator import OperatorProcess
from support.stripe import (
    OperatorWebhook,
    StripeOutage,
    make_past_due,
    operator_env,
    pay_invoice,
    reservation_fees,
    stripe_subscription,
    stripe_subscriptions,
)
from support.waiting import assert_stays, wait_for

pytest_plugins = ["support.stripe"]
pytestmark = pytest.mark.integration

Obj = dict[str, Any]
ALL_BLOCKS = ["asia", "europe", "americas"]  # bought by subscriptions whose key must be open now
NO_PAYMENT_METHOD = "No payment method found — add a card first"  # the seeds' words
DECLINED = "Your card was declined."  # localstripe's message for 4000000000000341


class Rig:
    """One operator process with billing on, serving one namespace, plus what tests need around
    it: the namespace's objects, localstripe, the operator's webhook port and metrics."""

    def __init__(self, cluster: LocalCluster, kube: client.ApiClient, namespace: str,
                 stripe: LocalStripe, name: str) -> None:
        self.cluster = cluster
        self.kube = kube
        self.ns = namespace
        self.stripe = stripe
        self.name = name
        self.objs = Objects(kube, namespace)
        self.hook = OperatorWebhook(free_port())
        self.metrics_port = free_port()
        self.op: OperatorProcess | None = None

    def start(self, resync: float = 3600, api_base: str | None = None) -> Rig:
        env = {**operator_env(self.stripe, self.hook.port, api_base=api_base),
               "GPUPOOL_RESYNC_SECONDS": str(resync),
               "GPUPOOL_METRICS_PORT": str(self.metrics_port)}
        self.op = OperatorProcess(self.cluster.kubeconfig, name=self.name, env=env,
                                  namespaces=[self.ns]).start()
        self.hook.wait_ready()
        return self

    @property
    def operator(self) -> OperatorProcess:
        assert self.op is not None, "operator not started"
        return self.op

    def restart(self) -> None:
        """SIGKILL, then a new process (which finds everything again by listing)."""
        self.operator.kill()
        self.operator.start()
        self.hook.wait_ready()

    def stop(self) -> None:
        if self.op is not None:
            self.op.stop()

    # -- reading -------------------------------------------------------------------------------
    def sub(self, name: str) -> Obj:
        return self.objs.sub(name)

    def status(self, name: str) -> Obj:
        return dict(self.sub(name).get("status") or {})

    def billing(self, name: str) -> Obj:
        return dict(self.status(name).get("billing") or {})

    def uid(self, name: str) -> str:
        return str(self.sub(name)["metadata"]["uid"])

    def cond(self, name: str, type_: str) -> Obj:
        return condition(self.sub(name), type_) or {}

    def gate_label(self, name: str) -> str | None:
        labels = self.objs.secret_labels(names.key_secret_name(name))
        return None if labels is None else labels.get(names.LABEL_GATE)

    def has_key(self, name: str) -> bool:
        data = self.objs.secret_data(names.key_secret_name(name))  # never printed
        return bool(data and data.get("apiKey", "").startswith("sk_pool_"))

    def key_open(self, name: str) -> bool:
        """The key works now: phase active, gate open in status and on the Secret."""
        st = self.status(name)
        return (st.get("phase") == "active" and st.get("gate") == "open"
                and self.gate_label(name) == "open" and self.has_key(name))

    def metric(self, name: str, **labels: str) -> float:
        """A counter of this operator process, summed over the series matching ``labels``."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        pattern = re.compile(rf'^{name}\{{(?P<labels>[^}}]*)\}} (?P<v>\S+)$', re.MULTILINE)
        return sum(float(m["v"]) for m in pattern.finditer(text)
                   if all(f'{k}="{v}"' in m["labels"] for k, v in labels.items()))

    def stripe_calls(self, operation: str) -> float:
        """The operator's ``gpupool_stripe_calls_total`` for one operation (all outcomes)."""
        return self.metric("gpupool_stripe_calls_total", operation=operation)

    def describe(self, name: str) -> str:
        st = self.status(name)
        conds = [(c.get("type"), c.get("status"), c.get("reason"), c.get("message"))
                 for c in st.get("conditions") or []]
        return (f"{name}: phase={st.get('phase')} gate={st.get('gate')} "
                f"billing={st.get('billing')} conditions={conds}")

    # -- doing ---------------------------------------------------------------------------------
    def customer(self, payment_method: str | None = CARD_OK) -> str:
        return self.stripe.create_customer(payment_method)

    def subscribe(self, name: str, pool: str, customer: str, blocks: list[str] | None = None,
                  **spec: Any) -> None:
        self.objs.create(sub_body(name, pool, blocks or ALL_BLOCKS, customer={"id": customer},
                                  **spec))

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> Obj:
        return wait_for(lambda: ((s := self.sub(name)).get("status") or {}).get("phase") == phase
                        and s, timeout=timeout,
                        message=lambda: f"{phase} ({self.describe(name)})")

    def active_pool_with(self, pool: str, sub: str, customer: str, **spec: Any) -> Obj:
        """An open pool (threshold 0) and one subscription to it, active with its key open."""
        self.objs.create(pool_body(pool, **spec))
        self.subscribe(sub, pool, customer)
        self.wait_phase(sub, "active")
        wait_for(lambda: self.key_open(sub), timeout=30,
                 message=lambda: f"key open ({self.describe(sub)})")
        return self.sub(sub)

    def wait_settled(self, quiet: float = 2.0, timeout: float = 30) -> None:
        """Until the operator has made no Stripe call for ``quiet`` seconds (the reconciles that
        follow its own status writes have run)."""
        def calls() -> float:
            return self.metric("gpupool_stripe_calls_total")
        last = [calls(), time.monotonic()]

        def settled() -> bool:
            now = calls()
            if now != last[0]:
                last[:] = [now, time.monotonic()]
            return time.monotonic() - last[1] >= quiet
        wait_for(settled, timeout=timeout, interval=0.2, message="operator quiet")


def strip_finalizers(kube: client.ApiClient, namespace: str) -> None:
    """After the operator stopped: let the namespace go (Subscriptions carry its finalizer)."""
    api = client.CustomObjectsApi(kube)
    for plural in ("subscriptions", "pools"):
        with contextlib.suppress(ApiException):
            listed = cast(Obj, api.list_namespaced_custom_object(GROUP, VERSION, namespace,
                                                                 plural))
            for obj in listed["items"]:
                if obj["metadata"].get("finalizers"):
                    with contextlib.suppress(ApiException):
                        api.patch_namespaced_custom_object(
                            GROUP, VERSION, namespace, plural, obj["metadata"]["name"],
                            {"metadata": {"finalizers": None}})


@pytest.fixture
def rig(cluster: LocalCluster, kube: client.ApiClient, own_namespace: str,
        stripe_server: LocalStripe, request: pytest.FixtureRequest) -> Iterator[Rig]:
    name = "operator-billing-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[5:45]
    r = Rig(cluster, kube, own_namespace, stripe_server, name.strip("-"))
    try:
        yield r
    finally:
        r.stop()
        strip_finalizers(kube, own_namespace)


def charged_reason_is(rig: Rig, name: str, reason: str) -> bool:
    return rig.cond(name, "Charged").get("reason") == reason


def observed(rig: Rig, name: str, generation: int) -> bool:
    """The operator has reconciled ``generation`` of the Subscription to the end."""
    return rig.status(name).get("observedGeneration") == generation


def cents(amount: str | Decimal) -> int:
    return pricing.to_cents(Decimal(amount))


def succeeded_charges(server: LocalStripe, customer: str) -> list[Obj]:
    return [c for c in server.list_all("charges", customer=customer) if c["status"] == "succeeded"]


def stripe_time(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# ---- 1. pledge: the reservation fee, once -------------------------------------------------------

def test_pledge_charges_the_pools_reservation_fee_once_across_restarts(rig: Rig) -> None:
    rig.start()
    customer = rig.customer()
    rig.objs.create(pool_body("fund", activationThreshold=100, reservationFee="2.50"))
    rig.subscribe("pledger", "fund", customer, ["europe"])
    sub = rig.wait_phase("pledger", "pledged")
    uid = sub["metadata"]["uid"]

    fees = reservation_fees(rig.stripe, uid)
    assert [(f["status"], f["amount"], f["currency"], f["customer"]) for f in fees] == \
        [("succeeded", 250, "usd", customer)]
    billing = sub["status"]["billing"]
    assert billing["reservationCharged"] is True
    assert billing["reservationPaymentIntentId"] == fees[0]["id"]
    assert (condition(sub, "Charged") or {}).get("reason") == "ReservationFeePaid"
    assert rig.objs.pool("fund")["status"]["pledgedSlots"] == 1

    # The operator dies after Stripe charged but before the status said so: the next process
    # charges again only if it cannot find the fee by the Subscription's uid.
    rig.operator.kill()
    rig.objs.patch_status("subscriptions", "pledger", {"billing": {
        "reservationCharged": None, "reservationPaymentIntentId": None}})
    assert "reservationCharged" not in rig.billing("pledger")
    rig.operator.start()
    wait_for(lambda: rig.billing("pledger").get("reservationCharged") is True, timeout=30,
             message=lambda: rig.describe("pledger"))
    assert rig.billing("pledger")["reservationPaymentIntentId"] == fees[0]["id"]

    # And once more: a restart, then a spec change (a new generation) reconciled to the end.
    rig.restart()
    patched = rig.objs.patch("subscriptions", "pledger",
                             {"spec": {"customer": {"email": "pledger@example.com"}}})
    generation = patched["metadata"]["generation"]
    wait_for(lambda: rig.status("pledger").get("observedGeneration") == generation, timeout=30,
             message=lambda: rig.describe("pledger"))
    assert rig.status("pledger")["phase"] == "pledged"

    fees = reservation_fees(rig.stripe, uid)
    assert [(f["status"], f["amount"]) for f in fees] == [("succeeded", 250)]
    assert [c["amount"] for c in succeeded_charges(rig.stripe, customer)] == [250]
    assert stripe_subscriptions(rig.stripe, uid) == []  # the pool is still funding


# ---- 2. no payment method -----------------------------------------------------------------------

def test_no_payment_method_waits_pending_then_pledges_once_a_card_is_added(rig: Rig) -> None:
    rig.start()
    customer = rig.customer(payment_method=None)
    rig.objs.create(pool_body("fund", activationThreshold=100))
    rig.subscribe("cardless", "fund", customer, ["asia"])

    wait_for(lambda: rig.cond("cardless", "SeatsHeld").get("reason") == "NoPaymentMethod",
             timeout=30, message=lambda: rig.describe("cardless"))
    st = rig.status("cardless")
    assert st["phase"] == "pending"
    assert rig.cond("cardless", "SeatsHeld")["message"] == NO_PAYMENT_METHOD
    assert rig.cond("cardless", "Accepted")["status"] == "False"
    pool = rig.objs.wait_phase("pools", "fund", "funding")
    assert not pool["status"].get("ledger") and pool["status"]["pledgedSlots"] == 0
    uid = rig.uid("cardless")
    assert reservation_fees(rig.stripe, uid) == []

    rig.stripe.set_default_card(customer)
    # Re-checked every 30 s by the operator itself; nobody touches the Subscription.
    rig.wait_phase("cardless", "pledged", timeout=45)
    assert [f["status"] for f in reservation_fees(rig.stripe, uid)] == ["succeeded"]
    assert rig.cond("cardless", "Accepted")["status"] == "True"
    assert rig.objs.pool("fund")["status"]["pledgedSlots"] == 1


def test_stripe_outage_at_the_pledge_still_charges_the_fee_once(rig: Rig) -> None:
    """Stripe answers 5xx to the fee's charge, and the pool activates during the backoff: the
    seats were held while the pool was funding, so the fee is still due, and charged once."""
    outage = StripeOutage(rig.stripe.url).start()
    try:
        rig.start(api_base=outage.url)
        customer = rig.customer()
        rig.objs.create(pool_body("outage", activationThreshold=1))
        rig.objs.wait_phase("pools", "outage", "funding")
        outage.failing = lambda method, path: (method, path) == ("POST", "/v1/payment_intents")
        rig.subscribe("unlucky", "outage", customer, ["asia"])
        wait_for(lambda: outage.refused, timeout=30, message="the fee's charge attempted")
        rig.objs.wait_phase("pools", "outage", "active", timeout=60)
        outage.failing = None
        sub = rig.wait_phase("unlucky", "active", timeout=60)
        fees = reservation_fees(rig.stripe, sub["metadata"]["uid"])
        assert [(f["status"], f["amount"]) for f in fees] == [("succeeded", 100)], \
            rig.describe("unlucky")
        assert sub["status"]["billing"]["reservationPaymentIntentId"] == fees[0]["id"]
        assert len(stripe_subscriptions(rig.stripe, sub["metadata"]["uid"])) == 1
    finally:
        rig.stop()
        outage.stop()


# ---- 3. activation: one Stripe subscription, the right amount ---------------------------------

def test_activation_creates_one_stripe_subscription_with_the_right_amount(rig: Rig) -> None:
    rig.start()
    prices = {"asia": "39.00", "europe": "27.50", "americas": "10.01"}
    discount = Decimal("0.125")
    rig.objs.create(pool_body("act", activationThreshold=5, annualDiscount=str(discount),
                              blocks={b: {"price": p} for b, p in prices.items()}))
    by_block = {Block(b): Decimal(p) for b, p in prices.items()}
    # monthly: 2 x (39.00 + 27.50) = 133.00; yearly: 10.01 x 12 x 0.875 = 105.105 -> 105.11
    expected = {
        "monthly": (cents(pricing.monthly_price(by_block, (Block.ASIA, Block.EUROPE), 2)), "month"),
        "yearly": (cents(pricing.yearly_amount(
            pricing.monthly_price(by_block, (Block.AMERICAS,), 1), discount)), "year"),
    }
    assert expected == {"monthly": (13300, "month"), "yearly": (10511, "year")}
    customers = {"monthly": rig.customer(), "yearly": rig.customer()}
    rig.subscribe("monthly", "act", customers["monthly"], ["asia", "europe"], quantity=2)
    rig.wait_phase("monthly", "pledged")  # 4 of 5 seat-blocks: still funding
    assert rig.objs.pool("act")["status"]["phase"] == "funding"
    assert stripe_subscriptions(rig.stripe, rig.uid("monthly")) == []
    rig.subscribe("yearly", "act", customers["yearly"], ["americas"], billingCycle="year")

    for name, (amount, interval) in expected.items():
        sub = rig.wait_phase(name, "active", timeout=90)
        st = sub["status"]
        uid = sub["metadata"]["uid"]
        made = stripe_subscriptions(rig.stripe, uid)
        assert len(made) == 1, f"{name}: {len(made)} Stripe subscriptions"
        ss = made[0]
        assert ss["status"] == "active" and ss["customer"] == customers[name]
        item = ss["items"]["data"][0]
        assert (item["plan"]["amount"], item["plan"]["interval"], item["quantity"]) == \
            (amount, interval, 1)
        invoices = rig.stripe.list_all("invoices", subscription=ss["id"])
        assert [(i["amount_paid"], i["status"]) for i in invoices] == [(amount, "paid")]
        assert st["billing"]["subscriptionId"] == ss["id"]
        assert st["billing"]["status"] == "active"
        assert cents(st["amount"]) == amount and st["billingCycle"] == interval
        assert st["currentPeriodEnd"] == stripe_time(ss["current_period_end"])
        assert (condition(sub, "Charged") or {}).get("reason") == "Paid"
        assert (condition(sub, "KeyIssued") or {}).get("status") == "True"
        assert st["keySecretName"] == names.key_secret_name(name) and rig.has_key(name)
        assert len(reservation_fees(rig.stripe, uid)) == 1  # the pledge's, not charged again
    assert rig.objs.pool("act")["status"]["phase"] == "active"


# ---- 4. a declined card at activation -----------------------------------------------------------

def test_declined_card_gives_the_reason_and_no_key(rig: Rig) -> None:
    rig.start()
    rig.objs.create(pool_body("decl", activationThreshold=2))
    # At the pledge: the fee is declined once, the seats are given up, and the same card is not
    # tried again and again (a loop would keep the operator calling Stripe: it never settles).
    rig.subscribe("fee-declined", "decl", rig.customer(CARD_DECLINES_CHARGES), ["asia"])
    wait_for(functools.partial(charged_reason_is, rig, "fee-declined", "ReservationDeclined"),
             timeout=30, message=functools.partial(rig.describe, "fee-declined"))
    rig.wait_settled(quiet=3, timeout=20)
    st = rig.status("fee-declined")
    assert st["phase"] == "pending" and DECLINED in rig.cond("fee-declined", "Charged")["message"]
    assert rig.cond("fee-declined", "SeatsHeld")["reason"] == "ReservationDeclined"
    assert rig.cond("fee-declined", "Accepted")["status"] == "False"
    assert [f["status"] for f in reservation_fees(rig.stripe, rig.uid("fee-declined"))] == \
        ["requires_payment_method"]  # one attempt, declined
    assert "fee-declined" not in (rig.objs.pool("decl")["status"].get("ledger") or {})
    assert not rig.has_key("fee-declined")

    # At the activation.
    payer = rig.customer()
    rig.subscribe("declined", "decl", payer, ["asia"])
    rig.wait_phase("declined", "pledged")
    # Between the pledge and the activation the card on file stops working.
    rig.stripe.set_default_card(payer, CARD_DECLINES_CHARGES)
    rig.subscribe("trigger", "decl", rig.customer(), ["europe"])
    rig.wait_phase("trigger", "active", timeout=90)
    # Subscribing to the pool now that it is active, with a card that is declined.
    rig.subscribe("late", "decl", rig.customer(CARD_DECLINES_CHARGES), ["americas"])

    for name in ("declined", "late"):
        wait_for(functools.partial(charged_reason_is, rig, name, "PaymentFailed"), timeout=30,
                 message=functools.partial(rig.describe, name))
        charged = rig.cond(name, "Charged")
        assert charged["status"] == "False" and DECLINED in charged["message"]
        st = rig.status(name)
        assert st["phase"] == "past_due", rig.describe(name)
        assert "keySecretName" not in st and st.get("gate") == "closed"
        assert rig.objs.secret_data(names.key_secret_name(name)) is None
        made = stripe_subscriptions(rig.stripe, rig.uid(name))
        assert [s["status"] for s in made] == ["incomplete"]  # never active
        assert st["billing"]["subscriptionId"] == made[0]["id"]
    # "late" subscribed to an active pool: that is no pledge, so no reservation fee.
    assert reservation_fees(rig.stripe, rig.uid("late")) == []
    assert [f["status"] for f in reservation_fees(rig.stripe, rig.uid("declined"))] == \
        ["succeeded"]
    # Later passes (a new generation, reconciled to the end) keep the reason and grant nothing.
    for name in ("declined", "late"):
        generation = rig.objs.patch("subscriptions", name, {"spec": {"customer": {
            "email": f"{name}@example.com"}}})["metadata"]["generation"]
        wait_for(functools.partial(observed, rig, name, generation), timeout=30,
                 message=functools.partial(rig.describe, name))
    assert_stays(lambda: all(rig.status(n)["phase"] == "past_due" and not rig.has_key(n)
                             and DECLINED in rig.cond(n, "Charged")["message"]
                             for n in ("declined", "late")), duration=2)


def test_a_new_card_pays_the_declined_first_invoice_as_soon_as_stripe_says_so(rig: Rig) -> None:
    rig.start()
    rig.active_pool_with("card", "first", rig.customer())
    customer = rig.customer(CARD_DECLINES_CHARGES)
    rig.subscribe("late", "card", customer)
    wait_for(functools.partial(charged_reason_is, rig, "late", "PaymentFailed"), timeout=30,
             message=functools.partial(rig.describe, "late"))
    made = stripe_subscriptions(rig.stripe, rig.uid("late"))
    assert [s["status"] for s in made] == ["incomplete"]
    rig.wait_settled()

    # The customer adds a working card. Nothing touches the Subscription, and the operator has
    # no periodic re-check due within the hour: Stripe's event about the customer is the cue.
    pm = rig.stripe.set_default_card(customer)
    posted = time.monotonic()
    answer = rig.hook.post("payment_method.attached",
                           rig.stripe.client.v1.payment_methods.retrieve(pm).to_dict())
    assert answer.status_code == 200, answer.text
    wait_for(lambda: rig.key_open("late"), timeout=15, message=lambda: rig.describe("late"))
    opened_after = time.monotonic() - posted
    assert rig.cond("late", "Charged")["reason"] == "Paid"
    # The same Stripe subscription, its first invoice paid: no second subscription, no refund.
    paid = stripe_subscriptions(rig.stripe, rig.uid("late"))
    assert [(s["id"], s["status"]) for s in paid] == [(made[0]["id"], "active")]
    assert rig.status("late")["billing"]["subscriptionId"] == made[0]["id"]
    assert opened_after < 10, f"key opened {opened_after:.1f}s after the event"


# ---- 5. past_due closes the key at once; paid again opens it ------------------------------------

def test_past_due_webhook_closes_the_key_at_once_and_payment_reopens_it(rig: Rig) -> None:
    rig.start()
    customer = rig.customer()
    sub = rig.active_pool_with("pd", "renewer", customer)
    sub_id = sub["status"]["billing"]["subscriptionId"]
    secret = names.key_secret_name("renewer")
    rig.wait_settled()

    invoice = make_past_due(rig.stripe, sub_id)  # a renewal whose charge is declined
    assert stripe_subscription(rig.stripe, sub_id)["status"] == "past_due"
    posted = time.monotonic()
    answer = rig.hook.post("invoice.payment_failed", invoice)
    assert answer.status_code == 200, answer.text
    wait_for(lambda: rig.status("renewer").get("gate") == "closed"
             and rig.gate_label("renewer") == "closed", timeout=10,
             message=lambda: rig.describe("renewer"))
    closed_after = time.monotonic() - posted
    st = rig.status("renewer")
    assert st["phase"] == "past_due" and st["billing"]["status"] == "past_due"
    assert rig.cond("renewer", "Charged")["reason"] == "PaymentFailed"
    assert rig.objs.secret_data(secret) is not None  # closed, not revoked
    assert closed_after < 5, f"key closed {closed_after:.1f}s after the webhook"

    pay_invoice(rig.stripe, invoice["id"])
    assert stripe_subscription(rig.stripe, sub_id)["status"] == "active"
    answer = rig.hook.post("invoice.paid", rig.stripe.client.v1.invoices.retrieve(
        invoice["id"]).to_dict())
    assert answer.status_code == 200, answer.text
    wait_for(lambda: rig.key_open("renewer"), timeout=10,
             message=lambda: rig.describe("renewer"))
    assert rig.cond("renewer", "Charged")["reason"] == "Paid"

    # A late copy of the old failure (a new event id): the operator re-reads Stripe, where the
    # subscription is paid, and keeps the key open.
    answer = rig.hook.post("invoice.payment_failed", invoice)
    assert answer.status_code == 200 and not answer.json().get("duplicate")
    assert_stays(lambda: rig.key_open("renewer"), duration=3)
    assert len(stripe_subscriptions(rig.stripe, rig.uid("renewer"))) == 1


def test_a_new_card_pays_a_past_due_renewal_at_once_and_the_old_card_is_not_retried(
        rig: Rig) -> None:
    rig.start()
    customer = rig.customer()
    sub = rig.active_pool_with("renew", "late-payer", customer)
    sub_id = sub["status"]["billing"]["subscriptionId"]
    rig.wait_settled()
    invoice = make_past_due(rig.stripe, sub_id)  # the renewal is declined on the card on file
    assert rig.hook.post("invoice.payment_failed", invoice).status_code == 200
    wait_for(lambda: rig.status("late-payer").get("phase") == "past_due"
             and rig.gate_label("late-payer") == "closed", timeout=10,
             message=lambda: rig.describe("late-payer"))
    rig.wait_settled()

    # Something about the customer changes, the card does not: it is not charged again.
    charges = len(rig.stripe.list_all("charges"))
    customer_obj = rig.stripe.client.v1.customers.retrieve(customer).to_dict()
    assert rig.hook.post("customer.updated", customer_obj).status_code == 200
    rig.wait_settled()
    assert len(rig.stripe.list_all("charges")) == charges
    assert rig.status("late-payer")["phase"] == "past_due"

    # A new card: the open invoice is paid with it at once, and the key opens.
    pm = rig.stripe.set_default_card(customer)
    posted = time.monotonic()
    answer = rig.hook.post("payment_method.attached",
                           rig.stripe.client.v1.payment_methods.retrieve(pm).to_dict())
    assert answer.status_code == 200, answer.text
    wait_for(lambda: rig.key_open("late-payer"), timeout=15,
             message=lambda: rig.describe("late-payer"))
    opened_after = time.monotonic() - posted
    assert rig.stripe.client.v1.invoices.retrieve(invoice["id"]).status == "paid"
    assert stripe_subscription(rig.stripe, sub_id)["status"] == "active"
    assert len(stripe_subscriptions(rig.stripe, rig.uid("late-payer"))) == 1
    assert rig.cond("late-payer", "Charged")["reason"] == "Paid"
    assert opened_after < 10, f"key opened {opened_after:.1f}s after the event"


# ---- 6. cancel at period end --------------------------------------------------------------------

def test_cancel_at_period_end_keeps_the_key_until_stripe_ends_it(rig: Rig) -> None:
    rig.start()
    customer = rig.customer()
    sub = rig.active_pool_with("cape", "leaver", customer)
    sub_id = sub["status"]["billing"]["subscriptionId"]
    rig.objs.patch("subscriptions", "leaver", {"spec": {"cancelAtPeriodEnd": True}})

    wait_for(lambda: rig.billing("leaver").get("cancelAtPeriodEnd") is True
             and rig.cond("leaver", "CancelScheduled").get("status") == "True", timeout=30,
             message=lambda: rig.describe("leaver"))
    ss = stripe_subscription(rig.stripe, sub_id)
    assert ss["cancel_at_period_end"] is True and ss["status"] == "active"
    st = rig.status("leaver")
    assert st["currentPeriodEnd"] == stripe_time(ss["current_period_end"])
    assert st["currentPeriodEnd"] in rig.cond("leaver", "CancelScheduled")["message"]
    assert rig.key_open("leaver")
    assert_stays(lambda: rig.key_open("leaver"), duration=2)

    # The period ends: Stripe ends the subscription and says so.
    ended = rig.stripe.client.v1.subscriptions.cancel(sub_id).to_dict()
    assert ended["status"] == "canceled"
    answer = rig.hook.post("customer.subscription.deleted", ended)
    assert answer.status_code == 200, answer.text
    rig.wait_phase("leaver", "canceled", timeout=10)
    wait_for(lambda: rig.objs.secret_data(names.key_secret_name("leaver")) is None, timeout=10)
    st = rig.status("leaver")
    assert rig.cond("leaver", "SeatsHeld")["reason"] == "StripeCanceled"
    assert "keySecretName" not in st and st["gate"] == "closed" and st["canceledAt"]
    pool = wait_for(lambda: (p := rig.objs.pool("cape"))["status"]["pledgedSlots"] == 0 and p,
                    timeout=30)
    assert not pool["status"].get("ledger")
    assert all(s["reserved"] == 0 for s in pool["status"]["seats"].values())
    # No refund.
    assert rig.stripe.list_all("refunds") == []
    charges = rig.stripe.list_all("charges", customer=customer)
    assert charges and all(c["amount_refunded"] == 0 and not c["refunded"] for c in charges)
    assert len(stripe_subscriptions(rig.stripe, rig.uid("leaver"))) == 1


# ---- 7. a bad signature -------------------------------------------------------------------------

def test_webhook_with_a_bad_signature_is_refused_and_changes_nothing(rig: Rig) -> None:
    rig.start()
    sub = rig.active_pool_with("sig", "target", rig.customer())
    sub_id = sub["status"]["billing"]["subscriptionId"]
    rig.wait_settled()
    # Stripe's side changes behind the operator's back: any reconcile of "target" would now see
    # the subscription canceled. Only a verified event may cause one.
    ended = rig.stripe.client.v1.subscriptions.cancel(sub_id).to_dict()
    before = rig.sub("target")
    fetches = rig.stripe_calls("fetch")

    event_id = "evt_forged_0001"
    forged = rig.hook.post("customer.subscription.deleted", ended, secret="whsec_not_ours",
                           event_id=event_id)
    body, headers = signed_event("customer.subscription.deleted", ended, WEBHOOK_SECRET,
                                 event_id=event_id)
    tampered = rig.hook.post_raw(body.replace(b'"canceled"', b'"active"'), headers)
    unsigned = rig.hook.post_raw(body, {"Content-Type": "application/json"})
    assert [forged.status_code, tampered.status_code, unsigned.status_code] == [400, 400, 400]

    def unchanged() -> bool:
        now = rig.sub("target")
        return (now["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
                and rig.key_open("target") and rig.stripe_calls("fetch") == fetches)
    assert_stays(unchanged, duration=3)
    assert event_id not in rig.operator.log_text()

    # The same event, correctly signed, is not a "duplicate" of the refused ones and acts.
    answer = rig.hook.post_raw(body, headers)
    assert answer.status_code == 200 and not answer.json().get("duplicate"), answer.text
    rig.wait_phase("target", "canceled", timeout=10)
    assert rig.stripe_calls("fetch") > fetches


# ---- 8. deleting the object cancels on Stripe at once -------------------------------------------

def test_deleting_a_subscription_cancels_its_stripe_subscription_at_once(rig: Rig) -> None:
    rig.start()
    sub = rig.active_pool_with("del", "goner", rig.customer())
    sub_id = sub["status"]["billing"]["subscriptionId"]
    assert stripe_subscription(rig.stripe, sub_id)["status"] == "active"
    # The finalizer holds the deletion until Stripe has been told.
    assert names.SUBSCRIPTION_FINALIZER in sub["metadata"]["finalizers"]

    deleted_at = time.time()
    rig.objs.delete("subscriptions", "goner")
    ss = wait_for(lambda: (s := stripe_subscription(rig.stripe, sub_id))["status"] == "canceled"
                  and s, timeout=15, message="the Stripe subscription canceled")
    assert not ss["cancel_at_period_end"]  # now, not at the end of the period
    assert ss["ended_at"] is not None and ss["ended_at"] >= int(deleted_at) - 1
    assert ss["ended_at"] < ss["current_period_end"]
    wait_for(lambda: rig.objs.get("subscriptions", "goner") is None, timeout=30)
    wait_for(lambda: rig.objs.secret_data(names.key_secret_name("goner")) is None, timeout=30)
    wait_for(lambda: rig.objs.pool("del")["status"]["pledgedSlots"] == 0, timeout=30)
    assert len(stripe_subscriptions(rig.stripe, sub["metadata"]["uid"])) == 1


# ---- 9. SIGKILL at random moments ---------------------------------------------------------------

SUBS = 30
MIN_KILLS = 10
KILL_PHASE = 100  # seconds at most of creating and killing; about 30-60 s on an idle machine


def test_sigkill_at_random_moments_charges_each_step_exactly_once(rig: Rig) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    started = time.monotonic()
    rig.start(resync=30)
    objs = rig.objs
    # 30 seat-blocks: 10 seats in each block; 30 one-block pledges fill it and activate it.
    objs.create(pool_body("crowd", seats=10, activationThreshold=SUBS, annualDiscount="0.15"))
    customers = [rig.customer() for _ in range(6)]  # 5 Subscriptions each
    bodies = [sub_body(f"p{i:02d}", "crowd", [ALL_BLOCKS[i % 3]],
                       customer={"id": customers[i % len(customers)]},
                       billingCycle="year" if i % 2 else "month") for i in range(SUBS)]
    to_create = list(bodies)
    kills: list[dict[str, Any]] = []

    def snapshot() -> dict[str, Any]:
        phases = Counter((s.get("status") or {}).get("phase") for s in objs.list_subs())
        pool = (objs.pool("crowd").get("status") or {})
        return {"t": round(time.monotonic() - started, 1), "created": SUBS - len(to_create),
                "phases": dict(phases), "pool": pool.get("phase"),
                "pledgedSlots": pool.get("pledgedSlots")}

    def in_activation(snap: dict[str, Any]) -> bool:
        return snap["pool"] in ("activating", "active") and \
            snap["phases"].get("active", 0) < SUBS

    while True:
        # Pledges arrive three at a time while this process lives; then it dies at a random
        # moment (sooner once the pool activates, so kills land amid the activations too; and
        # soon after the last pledges, which start the activation: all 30 can be charged and
        # active within two seconds, before a kill at the usual pace lands).
        batch, to_create[:3] = to_create[:3], []
        for body in batch:
            objs.create(body)
        activating = bool(kills) and in_activation(kills[-1])
        if batch and not to_create:
            time.sleep(rng.uniform(0.05, 0.3))
        else:
            time.sleep(rng.uniform(0.1, 1.2) if activating else rng.uniform(0.2, 2.0))
        rig.operator.kill()
        kills.append(snapshot())
        during = sum(1 for k in kills if in_activation(k))
        done = (len(kills) >= MIN_KILLS and not to_create
                and (during >= 3 or kills[-1]["phases"].get("active", 0) == SUBS))
        if done or time.monotonic() - started > KILL_PHASE:
            break
        rig.operator.start()
    rig.operator.start()
    timeline = "\n".join(str(k) for k in kills)

    def all_active() -> bool:
        return sum(1 for s in objs.list_subs()
                   if (s.get("status") or {}).get("phase") == "active") == SUBS
    wait_for(all_active, timeout=90,
             message=lambda: f"all {SUBS} active (seed {seed}); now {snapshot()}; kills:\n"
             f"{timeline}")

    print(f"{len(kills)} kills, seed {seed}:\n{timeline}")  # shown with -s
    assert len(kills) >= MIN_KILLS, timeline
    assert any(k["pool"] == "funding" and k["created"] > 0 for k in kills), timeline
    assert any(in_activation(k) for k in kills), f"no kill during activation:\n{timeline}"
    # A restart never takes seats back: what was held at one kill is still held at the next.
    held = [k["pledgedSlots"] or 0 for k in kills]
    assert held == sorted(held), f"seats released by a restart:\n{timeline}"
    progressed = [(k["phases"].get("pledged", 0) + k["phases"].get("active", 0),
                   k["phases"].get("active", 0)) for k in kills]
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(progressed)), \
        f"a subscription fell back after a restart:\n{timeline}"

    # Count in localstripe: one fee and one subscription per Subscription, by metadata uid.
    problems = []
    for sub in objs.list_subs():
        name, uid, st = sub["metadata"]["name"], sub["metadata"]["uid"], sub["status"]
        fees = reservation_fees(rig.stripe, uid)
        made = stripe_subscriptions(rig.stripe, uid)
        if [(f["status"], f["amount"]) for f in fees] != [("succeeded", 100)]:
            problems.append(f"{name}: fees {[(f['id'], f['status']) for f in fees]}")
        elif st["billing"].get("reservationPaymentIntentId") != fees[0]["id"]:
            problems.append(f"{name}: status names fee {st['billing']}")
        if [s["status"] for s in made] != ["active"]:
            problems.append(f"{name}: Stripe subscriptions "
                            f"{[(s['id'], s['status']) for s in made]}")
        elif st["billing"].get("subscriptionId") != made[0]["id"]:
            problems.append(f"{name}: status names subscription {st['billing']}")
        elif made[0]["items"]["data"][0]["plan"]["amount"] != cents(st["amount"]):
            problems.append(f"{name}: plan amount {made[0]['items']['data'][0]['plan']['amount']}"
                            f" for {st['amount']}")
    assert not problems, "\n".join(problems) + f"\nseed {seed}; kills:\n{timeline}"
    # Nothing else moved money: per customer 5 fees and 5 first invoices, no other charge.
    for customer in customers:
        charges = rig.stripe.list_all("charges", customer=customer)
        assert sorted(c["status"] for c in charges) == ["succeeded"] * 10, customer
    assert len(rig.stripe.list_all("payment_intents")) == 2 * SUBS
    assert len(rig.stripe.list_all("subscriptions", status="all")) == SUBS

    # Once all are active, a restart changes nothing: no seat released, no key revoked or
    # re-minted, no Stripe object made.
    keys_before = {s["metadata"]["name"]: key_digest(rig, s["metadata"]["name"])
                   for s in objs.list_subs()}
    rig.restart()
    wait_for(lambda: rig.metric("gpupool_reconciles_total", resource="subscription") >= SUBS
             and rig.metric("gpupool_reconciles_total", resource="pool") >= 1, timeout=60,
             message="every object reconciled by the new process")
    rig.wait_settled()
    assert objs.pool("crowd")["status"]["pledgedSlots"] == SUBS
    assert all((s.get("status") or {}).get("phase") == "active" for s in objs.list_subs())
    assert {n: key_digest(rig, n) for n in keys_before} == keys_before
    lost = [(e.involved_object.name, e.reason) for e in rig.objs.core.list_namespaced_event(
        rig.ns).items if e.reason in ("SeatsLost", "KeyRevoked")]
    assert not lost, f"seats or keys lost over the restarts: {lost}"
    assert len(rig.stripe.list_all("payment_intents")) == 2 * SUBS
    assert len(rig.stripe.list_all("subscriptions", status="all")) == SUBS
    print(f"SIGKILL test: {time.monotonic() - started:.0f}s")  # bounded by KILL_PHASE + waits


def key_digest(rig: Rig, name: str) -> str:
    """A digest of a Subscription's API key, to compare keys without ever showing one."""
    data = rig.objs.secret_data(names.key_secret_name(name)) or {}
    return hashlib.sha256(data.get("apiKey", "").encode()).hexdigest()
