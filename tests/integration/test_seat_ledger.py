"""The seat ledger on the real API server: never oversold, oldest first, safe across restarts."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from kubernetes import client

from support.objects import Objects, condition, pool_body, sub_body
from support.operator import OperatorProcess
from support.waiting import wait_for

pytestmark = pytest.mark.integration
BLOCKS = ["asia", "europe", "americas"]


def _create_many(objs: Objects, bodies: list[dict[str, Any]], threads: int = 8) -> None:
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(objs.create, bodies))


def _settled(objs: Objects, names: list[str], phases: set[str]) -> list[dict[str, Any]] | None:
    subs = {s["metadata"]["name"]: s for s in objs.list_subs()}
    if all((subs.get(n, {}).get("status") or {}).get("phase") in phases for n in names):
        return [subs[n] for n in names]
    return None


def _check_ledger(pool: dict[str, Any], per_block: int) -> dict[str, list[str]]:
    """Every block holds exactly ``per_block`` distinct seat indexes; returns holders by block."""
    holders: dict[str, list[str]] = {b: [] for b in BLOCKS}
    seen: dict[str, Counter[int]] = {b: Counter() for b in BLOCKS}
    for name, entry in pool["status"]["ledger"].items():
        for block, seats in entry["seats"].items():
            holders[block].append(name)
            seen[block].update(seats)
    for block in BLOCKS:
        assert sum(seen[block].values()) == per_block, (block, seen[block])
        assert all(n == 1 for n in seen[block].values()), f"seat held twice in {block}"
        assert set(seen[block]) == set(range(per_block))
        assert pool["status"]["seats"][block]["reserved"] == per_block
    return holders


def test_sixty_concurrent_subscriptions_never_oversell(objs: Objects) -> None:
    objs.create(pool_body("burst", seats=10, activationThreshold=1000))
    objs.wait_phase("pools", "burst", "funding")
    bodies = [sub_body(f"s{i:02d}", "burst", [BLOCKS[i % 3]]) for i in range(60)]
    _create_many(objs, bodies)
    names = [b["metadata"]["name"] for b in bodies]

    def settled() -> list[dict[str, Any]] | None:
        subs = _settled(objs, names, {"pledged", "pending"})
        if subs is None:
            return None
        pledged = [s for s in subs if s["status"]["phase"] == "pledged"]
        full = [s for s in subs if (condition(s, "SeatsHeld") or {}).get("reason") == "PoolFull"]
        return subs if len(pledged) == 30 and len(full) == 30 else None

    subs = wait_for(settled, timeout=90, interval=0.5, message="30 pledged + 30 PoolFull")
    pool = objs.pool("burst")
    holders = _check_ledger(pool, 10)
    assert pool["status"]["pledgedSlots"] == 30
    by_name = {s["metadata"]["name"]: s for s in subs}
    for block in BLOCKS:
        assert len(holders[block]) == 10
        for name in holders[block]:
            assert by_name[name]["status"]["phase"] == "pledged"
            assert by_name[name]["status"]["slotCount"] == 8

    # Freeing a seat lets the oldest pending subscription of that block in, and only it.
    pending_europe = sorted(
        (s for s in subs
         if s["status"]["phase"] == "pending" and s["spec"]["blocks"] == ["europe"]),
        key=lambda s: (s["metadata"]["creationTimestamp"], s["metadata"]["name"]))
    oldest = pending_europe[0]["metadata"]["name"]
    objs.delete("subscriptions", holders["europe"][0])
    objs.wait_phase("subscriptions", oldest, "pledged", timeout=30)
    wait_for(lambda: objs.get("subscriptions", holders["europe"][0]) is None, timeout=30)
    still_pending = [s["metadata"]["name"] for s in pending_europe[1:]]
    phases = {s["metadata"]["name"]: s["status"]["phase"] for s in objs.list_subs()}
    assert all(phases[n] == "pending" for n in still_pending), phases
    _check_ledger(objs.pool("burst"), 10)


def test_operator_restart_mid_burst_loses_and_duplicates_nothing(
        cluster: Any, kube: client.ApiClient, own_namespace: str) -> None:
    objs = Objects(kube, own_namespace)
    op = OperatorProcess(cluster.kubeconfig, name="operator-restart",
                         namespaces=[own_namespace]).start()
    try:
        objs.create(pool_body("restart", seats=10, activationThreshold=1000))
        objs.wait_phase("pools", "restart", "funding")
        bodies = [sub_body(f"r{i:02d}", "restart", [BLOCKS[i % 3]]) for i in range(45)]
        for chunk in range(3):
            before = op.log_text().count("-> pledged")
            _create_many(objs, bodies[chunk * 15:(chunk + 1) * 15])
            if chunk < 2:
                # Mid-burst: the operator has started pledging this chunk, not finished it.
                wait_for(lambda b=before: op.log_text().count("-> pledged") > b, timeout=30)
            op.kill()
            op.start()
        names = [b["metadata"]["name"] for b in bodies]

        def agreed() -> dict[str, set[str]] | None:
            subs = _settled(objs, names, {"pledged", "pending"})
            pool = objs.pool("restart")
            held = set(pool["status"].get("ledger", {}))
            pledged = {s["metadata"]["name"] for s in subs or []
                       if s["status"]["phase"] == "pledged"}
            return {"held": held} if subs and len(held) == 30 and pledged == held else None

        held = wait_for(agreed, timeout=120, interval=0.5,
                        message="30 holders, each pledged")["held"]
        holders = _check_ledger(objs.pool("restart"), 10)
        assert {n for names_ in holders.values() for n in names_} == held
        # The oldest 10 per block hold the seats: creation order decided, not the restarts.
        for block in BLOCKS:
            mine = sorted((s for s in objs.list_subs() if s["spec"]["blocks"] == [block]),
                          key=lambda s: (s["metadata"]["creationTimestamp"],
                                         s["metadata"]["name"]))
            oldest_ts = mine[9]["metadata"]["creationTimestamp"]
            for s in mine:
                if s["metadata"]["creationTimestamp"] < oldest_ts:
                    assert s["metadata"]["name"] in holders[block]
    finally:
        op.stop()


def test_pool_activates_at_exactly_its_threshold(objs: Objects, kubelet: Any) -> None:
    objs.create(pool_body("thresh", seats=10, activationThreshold=5))
    objs.wait_phase("pools", "thresh", "funding")
    for i in range(4):
        objs.create(sub_body(f"t{i}", "thresh", [BLOCKS[i % 3]]))
        objs.wait_phase("subscriptions", f"t{i}", "pledged")
    pool = objs.pool("thresh")
    assert pool["status"]["pledgedSlots"] == 4
    assert pool["status"]["phase"] == "funding"
    assert pool["status"]["replicas"]["desired"] == 0
    objs.create(sub_body("t4", "thresh", ["americas"]))
    pool = wait_for(lambda: (p := objs.pool("thresh"))["status"]["phase"] in
                    ("activating", "active") and p, timeout=30)
    assert pool["status"]["pledgedSlots"] == 5
    assert (condition(pool, "Funded") or {}).get("status") == "True"
    objs.wait_phase("pools", "thresh", "active", timeout=60)
    for i in range(5):
        objs.wait_phase("subscriptions", f"t{i}", "active", timeout=30)


def test_slots_mean_what_the_seeds_say(objs: Objects) -> None:
    objs.create(pool_body("meaning", seats=4, activationThreshold=100, blocks={
        "asia": {"price": "27.00"}, "europe": {"price": "39.00"},
        "americas": {"price": "39.00", "seats": 6}}))
    objs.wait_phase("pools", "meaning", "funding")
    objs.create(sub_body("all-day", "meaning", ["night", "europe", "americas"], quantity=2,
                         billingCycle="year"))
    sub = objs.wait_phase("subscriptions", "all-day", "pledged")
    pool = objs.pool("meaning")
    assert pool["status"]["totalSlots"] == 4 + 4 + 6
    assert pool["status"]["pledgedSlots"] == 6  # 2 seats in each of 3 blocks
    assert pool["status"]["minPricePerDay"] == "27.00"
    st = sub["status"]
    assert st["blocks"] == ["asia", "europe", "americas"]
    assert st["slotCount"] == 48 and len(st["slots"]) == 48
    assert st["monthlyPrice"] == "210.00"  # 2 x (27 + 39 + 39)
    assert st["amount"] == "2520.00"  # yearly, no discount on this pool
    asia_hours = [s for s in st["slots"] if s["hour"] < 8 and s["slotIndex"] == 0]
    assert [s["pricePerDay"] for s in asia_hours] == ["3.38"] * 4 + ["3.37"] * 4
