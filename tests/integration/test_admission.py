"""Admission webhooks on the real control plane: ``kubectl apply`` gets the answer at apply time.

Each test runs an operator of its own (``GPUPOOL_ADMISSION_PORT`` set, watching one ``x-…``
namespace) and applies the chart's own ValidatingWebhookConfiguration
(``templates/admission.yaml``, rendered with ``helm template``), pointed at
``https://127.0.0.1:PORT`` and scoped by a namespaceSelector to a label only the test's
namespace carries: the configuration is cluster-scoped, and no other test's objects may ever reach
this webhook. It is deleted at the end. The operator writes the caBundle of the self-signed CA it
makes at start; the API server then calls it over TLS on loopback, and each case is refused by
``kubectl apply`` with a message naming the field and what would be accepted, while the valid
variants go through. With the operator stopped, the failure policy (Ignore) lets a Subscription
through, and the reconcile, once back, gives the bad one its conditions.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from test_chart import CHART, _helm_path

from support.kube import raw
from support.objects import Objects, condition, kubectl, pool_body, sub_body
from support.operator import OperatorProcess
from support.waiting import wait_for

pytestmark = pytest.mark.integration

Obj = dict[str, Any]
VWC = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
SCOPE_LABEL = "gpupool.dev/admission-test"
DENIED = "denied the request"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Webhook:
    """The test's namespace, its operator with admission on, and the webhook configuration."""

    ns: str
    kubeconfig: str
    port: int
    configuration: str
    op: OperatorProcess
    objs: Objects
    kube: client.ApiClient

    def apply(self, body: Obj, dry_run: bool = False) -> subprocess.CompletedProcess[str]:
        args = ["apply", "-n", self.ns, "-f", "-"]
        if dry_run:
            args.append("--dry-run=server")
        return kubectl(self.kubeconfig, *args, input=json.dumps(body))

    def accepted(self, body: Obj) -> None:
        proc = self.apply(body)
        assert proc.returncode == 0, f"kubectl apply refused {body['metadata']['name']}: " \
                                     f"{proc.stderr}"

    def refused(self, body: Obj, *fragments: str, webhook: bool = True) -> str:
        """Apply ``body``; it must be refused with a message holding every fragment."""
        proc = self.apply(body)
        assert proc.returncode != 0, f"kubectl apply accepted {body['metadata']['name']}"
        if webhook:
            assert DENIED in proc.stderr, proc.stderr
        for fragment in fragments:
            assert fragment in proc.stderr, f"{fragment!r} not in {proc.stderr}"
        return proc.stderr

    def configuration_object(self) -> Obj:
        found: Obj = raw(self.kube).get(f"{VWC}/{self.configuration}")
        return found

    def ca_bundles(self) -> set[str]:
        return {(w.get("clientConfig") or {}).get("caBundle") or ""
                for w in self.configuration_object()["webhooks"]}

    def serving(self) -> bool:
        """The API server calls the operator: a server-side dry run of a bad Subscription is
        refused by the webhook (nothing is stored)."""
        probe = sub_body("probe", "no-such-pool")
        return DENIED in self.apply(probe, dry_run=True).stderr

    def review(self, host: str, plural: str, obj: Obj, old: Obj | None = None) -> Obj:
        """POST an AdmissionReview straight to the operator, over TLS checked against the
        configuration's caBundle for ``host``."""
        [ca] = self.ca_bundles()
        ctx = ssl.create_default_context(cadata=base64.b64decode(ca).decode())
        request = {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "gpupool.dev", "version": "v1alpha1", "kind": obj["kind"]},
            "resource": {"group": "gpupool.dev", "version": "v1alpha1", "resource": plural},
            "name": obj["metadata"]["name"], "namespace": self.ns,
            "operation": "UPDATE" if old else "CREATE",
            "userInfo": {"username": "test"},
            "object": {**obj, "metadata": {**obj["metadata"], "namespace": self.ns}},
            "oldObject": old, "dryRun": True,
        }
        req = urllib.request.Request(
            f"https://{host}:{self.port}/{plural}", method="POST",
            data=json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                             "request": request}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            answer: Obj = json.loads(resp.read())["response"]
        return answer

    def ensure_running(self) -> None:
        if self.op.proc is None or self.op.proc.poll() is not None:
            self.op.start()


def _render(release: str, ns: str, values: Obj, tmp_path: Path) -> str:
    """``templates/admission.yaml`` of the chart, rendered with ``values``."""
    path = tmp_path / f"values-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(values))
    return subprocess.run(
        [str(_helm_path()), "template", release, str(CHART), "--namespace", ns, "-f", str(path),
         "--show-only", "templates/admission.yaml"],
        capture_output=True, text=True, check=True, timeout=60).stdout


def _render_configuration(ns: str, port: int, tmp_path: Path) -> Obj:
    """The chart's ValidatingWebhookConfiguration, calling 127.0.0.1:PORT, scoped to ``ns``."""
    out = _render(f"adm-{uuid.uuid4().hex[:6]}", ns, {"admission": {
        "enabled": True, "url": f"https://127.0.0.1:{port}",
        "namespaceSelector": {"matchLabels": {SCOPE_LABEL: ns}}}}, tmp_path)
    [vwc] = [d for d in yaml.safe_load_all(out)
             if d and d["kind"] == "ValidatingWebhookConfiguration"]
    return dict(vwc)


@pytest.fixture
def webhook(cluster: Any, kube: client.ApiClient, own_namespace: str,
            tmp_path: Path) -> Iterator[Webhook]:
    ns = own_namespace
    api = raw(kube)
    api.request("PATCH", f"/api/v1/namespaces/{ns}",
                body={"metadata": {"labels": {SCOPE_LABEL: ns}}},
                content_type="application/merge-patch+json")
    port = _free_port()
    vwc = _render_configuration(ns, port, tmp_path)
    name = vwc["metadata"]["name"]
    # Scoped to this test's namespace alone, and failing open; checked before it goes in.
    for hook in vwc["webhooks"]:
        assert hook["namespaceSelector"] == {"matchLabels": {SCOPE_LABEL: ns}}, hook
        assert hook["failurePolicy"] == "Ignore", hook
        assert "caBundle" not in hook["clientConfig"], "the operator writes the caBundle"
    api.request("POST", VWC, body=vwc)
    op = OperatorProcess(cluster.kubeconfig, name=f"operator-admission-{ns}", namespaces=[ns],
                         env={"GPUPOOL_ADMISSION_PORT": str(port),
                              "GPUPOOL_ADMISSION_ADDR": "127.0.0.1",
                              "GPUPOOL_ADMISSION_CONFIGURATION": name})
    hook = Webhook(ns, str(cluster.kubeconfig), port, name, op, Objects(kube, ns), kube)
    try:
        op.start()
        wait_for(lambda: "" not in hook.ca_bundles(), timeout=30,
                 message=lambda: f"the operator writes the caBundle; log:\n{op.log_tail()}")
        wait_for(hook.serving, timeout=30,
                 message=lambda: f"the API server calls the webhook; log:\n{op.log_tail()}")
        yield hook
    finally:
        try:
            # Let the operator release what its finalizers hold before it goes.
            hook.ensure_running()
            for sub in hook.objs.list_subs():
                hook.objs.delete("subscriptions", sub["metadata"]["name"])
            wait_for(lambda: not hook.objs.list_subs(), timeout=60,
                     message="the test's subscriptions are deleted")
        finally:
            op.stop()
            with contextlib.suppress(Exception):
                api.request("DELETE", f"{VWC}/{name}")


def funding_pool(name: str, **spec: Any) -> Obj:
    """A published Pool that stays funding: subscriptions pledge and hold seats, no workload."""
    return pool_body(name, **{"activationThreshold": 1000, **spec})


def held(objs: Objects, name: str) -> Obj:
    def holding() -> Obj | None:
        sub = objs.get("subscriptions", name) or {}
        status = sub.get("status") or {}
        return sub if status.get("phase") == "pledged" and status.get("heldBlocks") else None
    return wait_for(holding, timeout=30, message=lambda: f"{name} holds seats "
                    f"({(objs.get('subscriptions', name) or {}).get('status')})")


def test_subscription_needs_a_published_pool_in_its_namespace(webhook: Webhook) -> None:
    w, ns = webhook, webhook.ns
    w.accepted(funding_pool("open", blocks={"europe": {"price": "39.00"},
                                            "americas": {"price": "39.00"}}))
    w.accepted(funding_pool("draft", published=False))

    w.refused(sub_body("lost", "nowhere"),
              "spec.poolRef.name: pool nowhere does not exist in namespace " + ns,
              "create the Pool first", "published pools in " + ns + ": open")
    w.refused(sub_body("early", "draft"),
              "spec.poolRef.name: pool draft is not published (draft)",
              "spec.published: true", "published pools in " + ns + ": open")
    w.refused(sub_body("abroad", "open", poolRef={"name": "open", "namespace": "default"}),
              "spec.poolRef.namespace: pool default/open is in another namespace",
              f"leave spec.poolRef.namespace unset or set it to {ns}")
    w.refused(sub_body("night-owl", "open", blocks=["night"]),
              "spec.blocks: pool open does not sell asia", "choose from europe, americas")
    # An API client (the REST API, a backend) gets the same message, as 422 Unprocessable Entity.
    with pytest.raises(ApiException) as refused:
        w.objs.create(sub_body("by-api", "nowhere"))
    assert refused.value.status == 422, refused.value.status
    assert "spec.poolRef.name: pool nowhere does not exist" in str(refused.value.body)
    for name in ("lost", "early", "abroad", "night-owl", "by-api"):
        assert w.objs.get("subscriptions", name) is None, f"{name} was stored"

    # The valid variants: a published pool here, named with or without its namespace.
    w.accepted(sub_body("ok", "open"))
    w.accepted(sub_body("ok-explicit", "open", poolRef={"name": "open", "namespace": ns},
                        blocks=["europe", "americas"]))
    held(w.objs, "ok")
    held(w.objs, "ok-explicit")
    # Once the draft is published, it takes subscriptions too.
    w.accepted(funding_pool("draft"))
    w.accepted(sub_body("early", "draft"))
    held(w.objs, "early")


def test_seats_held_fix_pool_blocks_and_quantity(webhook: Webhook) -> None:
    w = webhook
    w.accepted(funding_pool("p", seats=3))
    w.accepted(funding_pool("q", seats=3))
    w.accepted(sub_body("holder", "p", blocks=["europe"]))
    held(w.objs, "holder")

    keep = ("to change it, cancel this subscription (spec.cancelAtPeriodEnd: true) and "
            "subscribe again")
    w.refused(sub_body("holder", "p", blocks=["europe", "americas"]),
              "spec.blocks: the subscription holds seats in europe; keep spec.blocks [europe]",
              keep)
    w.refused(sub_body("holder", "p", blocks=["europe"], quantity=2),
              "spec.quantity: the subscription holds 1 seat(s) per block; keep spec.quantity 1")
    w.refused(sub_body("holder", "q", blocks=["europe"]),
              "spec.poolRef: the subscription holds seats in pool p; keep spec.poolRef.name p")
    spec = w.objs.sub("holder")["spec"]
    assert (spec["poolRef"], spec["blocks"], spec["quantity"]) == ({"name": "p"}, ["europe"], 1)

    # What may change while seats are held: labels, billing cycle, cancelAtPeriodEnd.
    body = sub_body("holder", "p", blocks=["europe"], billingCycle="year")
    body["metadata"]["labels"] = {"team": "a"}
    w.accepted(body)

    # A subscription that holds no seats yet (the pool is full) may still change its terms.
    w.accepted(sub_body("waiter", "p", blocks=["europe"], quantity=3))
    wait_for(lambda: (condition(w.objs.sub("waiter"), "SeatsHeld") or {}).get("reason")
             == "PoolFull", timeout=30, message="waiter waits for seats")
    w.accepted(sub_body("waiter", "p", blocks=["europe"], quantity=2))
    held(w.objs, "waiter")

    w.accepted(sub_body("holder", "p", blocks=["europe"], billingCycle="year",
                        cancelAtPeriodEnd=True))


def test_pool_cannot_cut_seats_below_those_held(webhook: Webhook) -> None:
    w = webhook
    blocks = {"asia": {"price": "27.00"}, "europe": {"price": "39.00"},
              "americas": {"price": "39.00", "seats": 4}}
    w.accepted(funding_pool("cut", seats=4, blocks=blocks))
    w.accepted(sub_body("a", "cut", blocks=["europe", "americas"], quantity=2))
    w.accepted(sub_body("b", "cut", blocks=["europe"]))
    held(w.objs, "a")
    held(w.objs, "b")
    wait_for(lambda: ((w.objs.pool("cut").get("status") or {}).get("seats") or {})
             .get("europe", {}).get("reserved") == 3, timeout=30, message="3 europe seats held")

    w.refused(funding_pool("cut", seats=2, blocks=blocks),
              "spec.seats: would leave europe 2 seat(s), but 3 are held by subscription(s) a, b;"
              " use 3 or more")
    w.refused(funding_pool("cut", seats=4, blocks={**blocks, "americas": {
        "price": "39.00", "seats": 1}}),
              "spec.blocks.americas.seats: would leave americas 1 seat(s), but 2 are held by "
              "subscription(s) a; use 2 or more")
    w.refused(funding_pool("cut", seats=4, blocks={k: v for k, v in blocks.items()
                                                   if k != "americas"}),
              "spec.blocks.americas: 2 seat(s) in americas are held by subscription(s) a; keep "
              "offering americas")
    assert w.objs.pool("cut")["spec"]["seats"] == 4

    # Down to exactly what is held, and dropping a block nobody holds: accepted.
    w.accepted(funding_pool("cut", seats=3, blocks={k: v for k, v in blocks.items()
                                                    if k != "asia"}))
    spec = w.objs.pool("cut")["spec"]
    assert spec["seats"] == 3 and "asia" not in spec["blocks"]


def test_pool_spec_refusals(webhook: Webhook) -> None:
    w = webhook
    runtime = {"extraArgs": ["--max-model-len", "4096"]}
    w.refused(funding_pool("owned-args", runtime={"extraArgs": ["--model", "other/model"]}),
              "spec.runtime.extraArgs: --model is set by the operator; remove it "
              "(--model comes from spec.model.id)")
    w.refused(funding_pool("owned-tp", runtime={"extraArgs": [
        "--tensor-parallel-size=2", "--served_model", "x", "--max-model-len", "4096"]}),
              "spec.runtime.extraArgs: --tensor-parallel-size, --served_model are set by the "
              "operator", "--tensor-parallel-size comes from spec.runtime.gpusPerReplica",
              "--served_model comes from spec.model.id")
    w.refused(funding_pool("owned-env", runtime={"env": [{"name": "VLLM_API_KEY",
                                                          "value": "x"}]}),
              "spec.runtime.env: VLLM_API_KEY is set by the operator; remove it")
    # Money: the CRD's patterns refuse these before any webhook is called (naming the field);
    # the webhook's own answer, for a cluster without them, is checked straight below.
    w.refused(funding_pool("fee", reservationFee="-1.00"), "spec.reservationFee", webhook=False)
    w.refused(funding_pool("discount", annualDiscount="1"), "spec.annualDiscount", webhook=False)
    w.refused(funding_pool("price", blocks={"europe": {"price": "-5.00"}}),
              "spec.blocks.europe.price", webhook=False)
    for name in ("owned-args", "owned-tp", "owned-env", "fee", "discount", "price"):
        assert w.objs.get("pools", name) is None, f"{name} was stored"

    w.accepted(funding_pool("fine", runtime=runtime, annualDiscount="0.15", reservationFee="0"))
    w.refused(funding_pool("fine", runtime={"extraArgs": ["--port", "9000"]},
                           annualDiscount="0.15", reservationFee="0"),
              "--port comes from spec.runtime.port")
    assert w.objs.pool("fine")["spec"]["runtime"]["extraArgs"] == runtime["extraArgs"]

    # The webhook itself, over TLS verified against the configuration's caBundle, for both
    # names its certificate covers.
    for host in ("127.0.0.1", "localhost"):
        answer = w.review(host, "pools", funding_pool("discount", annualDiscount="1"))
        assert answer["allowed"] is False
        assert answer["status"]["message"] == (
            "spec.annualDiscount: 1 would make a yearly subscription free or pay the customer; "
            'use a fraction from 0 up to 0.9999 ("0.15" = 15% off the yearly price)')
    answer = w.review("127.0.0.1", "pools", funding_pool(
        "fee", reservationFee="-1.00", blocks={"europe": {"price": "-5"}}))
    assert answer["allowed"] is False
    message = answer["status"]["message"]
    assert "spec.blocks.europe.price: -5 is negative" in message, message
    assert "spec.reservationFee: -1.00 is negative; a reservation fee is 0 or more" in message
    fine = w.objs.pool("fine")
    assert w.review("127.0.0.1", "pools", fine, old=fine)["allowed"] is True


def test_failure_policy_ignore_with_the_operator_stopped(webhook: Webhook) -> None:
    w = webhook
    w.accepted(funding_pool("fp"))
    w.accepted(sub_body("keeper", "fp"))
    held(w.objs, "keeper")
    w.op.stop()
    # The configuration stays (the operator never deletes it), and fails open.
    vwc = w.configuration_object()
    assert {h["failurePolicy"] for h in vwc["webhooks"]} == {"Ignore"}
    assert "" not in w.ca_bundles()

    # No one answers on the port: a valid Subscription is created at once, and so is one the
    # webhook would have refused.
    w.accepted(sub_body("valid", "fp"))
    w.accepted(sub_body("orphan", "missing-pool"))
    w.accepted(sub_body("keeper", "fp", quantity=2))
    assert w.objs.sub("valid").get("status") is None

    # The reconcile is the authority: once the operator is back, the valid one holds seats, the
    # other is pending with the reason, and holds none.
    w.op.start()
    held(w.objs, "valid")
    orphan = wait_for(lambda: (lambda s: s if (condition(s, "SeatsHeld") or {}).get("reason")
                               == "PoolNotFound" else None)(w.objs.sub("orphan")),
                      timeout=30, message="orphan gets PoolNotFound")
    assert orphan["status"]["phase"] == "pending"
    ledger = (w.objs.pool("fp").get("status") or {}).get("ledger", {})
    assert "orphan" not in ledger
    # The held subscription changed while no one checked keeps the seats it bought.
    wait_for(lambda: (condition(w.objs.sub("keeper"), "SpecLocked") or {}).get("reason")
             == "ImmutableAfterSeatsHeld", timeout=30, message="keeper gets SpecLocked")
    assert ledger["keeper"]["seats"] == {"europe": [0]}
    assert w.objs.sub("keeper")["status"]["heldQuantity"] == 1
    # The restarted operator made a new CA and wrote it: the API server calls it again.
    wait_for(w.serving, timeout=30, message="the webhook answers again after the restart")
    w.refused(sub_body("orphan-2", "missing-pool"), "spec.poolRef.name: pool missing-pool")
    # The webhook refuses only what an update brings: keeper may still be canceled as it is,
    # but not changed further.
    w.refused(sub_body("keeper", "fp", quantity=3), "spec.quantity: the subscription holds 1")
    w.accepted(sub_body("keeper", "fp", quantity=2, cancelAtPeriodEnd=True))



def test_in_cluster_configuration_passes_server_validation(cluster: Any, own_namespace: str,
                                                            tmp_path: Path) -> None:
    """The chart's in-cluster variant (the webhook Service, and a configuration calling it by
    Service reference), as the API server validates it: a server-side dry run stores nothing,
    so nothing is ever called."""
    out = _render("gp", own_namespace, {"admission": {"enabled": True}}, tmp_path)
    proc = kubectl(str(cluster.kubeconfig), "apply", "--dry-run=server", "-f", "-", input=out)
    assert proc.returncode == 0, proc.stderr
    assert (f"validatingwebhookconfiguration.admissionregistration.k8s.io/gp-gpupool-operator-"
            f"{own_namespace}.gpupool.dev created (server dry run)") in proc.stdout, proc.stdout
    assert "service/gp-gpupool-operator-admission created (server dry run)" in proc.stdout
