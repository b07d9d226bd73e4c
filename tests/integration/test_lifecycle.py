"""Subscription lifecycle on the real API server (billing off): pending reasons, pledge, cancel,
delete, manual provisioning, seats sold as bought, period end."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
from kubernetes import client

from gpupool import names
from gpupool.devcluster import free_port
from support.objects import GROUP, VERSION, Objects, condition, pool_body, sub_body
from support.operator import OperatorProcess
from support.waiting import wait_for

pytestmark = pytest.mark.integration


def _reason(objs: Objects, name: str) -> str | None:
    return (condition(objs.sub(name), "SeatsHeld") or {}).get("reason")


def test_pending_reasons_then_moves_on_by_itself(objs: Objects) -> None:
    objs.create(sub_body("early", "later-pool", ["europe"]))
    wait_for(lambda: _reason(objs, "early") == "PoolNotFound", timeout=30)
    assert objs.phase("subscriptions", "early") == "pending"
    msg = condition(objs.sub("early"), "SeatsHeld")["message"]  # type: ignore[index]
    assert "spec.poolRef.name" in msg

    objs.create(pool_body("later-pool", published=False, activationThreshold=10))
    wait_for(lambda: _reason(objs, "early") == "PoolNotPublished", timeout=30)
    objs.patch("pools", "later-pool", {"spec": {"published": True, "paused": True}})
    wait_for(lambda: _reason(objs, "early") == "PoolPaused", timeout=30)
    objs.patch("pools", "later-pool", {"spec": {"paused": False}})
    objs.wait_phase("subscriptions", "early", "pledged", timeout=30)
    assert objs.pool("later-pool")["status"]["pledgedSlots"] == 1


def test_block_not_offered_and_pool_full(objs: Objects) -> None:
    objs.create(pool_body("narrow", seats=1, activationThreshold=10,
                          blocks={"europe": {"price": "10.00"}}))
    objs.wait_phase("pools", "narrow", "funding")
    objs.create(sub_body("wrong-block", "narrow", ["asia"]))
    wait_for(lambda: _reason(objs, "wrong-block") == "BlockNotOffered", timeout=30)
    objs.create(sub_body("first", "narrow", ["europe"]))
    objs.wait_phase("subscriptions", "first", "pledged")
    objs.create(sub_body("second", "narrow", ["europe"]))
    wait_for(lambda: _reason(objs, "second") == "PoolFull", timeout=30)
    assert objs.pool("narrow")["status"]["seats"]["europe"]["reserved"] == 1


def test_canceling_a_pledge_frees_its_seats_at_once(objs: Objects) -> None:
    objs.create(pool_body("cancel-pool", seats=1, activationThreshold=10))
    objs.create(sub_body("pledger", "cancel-pool", ["asia"]))
    objs.wait_phase("subscriptions", "pledger", "pledged")
    objs.create(sub_body("waiter", "cancel-pool", ["asia"]))
    wait_for(lambda: _reason(objs, "waiter") == "PoolFull", timeout=30)
    objs.patch("subscriptions", "pledger", {"spec": {"cancelAtPeriodEnd": True}})
    sub = objs.wait_phase("subscriptions", "pledger", "canceled")
    assert sub["status"]["canceledAt"]
    assert (condition(sub, "SeatsHeld") or {}).get("reason") == "PledgeCanceled"
    assert (sub["status"]["billing"] or {}).get("reservationCharged") is True  # not refunded
    objs.wait_phase("subscriptions", "waiter", "pledged")
    pool = objs.pool("cancel-pool")
    assert set(pool["status"]["ledger"]) == {"waiter"}


def test_deleting_a_subscription_cancels_it_and_frees_seats(objs: Objects) -> None:
    objs.create(pool_body("del-pool", seats=2))
    objs.create(sub_body("goner", "del-pool", ["europe", "americas"], quantity=2))
    sub = objs.wait_phase("subscriptions", "goner", "active", timeout=60)
    secret = sub["status"]["keySecretName"]
    assert objs.secret_data(secret) is not None
    assert "gpupool.dev/cancel" in sub["metadata"]["finalizers"]
    objs.delete("subscriptions", "goner")
    wait_for(lambda: objs.get("subscriptions", "goner") is None, timeout=30)
    pool = wait_for(lambda: (p := objs.pool("del-pool"))["status"]["pledgedSlots"] == 0 and p,
                    timeout=30)
    assert not pool["status"].get("ledger")
    wait_for(lambda: objs.secret_data(secret) is None, timeout=30)


def test_subscribing_to_an_active_pool_is_active_with_a_key(objs: Objects) -> None:
    objs.create(pool_body("open-pool"))
    objs.wait_phase("pools", "open-pool", "active", timeout=60)
    objs.create(sub_body("instant", "open-pool", ["asia"]))
    sub = objs.wait_phase("subscriptions", "instant", "active", timeout=30)
    data = objs.secret_data(sub["status"]["keySecretName"])
    assert data is not None
    assert data["apiKey"].startswith("sk_pool_") and len(data["apiKey"]) >= 8 + 43
    assert data["keyId"] == sub["status"]["keyId"] and data["keyId"] not in data["apiKey"]
    assert data["blocks"] == "asia" and data["subscriptionPhase"] == "active"
    assert sub["status"]["currentPeriodEnd"]


def test_manual_provisioning_waits_for_approval(objs: Objects) -> None:
    objs.create(pool_body("manual", manualProvisioning=True))
    objs.wait_phase("pools", "manual", "active", timeout=60)
    objs.create(sub_body("awaiting", "manual", ["europe"]))
    sub = objs.wait_phase("subscriptions", "awaiting", "pending_key", timeout=30)
    assert "keySecretName" not in sub["status"]
    assert (condition(sub, "KeyIssued") or {}).get("reason") == "AwaitingApproval"
    objs.patch("subscriptions", "awaiting",
               {"metadata": {"annotations": {"gpupool.dev/key-approved": "true"}}})
    sub = objs.wait_phase("subscriptions", "awaiting", "active", timeout=30)
    assert objs.secret_data(sub["status"]["keySecretName"]) is not None


def test_seats_are_sold_as_bought(objs: Objects) -> None:
    objs.create(pool_body("locked", seats=5, activationThreshold=50))
    objs.create(sub_body("buyer", "locked", ["asia"], quantity=2))
    objs.wait_phase("subscriptions", "buyer", "pledged")
    objs.patch("subscriptions", "buyer", {"spec": {"blocks": ["europe"], "quantity": 3}})

    def locked() -> dict[str, Any] | None:
        cond = condition(objs.sub("buyer"), "SpecLocked")
        return cond if cond and cond["reason"] == "ImmutableAfterSeatsHeld" else None
    cond = wait_for(locked, timeout=30)
    assert "spec.blocks" in cond["message"] and "spec.quantity" in cond["message"]
    sub = objs.sub("buyer")
    assert sub["status"]["phase"] == "pledged"
    assert sub["status"]["heldBlocks"] == ["asia"] and sub["status"]["heldQuantity"] == 2
    assert sub["status"]["monthlyPrice"] == "54.00"
    pool = objs.pool("locked")
    assert pool["status"]["seats"]["asia"]["reserved"] == 2
    assert pool["status"]["seats"]["europe"]["reserved"] == 0


def test_cancel_at_period_end_keeps_the_key_until_the_period_ends(
        cluster: Any, kube: client.ApiClient, own_namespace: str) -> None:
    objs = Objects(kube, own_namespace)
    op = OperatorProcess(cluster.kubeconfig, name="operator-period",
                         namespaces=[own_namespace]).start()
    try:
        objs.create(pool_body("period", seats=3))
        objs.create(sub_body("leaver", "period", ["asia", "europe", "americas"]))
        sub = objs.wait_phase("subscriptions", "leaver", "active", timeout=60)
        secret = sub["status"]["keySecretName"]
        objs.patch("subscriptions", "leaver", {"spec": {"cancelAtPeriodEnd": True}})
        wait_for(lambda: (condition(objs.sub("leaver"), "CancelScheduled") or {})
                 .get("status") == "True", timeout=30)
        sub = objs.sub("leaver")
        assert sub["status"]["phase"] == "active" and sub["status"]["gate"] == "open"
        assert objs.secret_data(secret) is not None
    finally:
        op.stop()
    # The same operator, 32 days later: the paid month is over.
    later = OperatorProcess(cluster.kubeconfig, name="operator-period-later", faketime="+32d",
                            namespaces=[own_namespace]).start()
    try:
        sub = objs.wait_phase("subscriptions", "leaver", "canceled", timeout=60)
        assert (condition(sub, "SeatsHeld") or {}).get("reason") == "PeriodEnded"
        wait_for(lambda: objs.secret_data(secret) is None, timeout=30)
        wait_for(lambda: objs.pool("period")["status"]["pledgedSlots"] == 0, timeout=30)
    finally:
        later.stop()


PLANTED = "planted-by-hand"


def _reconciles(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("gpupool_reconciles_total{"))


def test_a_key_secret_not_made_for_the_subscription_is_never_used_or_deleted(
        cluster: Any, kube: client.ApiClient, own_namespace: str) -> None:
    """A Secret that bears a key Secret's name and labels but no owner reference to the
    Subscription (made by hand, or by another tool) is not the operator's: its key is not handed
    out, it is not overwritten, and it is not deleted, neither with the subscription of that name
    nor on any later resync. The subscription says why it waits, and gets its key once the Secret
    is gone. A subscription's own key Secret still goes with it at once."""
    objs = Objects(kube, own_namespace)
    core = client.CoreV1Api(kube)
    metrics_port = free_port()
    op = OperatorProcess(cluster.kubeconfig, name="operator-foreign-secret",
                         namespaces=[own_namespace],
                         env={"GPUPOOL_RESYNC_SECONDS": "1",
                              "GPUPOOL_METRICS_PORT": str(metrics_port)}).start()
    try:
        objs.create(pool_body("keep-pool", seats=2))
        objs.wait_phase("pools", "keep-pool", "active", timeout=60)
        taken = names.key_secret_name("ghost")
        core.create_namespaced_secret(own_namespace, {
            "metadata": {"name": taken, "labels": {
                names.LABEL_KIND: names.KIND_API_KEY, names.LABEL_SUBSCRIPTION: "ghost",
                names.LABEL_POOL: "keep-pool"}},
            "stringData": {"apiKey": PLANTED, "note": "made by hand"}})
        objs.create(sub_body("ghost", "keep-pool", ["asia"]))
        cond = wait_for(lambda: (c := condition(objs.sub("ghost"), "KeyIssued")) and
                        c.get("reason") == "SecretNameTaken" and c, timeout=30)
        assert taken in cond["message"]
        sub = objs.sub("ghost")
        assert sub["status"]["phase"] == "pending_key" and not sub["status"].get("keyId")
        assert objs.secret_data(taken) == {"apiKey": PLANTED, "note": "made by hand"}

        objs.create(sub_body("real", "keep-pool", ["europe"]))
        own = objs.wait_phase("subscriptions", "real", "active", timeout=60)["status"][
            "keySecretName"]
        objs.delete("subscriptions", "ghost")
        objs.delete("subscriptions", "real")
        wait_for(lambda: objs.secret_labels(own) is None, timeout=30,
                 message="the deleted subscription's own key Secret goes")
        wait_for(lambda: objs.get("subscriptions", "ghost") is None, timeout=30)
        passes = _reconciles(metrics_port)
        wait_for(lambda: _reconciles(metrics_port) >= passes + 5, timeout=30,
                 message="a few more resync passes")
        assert objs.secret_data(taken) == {"apiKey": PLANTED, "note": "made by hand"}

        # Once the foreign Secret is gone, a subscription of that name gets a key of its own.
        core.delete_namespaced_secret(taken, own_namespace)
        objs.create(sub_body("ghost", "keep-pool", ["asia"]))
        sub = objs.wait_phase("subscriptions", "ghost", "active", timeout=60)
        data = objs.secret_data(sub["status"]["keySecretName"]) or {}
        fresh_key = data.get("apiKey", PLANTED) != PLANTED  # a bool: the key is never printed
        assert fresh_key
    finally:
        op.stop()


def test_an_orphaned_key_secret_is_adopted_but_its_key_is_never_handed_on(
        cluster: Any, kube: client.ApiClient, own_namespace: str) -> None:
    """``kubectl delete subscription --cascade=orphan`` leaves the key Secret without owner, and
    an operator that did not make it for the subscription being deleted leaves it be. A new
    subscription of the same name adopts that Secret, with a key minted for it: a customer never
    gets the key of an earlier one."""
    objs = Objects(kube, own_namespace)
    op = OperatorProcess(cluster.kubeconfig, name="operator-orphan-key",
                         namespaces=[own_namespace]).start()
    try:
        objs.create(pool_body("adopt-pool", seats=2))
        objs.create(sub_body("heir", "adopt-pool", ["asia"]))
        first = objs.wait_phase("subscriptions", "heir", "active", timeout=60)
        secret = first["status"]["keySecretName"]

        def meta() -> Any:
            return objs.core.read_namespaced_secret(secret, own_namespace).metadata
        old_key = (objs.secret_data(secret) or {}).get("apiKey")
        old_uid = meta().uid

        op.stop()  # the Secret is orphaned before any operator would take it with its owner
        client.CustomObjectsApi(kube).delete_namespaced_custom_object(
            GROUP, VERSION, own_namespace, "subscriptions", "heir", propagation_policy="Orphan")
        wait_for(lambda: not meta().owner_references, timeout=30,
                 message="the key Secret orphaned by the garbage collector")
        op.start()
        wait_for(lambda: objs.get("subscriptions", "heir") is None, timeout=30)
        assert meta().uid == old_uid  # not deleted: no longer owned

        objs.create(sub_body("heir", "adopt-pool", ["asia"]))
        second = objs.wait_phase("subscriptions", "heir", "active", timeout=60)
        adopted = meta()
        assert adopted.uid == old_uid
        assert [r.uid for r in adopted.owner_references] == [second["metadata"]["uid"]]
        new_key = (objs.secret_data(secret) or {}).get("apiKey") or ""
        handed_on, minted = new_key == old_key, new_key.startswith("sk_pool_")  # never printed
        assert minted and not handed_on
        assert second["status"]["keyId"] != first["status"]["keyId"]
    finally:
        op.stop()
