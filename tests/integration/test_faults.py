"""Faults on the real control plane: the API server down mid-burst, the operator SIGKILLed over
and over (mid-burst and across a block boundary), generated specs valid and invalid, and
subscriptions whose pool is in another namespace, deleted, or made invalid after the fact.

Each test runs an operator of its own in ``x-`` namespaces (the shared test operator ignores
them). CI runs small sizes; a larger set of the same tests runs with one command:

    GPUPOOL_REQUIRE_CLUSTER=1 GPUPOOL_FAULTS_LARGE=1 \\
        .venv/bin/pytest tests/integration/test_faults.py -p no:warnings

(1,000 subscriptions through the outage, 200 through 30 kills, 300 generated specs of each
kind.) ``GPUPOOL_FAULTS_SEED`` replays a kill schedule; the seed is in every failure message.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from gpupool import names
from gpupool.models import parse_pool_spec
from support.clock import ShiftedClock
from support.kube import raw
from support.objects import GROUP, VERSION, Objects, condition, pool_body, sub_body
from support.operator import OperatorProcess
from support.waiting import wait_for

pytestmark = pytest.mark.integration
Obj = dict[str, Any]

LARGE = os.environ.get("GPUPOOL_FAULTS_LARGE") == "1"
OUTAGE_SUBS = 1000 if LARGE else 100
OUTAGE_SECONDS = 20.0
KILL_SUBS = 200 if LARGE else 36
BURST_KILLS = 30 if LARGE else 10
EXAMPLES = 300 if LARGE else 40
SEED = int(os.environ.get("GPUPOOL_FAULTS_SEED") or random.randrange(1 << 30))

ALL_BLOCKS = ["asia", "europe", "americas"]
HOLDING = ("pledged", "pending_key", "active", "past_due")


# ---- helpers ------------------------------------------------------------------------------------
@contextlib.contextmanager
def own_operator(cluster: Any, name: str, namespaces: list[str],
                 faketime: str | None = None) -> Iterator[OperatorProcess]:
    op = OperatorProcess(cluster.kubeconfig, name=name, namespaces=namespaces,
                         faketime=faketime).start()
    try:
        yield op
    finally:
        op.stop()


def create_all(objs: Objects, bodies: list[Obj], threads: int = 8) -> None:
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(objs.create, bodies))


def key_secrets(objs: Objects) -> list[Any]:
    """The namespace's API-key Secrets (metadata only is ever looked at; never the key)."""
    return list(objs.core.list_namespaced_secret(
        objs.ns, label_selector=f"{names.LABEL_KIND}={names.KIND_API_KEY}").items)


def open_key_ids(objs: Objects, pool: str) -> set[str]:
    return set(objs.secret_data(names.open_keys_secret_name(pool)) or {})


def settled(objs: Objects, expected: dict[str, str]) -> dict[str, Obj] | None:
    """Every named subscription in its expected phase and reconciled at its generation."""
    subs = {s["metadata"]["name"]: s for s in objs.list_subs()}
    for name, phase in expected.items():
        st_ = (subs.get(name) or {}).get("status") or {}
        if st_.get("phase") != phase or st_.get("observedGeneration") != \
                subs[name]["metadata"].get("generation"):
            return None
        if phase == "active" and not st_.get("keySecretName"):
            return None
    return subs


def phases(objs: Objects) -> str:
    return str(Counter((s.get("status") or {}).get("phase") for s in objs.list_subs()))


def check_consistent(objs: Objects, pools: list[str]) -> None:
    """Nothing duplicated, nothing lost: each pool's ledger gives every seat index at most once
    and within capacity, its holders are exactly the subscriptions holding seats, each active
    subscription has exactly one key Secret (no other has one), and each open-keys Secret lists
    exactly the open keys."""
    subs = {s["metadata"]["name"]: s for s in objs.list_subs()}
    holding_subs = {n for n, s in subs.items() if (s.get("status") or {}).get("phase") in HOLDING}
    all_holders: set[str] = set()
    for pool_name in pools:
        pool = objs.pool(pool_name)
        st_ = pool["status"]
        ledger = st_.get("ledger") or {}
        seen: dict[str, Counter[int]] = {b: Counter() for b in ALL_BLOCKS}
        for holder, entry in ledger.items():
            assert holder in subs, f"{pool_name}: ledger holds unknown {holder}"
            assert entry["uid"] == subs[holder]["metadata"]["uid"], holder
            sub_st = subs[holder]["status"]
            assert sub_st.get("pool") == pool_name, (holder, sub_st.get("pool"))
            qty = sub_st.get("heldQuantity")
            for block, seats in entry["seats"].items():
                assert len(seats) == qty, (holder, block, seats, qty)
                seen[block].update(seats)
        for block, counter in seen.items():
            dup = [i for i, c in counter.items() if c > 1]
            assert not dup, f"{pool_name}/{block}: seat indexes held twice: {dup}"
            cap = (st_.get("seats") or {}).get(block, {}).get("capacity", 0)
            assert all(0 <= i < cap for i in counter), (pool_name, block, sorted(counter), cap)
            reserved = (st_.get("seats") or {}).get(block, {}).get("reserved", 0)
            assert reserved == sum(counter.values()), (pool_name, block, reserved)
        all_holders |= set(ledger)
    assert all_holders == holding_subs, (
        f"ledger holders and holding subscriptions differ: only in ledgers "
        f"{sorted(all_holders - holding_subs)}, only holding {sorted(holding_subs - all_holders)}")
    owners = Counter(str((s.metadata.labels or {}).get(names.LABEL_SUBSCRIPTION))
                     for s in key_secrets(objs))
    active = {n for n, s in subs.items() if s["status"].get("phase") == "active"}
    assert set(owners) == active, (f"key Secrets without an active subscription "
                                   f"{sorted(set(owners) - active)}; active without a key "
                                   f"{sorted(active - set(owners))}")
    assert all(c == 1 for c in owners.values()), owners
    for pool_name in pools:
        want = {s["status"]["keyId"] for s in subs.values()
                if s["status"].get("pool") == pool_name and s["status"].get("gate") == "open"}
        wait_for(lambda p=pool_name, w=want: open_key_ids(objs, p) == w, timeout=15,
                 message=lambda p=pool_name: f"open-keys of {p} lists exactly the open keys")


def end_state(objs: Objects, pools: list[str]) -> Obj:
    """What must not depend on how the run went: per pool its phase, seats held per block and
    holders; per subscription its phase, gate and reasons; per pool which subscriptions' keys
    the open-keys Secret lists; per subscription how many key Secrets it has."""
    subs = {s["metadata"]["name"]: s for s in objs.list_subs()}
    by_key = {s["status"].get("keyId"): n for n, s in subs.items() if s["status"].get("keyId")}
    state: Obj = {"pools": {}, "subs": {}, "open": {}, "keys": {}}
    for pool_name in pools:
        st_ = objs.pool(pool_name)["status"]
        holders: dict[str, list[str]] = {b: [] for b in ALL_BLOCKS}
        for holder, entry in (st_.get("ledger") or {}).items():
            for block, seats in entry["seats"].items():
                holders[block] += [holder] * len(seats)
        state["pools"][pool_name] = {
            "phase": st_.get("phase"), "pledgedSlots": st_.get("pledgedSlots"),
            "reserved": {b: v.get("reserved") for b, v in (st_.get("seats") or {}).items()},
            "holders": {b: sorted(h) for b, h in holders.items()}}
        state["open"][pool_name] = sorted(by_key.get(k, f"unknown {k}")
                                          for k in open_key_ids(objs, pool_name))
    for name, sub in sorted(subs.items()):
        st_ = sub["status"]
        state["subs"][name] = {
            "phase": st_.get("phase"), "gate": st_.get("gate"), "pool": st_.get("pool"),
            "slots": len(st_.get("slots") or []), "amount": st_.get("amount"),
            "seatsHeld": (condition(sub, "SeatsHeld") or {}).get("reason"),
            "accepted": (condition(sub, "Accepted") or {}).get("reason")}
    state["keys"] = dict(sorted(Counter((s.metadata.labels or {}).get(names.LABEL_SUBSCRIPTION)
                                        for s in key_secrets(objs)).items()))
    return state


def diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += diff(a.get(k), b.get(k), f"{path}.{k}")
        return out
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


# ---- 1. the API server down for 20 s mid-burst --------------------------------------------
def test_api_server_down_mid_burst_leaves_every_subscription_right(
        cluster: Any, kube: client.ApiClient, own_namespace: str) -> None:
    objs = Objects(kube, own_namespace)
    started = time.monotonic()
    with own_operator(cluster, "operator-outage", [own_namespace]) as op:
        assert op.proc is not None
        pid = op.proc.pid
        objs.create(pool_body("outage", seats=OUTAGE_SUBS))
        objs.wait_phase("pools", "outage", "active", timeout=60)
        shapes = [["asia"], ["europe"], ["americas"], ALL_BLOCKS]
        bodies = [sub_body(f"o{i:04d}", "outage", shapes[i % 4]) for i in range(OUTAGE_SUBS)]
        half = OUTAGE_SUBS // 2
        create_all(objs, bodies[:half])
        # Mid-burst: the operator is admitting, writing keys and statuses when the server goes.
        wait_for(lambda: "-> active" in op.log_text(), timeout=60)
        cluster.stop_apiserver()
        try:
            time.sleep(OUTAGE_SECONDS)  # the fault itself: the API server stays down this long
        finally:
            cluster.start_apiserver()
        create_all(objs, bodies[half:])
        expected = {b["metadata"]["name"]: "active" for b in bodies}
        wait_for(lambda: settled(objs, expected), timeout=240 if LARGE else 150, interval=1.0,
                 message=lambda: f"all {OUTAGE_SUBS} active after the outage: {phases(objs)}")
        assert op.proc.poll() is None and op.proc.pid == pid and op.starts == 1, \
            "the operator needed a restart"
        check_consistent(objs, ["outage"])
        pool = objs.pool("outage")["status"]
        assert pool["pledgedSlots"] == sum(len(b["spec"]["blocks"]) for b in bodies)
        # No key was issued twice across the outage (the Event is said once the key is stored).
        issued = Counter(e.involved_object.name for e in objs.core.list_namespaced_event(
            own_namespace).items if e.reason == "KeyIssued")
        assert max(issued.values()) == 1, issued.most_common(3)
    assert time.monotonic() - started < (600 if LARGE else 240)


# ---- 2. SIGKILL, again and again --------------------------------------------------------------
def fleet(prefix: str = "") -> tuple[list[Obj], list[Obj], dict[str, str]]:
    """Pools and subscriptions for the kill tests, and the phase each subscription ends in:
    an open pool (threshold 0), a pool that funds and activates as pledges reach its threshold,
    subscriptions canceled before they hold seats, and some naming a pool that is not there."""
    n = KILL_SUBS
    funding = n // 3
    pools = [pool_body("open", seats=n),
             pool_body("fund", seats=n, activationThreshold=funding)]
    subs: list[Obj] = []
    expected: dict[str, str] = {}
    for i in range(n):
        name = f"{prefix}k{i:03d}"
        if i % 12 == 11:
            subs.append(sub_body(name, "open", ["europe"], cancelAtPeriodEnd=True))
            expected[name] = "canceled"
        elif i % 12 == 7:
            subs.append(sub_body(name, "nowhere", ["asia"]))
            expected[name] = "pending"
        elif i % 3 == 0 and funding > 0:
            subs.append(sub_body(name, "fund", [ALL_BLOCKS[i % 3]]))
            funding -= 1
            expected[name] = "active"
        else:
            subs.append(sub_body(name, "open", ALL_BLOCKS[: 1 + i % 3], quantity=1 + i % 2))
            expected[name] = "active"
    # The funding pool activates only when pledges reach its threshold.
    pools[1]["spec"]["activationThreshold"] = sum(
        1 for s in subs if s["spec"]["poolRef"]["name"] == "fund")
    return pools, subs, expected


def test_sigkill_mid_burst_ends_like_an_undisturbed_run(
        cluster: Any, kube: client.ApiClient, own_namespace: str,
        second_namespace: str) -> None:
    rng = random.Random(SEED)
    killed, calm = Objects(kube, own_namespace), Objects(kube, second_namespace)
    pools, subs, expected = fleet()
    pool_names = [p["metadata"]["name"] for p in pools]
    started = time.monotonic()
    with own_operator(cluster, "operator-calm", [second_namespace]), \
            own_operator(cluster, "operator-killed", [own_namespace]) as op:
        for body in pools:
            calm.create(body)
            killed.create(body)
        create_all(calm, subs)
        kills: list[str] = []
        todo = list(subs)
        while True:
            size = rng.randint(2, 6)
            batch, todo = todo[:size], todo[size:]
            if batch:
                create_all(killed, batch, threads=4)
            time.sleep(rng.uniform(0.05, 1.5))  # a random moment of the burst
            op.kill()
            kills.append(f"{time.monotonic() - started:.1f}s {phases(killed)}")
            if not todo and len(kills) >= BURST_KILLS:
                break
            op.start()
        op.start()
        timeline = "\n".join(kills)
        for objs in (calm, killed):
            wait_for(lambda o=objs: settled(o, expected), timeout=120, interval=0.5,
                     message=lambda o=objs: f"{o.ns} settled (seed {SEED}): {phases(o)}; "
                     f"kills:\n{timeline}")
        check_consistent(calm, pool_names)
        check_consistent(killed, pool_names)
        problems = diff(end_state(calm, pool_names), end_state(killed, pool_names))
        assert not problems, "\n".join(problems) + f"\nseed {SEED}; kills:\n{timeline}"
        assert len(kills) >= BURST_KILLS
        # No key was issued twice, however often the operator died.
        for objs in (calm, killed):
            issued = Counter(e.involved_object.name for e in objs.core.list_namespaced_event(
                objs.ns).items if e.reason == "KeyIssued")
            assert max(issued.values()) == 1, (objs.ns, issued.most_common(3))


def test_sigkill_across_a_boundary_ends_like_an_undisturbed_run(
        cluster: Any, kube: client.ApiClient, own_namespace: str,
        second_namespace: str) -> None:
    rng = random.Random(SEED + 1)
    clock = ShiftedClock(lead=40)
    ending = clock.shifted_now().hour // 8
    blocks = {"ending": [ALL_BLOCKS[ending]], "starting": [ALL_BLOCKS[(ending + 1) % 3]],
              "other": [ALL_BLOCKS[(ending + 2) % 3]], "allday": ALL_BLOCKS}
    subs = [sub_body(f"{kind}-{i}", "gated", shape) for kind, shape in blocks.items()
            for i in range(3)]
    expected = {s["metadata"]["name"]: "active" for s in subs}
    killed, calm = Objects(kube, own_namespace), Objects(kube, second_namespace)
    with own_operator(cluster, "operator-calm-clock", [second_namespace],
                      clock.faketime), \
            own_operator(cluster, "operator-killed-clock", [own_namespace],
                         clock.faketime) as op:
        for objs in (calm, killed):
            objs.create(pool_body("gated", seats=10))
            create_all(objs, subs, threads=4)
        for objs in (calm, killed):
            wait_for(lambda o=objs: settled(o, expected), timeout=30, interval=0.3,
                     message=lambda o=objs: f"{o.ns} active: {phases(o)}")
        assert clock.seconds_to_boundary() > 4, "setup took too long for this boundary"
        assert killed.sub("ending-0")["status"]["gate"] == "open"
        assert killed.sub("starting-0")["status"]["gate"] == "closed"

        # Kills at random moments from just before the boundary into the flip.
        kills: list[str] = []
        moments = sorted(rng.uniform(-2.5, 4.0) for _ in range(6))
        for at in moments:
            # The kill moment itself is what is under test: wait until the clock reaches it.
            wait_for(lambda at=at: clock.seconds_to_boundary() <= -at,
                     timeout=max(0.0, clock.seconds_to_boundary() + at) + 10, interval=0.02)
            op.kill()
            kills.append(f"{-clock.seconds_to_boundary():+.2f}s")
            op.start(wait=False)
        wait_for(op.healthy, timeout=60)
        timeline = ", ".join(kills)

        def flipped(objs: Objects) -> bool:
            subs_ = {s["metadata"]["name"]: s["status"] for s in objs.list_subs()}
            return all(st_.get("gate") == ("closed" if n.startswith(("ending", "other"))
                                           else "open") for n, st_ in subs_.items())
        for objs in (calm, killed):
            wait_for(lambda o=objs: flipped(o), timeout=60, interval=0.3,
                     message=lambda: f"gates flipped after the boundary; kills at {timeline}")
        check_consistent(calm, ["gated"])
        check_consistent(killed, ["gated"])
        problems = diff(end_state(calm, ["gated"]), end_state(killed, ["gated"]))
        assert not problems, "\n".join(problems) + f"\nseed {SEED}; kills at {timeline}"
        labels = {s.metadata.labels[names.LABEL_SUBSCRIPTION]: s.metadata.labels[names.LABEL_GATE]
                  for s in key_secrets(killed)}
        assert labels == {n: killed.sub(n)["status"]["gate"] for n in expected}, labels


# ---- 3. generated specs through the API server ----------------------------------------------
# A valid spec with up to three changes, each a valid alternative, a value the schema refuses,
# or one only the operator refuses (owned vLLM args or env); unknown fields ride along.
prices = st.sampled_from(["0", "1", "27.00", "39.5", "9999999.99"])
offers = st.fixed_dictionaries({"price": prices},
                               optional={"seats": st.integers(0, 12)})
valid_pools = st.fixed_dictionaries(
    {"model": st.fixed_dictionaries({"id": st.just("org/tiny")},
                                    optional={"displayName": st.text(max_size=8)}),
     "seats": st.integers(0, 12),
     "blocks": st.dictionaries(st.sampled_from(ALL_BLOCKS), offers, min_size=1)},
    optional={"published": st.booleans(), "paused": st.booleans(),
              "activationThreshold": st.integers(0, 6), "manualProvisioning": st.booleans(),
              "annualDiscount": st.sampled_from(["0", "0.15", "0.9999"]),
              "reservationFee": prices,
              "limits": st.fixed_dictionaries({}, optional={"rpm": st.integers(1, 100)}),
              "runtime": st.fixed_dictionaries({}, optional={
                  "replicas": st.integers(0, 1), "seatsPerReplica": st.integers(1, 4),
                  "extraArgs": st.lists(st.sampled_from(["--max-model-len=2048",
                                                         "--enable-prefix-caching"]),
                                        max_size=2)})})
POOL_CHANGES: list[tuple[str, Any]] = [
    ("seats", -1), ("seats", "3"), ("seats", 10001), ("seats", 2.5), ("blocks", {}),
    ("blocks", {"mars": {"price": "1"}}), ("blocks", {"asia": {"price": 12.5}}),
    ("blocks", {"asia": {"price": "1.234"}}), ("blocks", {"europe": {"seats": 3}}),
    ("blocks", {"night": {"price": "3"}}), ("annualDiscount", "1.5"), ("annualDiscount", 0.1),
    ("reservationFee", "-1"), ("currency", "eur"), ("activationThreshold", -1),
    ("limits", {"rpm": 0}), ("limits", {"tpm": "lots"}), ("model", {"id": ""}), ("model", {}),
    ("published", "yes"), ("paused", None), ("seatz", 3),
    ("runtime", {"gpusPerReplica": 0}), ("runtime", {"replicas": -1}),
    ("runtime", {"startupTimeoutSeconds": 59}), ("runtime", {"seatsPerReplica": 0}),
    ("runtime", {"extraArgs": ["--port=9000"]}), ("runtime", {"extraArgs": ["--api-key", "x"]}),
    ("runtime", {"env": [{"name": "VLLM_API_KEY", "value": "x"}]}),
    ("runtime", {"env": [{"name": "FOO", "value": "1"}]}),
]
valid_subs = st.fixed_dictionaries(
    {"poolRef": st.just({"name": "target"}), "customer": st.just({"id": "cus_gen"}),
     "blocks": st.lists(st.sampled_from(["asia", "europe", "americas", "night"]), min_size=1,
                        max_size=3, unique=True)},
    optional={"quantity": st.integers(1, 3), "billingCycle": st.sampled_from(["month", "year"]),
              "cancelAtPeriodEnd": st.just(False)})
SUB_CHANGES: list[tuple[str, Any]] = [
    ("poolRef", {"name": "missing"}), ("poolRef", {"name": "target", "namespace": "elsewhere"}),
    ("poolRef", {"name": "target", "namespace": "SELF"}), ("poolRef", {"name": ""}),
    ("poolRef", {}), ("customer", {"id": ""}), ("customer", {"email": "a@b.c"}),
    ("blocks", []), ("blocks", ["mars"]), ("blocks", ["asia", "night"]),
    ("blocks", ["asia", "europe", "americas", "night", "asia"]), ("blocks", "europe"),
    ("quantity", 0), ("quantity", 21), ("quantity", 20), ("quantity", "2"), ("quantity", 1.5),
    ("billingCycle", "week"), ("cancelAtPeriodEnd", True), ("cancelAtPeriodEnd", "yes"),
    ("quantitty", 2),
]


def changed(base: st.SearchStrategy[Obj],
            changes: list[tuple[str, Any]]) -> st.SearchStrategy[Obj]:
    def apply(spec: Obj, picked: list[tuple[str, Any]]) -> Obj:
        spec = dict(spec)
        for field, value in picked:
            if isinstance(value, dict) and isinstance(spec.get(field), dict):
                spec[field] = {**spec[field], **value}
            else:
                spec[field] = value
        return spec
    return st.builds(apply, base, st.lists(st.sampled_from(changes), max_size=3))


pool_specs = changed(valid_pools, POOL_CHANGES)
sub_specs = changed(valid_subs, SUB_CHANGES)


class Canary:
    """A subscription that must keep being reconciled while generated objects come and go."""

    def __init__(self, objs: Objects) -> None:
        self.objs = objs
        self.n = 0
        objs.create(sub_body("canary", "target", ["europe"], customer={"id": "cus_canary"}))
        objs.wait_phase("subscriptions", "canary", "active", timeout=30)

    def check(self) -> None:
        self.n += 1
        gen = self.objs.patch("subscriptions", "canary", {"spec": {"customer": {
            "id": "cus_canary", "email": f"canary{self.n}@example.com"}}})["metadata"]["generation"]
        wait_for(lambda: (self.objs.sub("canary").get("status") or {}).get(
            "observedGeneration") == gen, timeout=20, message="the canary reconciled")


def refused_or_reconciled(objs: Objects, op: OperatorProcess, plural: str, body: Obj,
                          outcome: Counter[str],
                          check: Callable[[Obj], str]) -> None:
    name = body["metadata"]["name"]
    try:
        created = objs.create(body)
    except ApiException as exc:
        assert exc.status in (400, 422), (exc.status, exc.reason)
        message = str(getattr(exc, "body", "") or "")
        assert re.search(r"spec\.|Invalid value|Required value|Unsupported value", message), \
            message[:300]
        outcome["refused"] += 1
        return
    gen = created["metadata"]["generation"]

    def reconciled() -> Obj | None:
        obj = objs.get(plural, name) or {}
        st_ = obj.get("status") or {}
        return obj if st_.get("conditions") and st_.get("observedGeneration") == gen else None
    obj = wait_for(reconciled, timeout=30, message=lambda: f"{plural}/{name} reconciled with a "
                   f"condition: {(objs.get(plural, name) or {}).get('status')}")
    outcome[check(obj)] += 1
    assert op.proc is not None and op.proc.poll() is None, "the operator died"
    failed = [line for line in op.log_text().splitlines()
              if f"'{name}') failed" in line or "Traceback" in line]
    assert not failed, "\n".join(failed[:5])


def test_generated_pool_specs_are_refused_or_reconciled_with_a_condition(
        cluster: Any, kube: client.ApiClient, own_namespace: str) -> None:
    objs = Objects(kube, own_namespace)
    outcome: Counter[str] = Counter()
    with own_operator(cluster, "operator-gen-pools", [own_namespace]) as op:
        assert op.proc is not None
        pid = op.proc.pid
        objs.create(pool_body("target", seats=100))
        canary = Canary(objs)
        seq = iter(range(1 << 30))

        def check(pool: Obj) -> str:
            ready = condition(pool, "Ready") or {}
            try:
                parse_pool_spec(pool["spec"])
                valid = True
            except (ValidationError, ValueError):
                valid = False
            assert ready.get("message"), ready
            if not valid:
                assert ready == {**ready, "status": "False", "reason": "InvalidSpec"}, ready
                return "invalid spec stored"
            assert ready.get("reason") in ("SpecValid", "OwnedArgs", "OwnedEnv"), ready
            assert pool["status"].get("phase") in ("draft", "funding", "activating", "active",
                                                   "paused"), pool["status"]
            return f"reconciled {ready['reason']}"

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LARGE,
                  suppress_health_check=list(HealthCheck))
        @given(spec=pool_specs)
        def one(spec: Obj) -> None:
            name = f"gen-{next(seq)}"
            body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Pool",
                    "metadata": {"name": name}, "spec": spec}
            try:
                refused_or_reconciled(objs, op, "pools", body, outcome, check)
            finally:
                objs.delete("pools", name)
            canary.check()

        one()
        assert op.proc.pid == pid and op.starts == 1
    print(dict(outcome))  # shown with -s
    assert outcome["refused"] and sum(v for k, v in outcome.items() if k != "refused"), outcome


def test_generated_subscription_specs_are_refused_or_reconciled_with_a_condition(
        cluster: Any, kube: client.ApiClient, own_namespace: str) -> None:
    objs = Objects(kube, own_namespace)
    outcome: Counter[str] = Counter()
    with own_operator(cluster, "operator-gen-subs", [own_namespace]) as op:
        assert op.proc is not None
        pid = op.proc.pid
        objs.create(pool_body("target", seats=200))
        objs.wait_phase("pools", "target", "active", timeout=60)
        canary = Canary(objs)
        seq = iter(range(1 << 30))

        def check(sub: Obj) -> str:
            name = sub["metadata"]["name"]

            def stable() -> Obj | None:
                s = objs.sub(name)
                st_ = s.get("status") or {}
                queued = (condition(s, "SeatsHeld") or {}).get("reason") == "Queued"
                return s if st_.get("phase") and not queued else None
            sub = wait_for(stable, timeout=20, message=f"{name} past Queued")
            st_ = sub["status"]
            held = name in (objs.pool("target")["status"].get("ledger") or {})
            assert held == (st_["phase"] in HOLDING), (st_["phase"], held)
            if st_["phase"] == "pending":
                reason = (condition(sub, "SeatsHeld") or {}).get("reason")
                assert reason and (condition(sub, "SeatsHeld") or {}).get("message"), st_
                return f"pending {reason}"
            return str(st_["phase"])

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LARGE,
                  suppress_health_check=list(HealthCheck))
        @given(spec=sub_specs)
        def one(spec: Obj) -> None:
            name = f"gen-{next(seq)}"
            ref = spec.get("poolRef") or {}
            if ref.get("namespace") == "SELF":
                spec = {**spec, "poolRef": {**ref, "namespace": own_namespace}}
            body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Subscription",
                    "metadata": {"name": name}, "spec": spec}
            try:
                refused_or_reconciled(objs, op, "subscriptions", body, outcome, check)
            finally:
                objs.delete("subscriptions", name)
                wait_for(lambda: objs.get("subscriptions", name) is None, timeout=20,
                         message=f"{name} deleted (finalizer handled)")
            canary.check()

        one()
        assert op.proc.pid == pid and op.starts == 1
        check_consistent(objs, ["target"])
    print(dict(outcome))  # shown with -s
    assert outcome["refused"] and sum(v for k, v in outcome.items() if k != "refused"), outcome


# ---- 4. a pool elsewhere, gone, or made invalid ---------------------------------------------
def test_pool_in_another_namespace_holds_no_seats_anywhere(
        cluster: Any, kube: client.ApiClient, own_namespace: str,
        second_namespace: str) -> None:
    mine, theirs = Objects(kube, own_namespace), Objects(kube, second_namespace)
    with own_operator(cluster, "operator-foreign", [own_namespace, second_namespace]):
        theirs.create(pool_body("shared", seats=5))
        mine.create(pool_body("shared", seats=5))
        mine.create(sub_body("reach", "shared", ["europe"],
                             poolRef={"name": "shared", "namespace": second_namespace}))
        sub = mine.wait_phase("subscriptions", "reach", "pending")
        accepted = condition(sub, "Accepted") or {}
        assert accepted.get("reason") == "PoolInOtherNamespace", accepted
        assert second_namespace in accepted["message"] and "another namespace" in \
            accepted["message"], accepted
        assert (condition(sub, "SeatsHeld") or {}).get("reason") == "PoolInOtherNamespace"
        # A subscription that is fine gets reconciled meanwhile: the refusal is settled.
        mine.create(sub_body("local", "shared", ["europe"]))
        mine.wait_phase("subscriptions", "local", "active", timeout=30)
        for objs in (mine, theirs):
            objs.wait_phase("pools", "shared", "active", timeout=30)
            assert "reach" not in (objs.pool("shared")["status"].get("ledger") or {})
        assert not sub["status"].get("slots") and not sub["status"].get("keySecretName")
        assert mine.secret_data(names.key_secret_name("reach")) is None
        check_consistent(mine, ["shared"])


def test_deleted_pool_leaves_its_subscriptions_pending_without_seats_or_keys(
        kube: client.ApiClient, cluster: Any, own_namespace: str) -> None:
    objs = Objects(kube, own_namespace)
    with own_operator(cluster, "operator-doomed", [own_namespace]):
        objs.create(pool_body("doomed", seats=5))
        for i in range(3):
            objs.create(sub_body(f"orphan-{i}", "doomed", [ALL_BLOCKS[i]]))
        for i in range(3):
            objs.wait_phase("subscriptions", f"orphan-{i}", "active", timeout=30)
        objs.delete("pools", "doomed")
        for i in range(3):
            name = f"orphan-{i}"
            sub = objs.wait_phase("subscriptions", name, "pending", timeout=30)
            held = condition(sub, "SeatsHeld") or {}
            assert held.get("reason") == "PoolNotFound" and "doomed" in held["message"], held
            st_ = sub["status"]
            assert st_["gate"] == "closed" and not st_.get("slots"), st_
            assert "keySecretName" not in st_ and "pool" not in st_, st_
            wait_for(lambda n=name: objs.secret_data(names.key_secret_name(n)) is None,
                     timeout=15, message=f"{name}'s key revoked")
        # The same name again is a new pool: the subscriptions wait in line for it, oldest first.
        objs.create(pool_body("doomed", seats=5))
        for i in range(3):
            objs.wait_phase("subscriptions", f"orphan-{i}", "active", timeout=30)
        check_consistent(objs, ["doomed"])


@contextlib.contextmanager
def lenient_pool_schema(kube: client.ApiClient) -> Iterator[None]:
    """The Pool CRD without a spec schema for a moment: stands in for a stored Pool that an
    older, looser CRD accepted (or one written around the schema). Restored afterwards."""
    api = raw(kube)
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/pools.gpupool.dev"
    original = api.get(path)
    loose = api.get(path)
    props = loose["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    props["spec"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    api.request("PUT", path, body=loose)
    try:
        yield
    finally:
        current = api.get(path)
        original["metadata"] = {"name": current["metadata"]["name"],
                                "resourceVersion": current["metadata"]["resourceVersion"]}
        api.request("PUT", path, body=original)


def test_pool_made_invalid_after_the_fact(cluster: Any, kube: client.ApiClient,
                                         own_namespace: str) -> None:
    objs = Objects(kube, own_namespace)
    with own_operator(cluster, "operator-broken", [own_namespace]):
        objs.create(pool_body("broken", seats=3))
        objs.create(sub_body("holder", "broken", ["europe"]))
        objs.create(sub_body("leaver", "broken", ["europe"]))
        objs.wait_phase("subscriptions", "leaver", "active", timeout=30)
        holder = objs.wait_phase("subscriptions", "holder", "active", timeout=30)
        key_id = holder["status"]["keyId"]
        bad = {"spec": {"seats": -4, "blocks": {"europe": {"price": "cheap"}}}}
        with lenient_pool_schema(kube):
            wait_for(lambda: _patched(objs, "broken", bad), timeout=20, interval=0.3,
                     message="the lenient schema in force")

        def reported() -> str | None:
            """The pool says what is wrong: in its Ready condition, or, when the API server
            refuses its status writes (it validates the whole object against the schema as it
            is now), in a Warning Event."""
            ready = condition(objs.pool("broken"), "Ready") or {}
            if ready.get("reason") == "InvalidSpec":
                return str(ready["message"])
            said = [e.message for e in objs.events("broken") if e.reason == "InvalidSpec"]
            return said[0] if said else None
        message = wait_for(reported, timeout=30, message="the pool reports its invalid spec")
        assert "spec.seats" in message and "spec.blocks.europe.price" in message, message
        # A holder deleted meanwhile still goes, and gives its seat back.
        objs.delete("subscriptions", "leaver")
        wait_for(lambda: objs.get("subscriptions", "leaver") is None, timeout=30,
                 message="a subscription of the broken pool deleted")
        # A newcomer gets a clear reason and no seats.
        objs.create(sub_body("newcomer", "broken", ["europe"]))
        newcomer = objs.wait_phase("subscriptions", "newcomer", "pending", timeout=30)
        held = condition(newcomer, "SeatsHeld") or {}
        assert held.get("reason") == "PoolInvalid" and "invalid spec" in held["message"], held
        # The holder keeps what it bought while the pool's last good spec runs: its seat, key
        # and gate; its status says the pool's spec is invalid.
        holder = objs.sub("holder")
        assert holder["status"]["phase"] == "active", holder["status"]
        pool_cond = condition(holder, "PoolSpecValid") or {}
        assert pool_cond.get("status") == "False" and "broken" in pool_cond["message"], \
            holder["status"]
        assert "newcomer" not in objs.pool("broken")["status"]["ledger"]
        assert (objs.secret_data(names.key_secret_name("holder")) or {}).get("keyId") == key_id
        assert [s.metadata.labels[names.LABEL_SUBSCRIPTION] for s in key_secrets(objs)] == \
            ["holder"]
        # Fixed: the newcomer is admitted, the holder's condition clears, nothing was re-issued.
        objs.patch("pools", "broken", {"spec": {"seats": 3,
                                                "blocks": {"europe": {"price": "39.00"}}}})
        objs.wait_phase("subscriptions", "newcomer", "active", timeout=30)
        wait_for(lambda: condition(objs.sub("holder"), "PoolSpecValid") is None, timeout=30)
        assert set(objs.pool("broken")["status"]["ledger"]) == {"holder", "newcomer"}
        assert objs.sub("holder")["status"]["keyId"] == key_id
        check_consistent(objs, ["broken"])


def _patched(objs: Objects, name: str, body: Obj) -> bool:
    try:
        objs.patch("pools", name, body)
    except ApiException as exc:
        if exc.status == 422:
            return False
        raise
    return True
