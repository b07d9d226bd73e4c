"""Time-gated keys on the real control plane, with the operator's clock shifted by faketime so
a real UTC block boundary passes during the test."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client

from gpupool.blocks import BLOCK_ORDER, block_at
from support.clock import ShiftedClock
from support.objects import Objects, pool_body, sub_body
from support.operator import OperatorProcess
from support.waiting import wait_for

pytestmark = pytest.mark.integration


def _gate(objs: Objects, name: str) -> str | None:
    return (objs.sub(name).get("status") or {}).get("gate")


def _open_key_ids(objs: Objects, pool: str) -> set[str]:
    return set(objs.secret_data(f"{pool}-open-keys") or {})


def _key_ids(objs: Objects, *names: str) -> dict[str, str]:
    return {n: objs.sub(n)["status"]["keyId"] for n in names}


def _setup(objs: Objects, clock: ShiftedClock) -> tuple[str, str]:
    ending = block_at(clock.shifted_now())
    starting = BLOCK_ORDER[(BLOCK_ORDER.index(ending) + 1) % 3]
    objs.create(pool_body("gated", seats=5))
    objs.create(sub_body("ending", "gated", [ending.value]))
    objs.create(sub_body("starting", "gated", [starting.value]))
    objs.create(sub_body("allday", "gated", ["asia", "europe", "americas"]))
    for name in ("ending", "starting", "allday"):
        objs.wait_phase("subscriptions", name, "active", timeout=30)
    return ending.value, starting.value


def _assert_before(objs: Objects, clock: ShiftedClock) -> None:
    assert clock.seconds_to_boundary() > 1, "setup took too long for this boundary"
    wait_for(lambda: _gate(objs, "ending") == "open" and _gate(objs, "starting") == "closed"
             and _gate(objs, "allday") == "open", timeout=10)
    ids = _key_ids(objs, "ending", "starting", "allday")
    wait_for(lambda: _open_key_ids(objs, "gated") == {ids["ending"], ids["allday"]}, timeout=10)
    sub = objs.sub("ending")
    assert sub["status"]["nextGateChangeAt"] == clock.boundary.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "nextGateChangeAt" not in objs.sub("allday")["status"]
    labels = objs.secret_labels(sub["status"]["keySecretName"]) or {}
    assert labels["gpupool.dev/gate"] == "open"


def _assert_after(objs: Objects, clock: ShiftedClock, deadline_after: float = 2.0) -> float:
    """Waits for the flip; returns seconds after the boundary when every key was right."""
    ids = _key_ids(objs, "ending", "starting", "allday")

    def flipped() -> bool:
        return (_gate(objs, "ending") == "closed" and _gate(objs, "starting") == "open"
                and _gate(objs, "allday") == "open"
                and _open_key_ids(objs, "gated") == {ids["starting"], ids["allday"]}
                and (objs.secret_labels("starting-key") or {}).get("gpupool.dev/gate") == "open"
                and (objs.secret_labels("ending-key") or {}).get("gpupool.dev/gate") == "closed")

    wait_for(flipped, timeout=clock.seconds_to_boundary() + deadline_after + 1.0, interval=0.1,
             message="keys flipped at the boundary")
    late = -clock.seconds_to_boundary()
    return late


@pytest.fixture
def shifted(cluster: Any, kube: client.ApiClient, own_namespace: str) -> Any:
    clock = ShiftedClock(lead=25)
    op = OperatorProcess(cluster.kubeconfig, name="operator-gates", faketime=clock.faketime,
                         namespaces=[own_namespace]).start()
    yield clock, op, Objects(kube, own_namespace)
    op.stop()


def test_keys_flip_within_two_seconds_of_the_boundary(shifted: Any) -> None:
    clock, _op, objs = shifted
    _setup(objs, clock)
    _assert_before(objs, clock)
    late = _assert_after(objs, clock)
    assert late <= 2.0, f"keys right {late:.2f}s after the boundary"
    changed = objs.sub("starting")["status"]["gateChangedAt"]
    assert changed.startswith(clock.boundary.strftime("%Y-%m-%dT%H:%M:"))
    reasons = {e.reason for e in objs.events("starting")}
    assert "KeyOpened" in reasons
    assert "KeyClosed" in {e.reason for e in objs.events("ending")}


def test_restart_in_the_middle_of_a_boundary_leaves_every_gate_right(shifted: Any) -> None:
    clock, op, objs = shifted
    _setup(objs, clock)
    _assert_before(objs, clock)
    op.kill()  # down across the boundary
    wait_for(lambda: clock.seconds_to_boundary() < -1, timeout=60, interval=0.2)
    op.faketime = clock.faketime
    op.start()
    _assert_after(objs, clock, deadline_after=30.0)


def test_past_due_closes_at_once_and_paying_again_reopens(objs: Objects) -> None:
    objs.create(pool_body("dues", seats=2))
    objs.create(sub_body("debtor", "dues", ["asia", "europe", "americas"]))
    sub = objs.wait_phase("subscriptions", "debtor", "active", timeout=60)
    kid, secret = sub["status"]["keyId"], sub["status"]["keySecretName"]
    wait_for(lambda: _open_key_ids(objs, "dues") == {kid}, timeout=15)
    # A billing system (Stripe, or a platform's own) reports the payment failed.
    started = time.monotonic()
    objs.patch_status("subscriptions", "debtor", {"billing": {"status": "past_due"}})
    objs.wait_phase("subscriptions", "debtor", "past_due", timeout=15)
    wait_for(lambda: _gate(objs, "debtor") == "closed"
             and (objs.secret_labels(secret) or {}).get("gpupool.dev/gate") == "closed"
             and _open_key_ids(objs, "dues") == set(), timeout=15,
             message=lambda: f"closed (gate {_gate(objs, 'debtor')}, label "
             f"{(objs.secret_labels(secret) or {}).get('gpupool.dev/gate')}, open "
             f"{len(_open_key_ids(objs, 'dues'))})")
    assert time.monotonic() - started < 10
    assert (objs.secret_data(secret) or {}).get("subscriptionPhase") == "past_due"
    objs.patch_status("subscriptions", "debtor", {"billing": {"status": "active"}})
    objs.wait_phase("subscriptions", "debtor", "active", timeout=15)
    wait_for(lambda: _gate(objs, "debtor") == "open" and _open_key_ids(objs, "dues") == {kid},
             timeout=15)


def test_cancel_deletes_the_key_and_paused_pool_closes_all(objs: Objects) -> None:
    objs.create(pool_body("pausing", seats=3))
    for name in ("k1", "k2"):
        objs.create(sub_body(name, "pausing", ["asia", "europe", "americas"]))
    for name in ("k1", "k2"):
        objs.wait_phase("subscriptions", name, "active", timeout=60)
    ids = _key_ids(objs, "k1", "k2")
    wait_for(lambda: _open_key_ids(objs, "pausing") == set(ids.values()), timeout=15)
    objs.patch("pools", "pausing", {"spec": {"paused": True}})
    wait_for(lambda: _gate(objs, "k1") == "closed" and _gate(objs, "k2") == "closed"
             and _open_key_ids(objs, "pausing") == set(), timeout=15)
    assert (objs.secret_data("k1-key") or {}).get("poolPhase") == "paused"
    objs.patch("pools", "pausing", {"spec": {"paused": False}})
    wait_for(lambda: _open_key_ids(objs, "pausing") == set(ids.values()), timeout=30)
    objs.delete("subscriptions", "k1")
    wait_for(lambda: objs.secret_data("k1-key") is None
             and _open_key_ids(objs, "pausing") == {ids["k2"]}, timeout=15)


def test_rotation_mints_a_new_key_and_retires_the_old(objs: Objects) -> None:
    objs.create(pool_body("rotor", seats=1))
    objs.create(sub_body("spinner", "rotor", ["asia", "europe", "americas"]))
    sub = objs.wait_phase("subscriptions", "spinner", "active", timeout=60)
    old = objs.secret_data(sub["status"]["keySecretName"]) or {}
    objs.patch("subscriptions", "spinner",
               {"metadata": {"annotations": {"gpupool.dev/rotate-key": "2026-11-23"}}})

    def rotated() -> dict[str, str] | None:
        data = objs.secret_data(sub["status"]["keySecretName"]) or {}
        return data if data.get("apiKey") != old.get("apiKey") else None
    new = wait_for(rotated, timeout=30)
    assert new["keyId"] != old["keyId"]
    wait_for(lambda: _open_key_ids(objs, "rotor") == {new["keyId"]}, timeout=15)
    assert objs.sub("spinner")["status"]["keyId"] == new["keyId"]
