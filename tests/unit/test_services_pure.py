"""The pure parts of the pool and subscription reconciles: the pool phase machine (DESIGN.md
"transitions"), the ledger merge-patch, how a Subscription is seen by the planner, billing-period
arithmetic and the gate status fields."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpupool.blocks import Block
from gpupool.ledger import Claim, dump_ledger, parse_ledger, plan
from gpupool.models import parse_pool_spec
from gpupool.pool_service import (
    claim_of,
    decide_phase,
    deployment_ready,
    ledger_change,
    ledger_patch,
)
from gpupool.subscription_service import add_months, gate_fields, parse_time

A, E, M = Block.ASIA, Block.EUROPE, Block.AMERICAS


def pool_spec(**overrides: Any) -> Any:
    spec = {"model": {"id": "m"}, "seats": 4, "blocks": {"asia": {"price": "27.00"}},
            "published": True, "activationThreshold": 6}
    spec.update(overrides)
    return parse_pool_spec(spec)


# -- decide_phase -------------------------------------------------------------------------------


def test_unpublished_is_draft() -> None:
    assert decide_phase(pool_spec(published=False), False, 0, False) == "draft"
    assert decide_phase(pool_spec(published=False), False, 10, True) == "draft"


def test_funding_until_the_threshold() -> None:
    spec = pool_spec()
    assert decide_phase(spec, False, 0, False) == "funding"
    assert decide_phase(spec, False, 5, False) == "funding"
    assert decide_phase(spec, False, 5, True) == "funding"  # a ready workload does not fund it


def test_activating_exactly_at_the_threshold_then_active_when_available() -> None:
    spec = pool_spec()
    assert decide_phase(spec, False, 6, False) == "activating"
    assert decide_phase(spec, False, 7, False) == "activating"
    assert decide_phase(spec, False, 6, True) == "active"


def test_threshold_zero_is_open_once_published() -> None:
    spec = pool_spec(activationThreshold=0)
    assert decide_phase(spec, False, 0, False) == "activating"
    assert decide_phase(spec, False, 0, True) == "active"
    assert decide_phase(pool_spec(activationThreshold=0, published=False), False, 0, True) \
        == "draft"


def test_an_active_pool_never_falls_back() -> None:
    spec = pool_spec()
    assert decide_phase(spec, True, 0, False) == "active"  # seats freed, workload down
    assert decide_phase(pool_spec(published=False), True, 0, False) == "active"


@pytest.mark.parametrize("activated", [False, True])
@pytest.mark.parametrize("published", [False, True])
@pytest.mark.parametrize("available", [False, True])
def test_paused_wins_over_everything(activated: bool, published: bool, available: bool) -> None:
    spec = pool_spec(paused=True, published=published)
    assert decide_phase(spec, activated, 100, available) == "paused"


# -- ledger_patch -------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies a merge-patch to status."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def entry(uid: str, **seats: list[int]) -> dict[str, Any]:
    return {"uid": uid, "seats": seats}


def test_ledger_patch_adds_changes_and_removes() -> None:
    old = {"a": entry("ua", asia=[0]), "b": entry("ub", europe=[0, 1]), "c": entry("uc", asia=[1])}
    new = {"a": entry("ua", asia=[0]), "b": entry("ub", europe=[0, 1]), "d": entry("ud", asia=[1])}
    patch = ledger_patch(old, new)
    assert patch == {"c": None, "d": entry("ud", asia=[1])}
    assert merge_patch(old, patch) == new


def test_ledger_patch_of_an_unchanged_ledger_is_empty() -> None:
    old = {"a": entry("ua", asia=[0])}
    assert ledger_patch(old, copy.deepcopy(old)) == {}
    assert ledger_patch({}, {}) == {}


def test_ledger_patch_replaces_an_entry_whose_blocks_changed() -> None:
    # The name was taken over by a new object (new uid) that holds other blocks: after the
    # patch, the entry must not keep the old holder's blocks.
    old = {"a": entry("u-old", asia=[0], europe=[2])}
    new = {"a": entry("u-new", americas=[0])}
    assert merge_patch(old, ledger_patch(old, new)) == new


def test_ledger_patch_clears_the_whole_ledger() -> None:
    old = {"a": entry("ua", asia=[0]), "b": entry("ub", asia=[1])}
    assert merge_patch(old, ledger_patch(old, {})) == {}


ledger_entries = st.dictionaries(
    st.sampled_from("abcdef"),
    st.builds(lambda uid, seats: {"uid": uid, "seats": seats},
              st.sampled_from(["u1", "u2"]),
              st.dictionaries(st.sampled_from(["asia", "europe", "americas"]),
                              st.lists(st.integers(0, 5), min_size=1, max_size=3,
                                       unique=True).map(sorted), min_size=1)),
)


@settings(deadline=None)
@given(ledger_entries, ledger_entries)
def test_ledger_patch_turns_old_into_new(old: dict[str, Any], new: dict[str, Any]) -> None:
    snapshot = copy.deepcopy(old), copy.deepcopy(new)
    patch = ledger_patch(old, new)
    assert merge_patch(old, patch) == new
    assert (old, new) == snapshot  # inputs untouched
    # Entries that did not change are not sent.
    for name in set(old) & set(new):
        if old[name] == new[name]:
            assert name not in patch


def test_ledger_patch_works_on_dumped_ledgers() -> None:
    old = dump_ledger({"a": ("ua", {A: (0,), E: (1,)})})
    new = dump_ledger({"a": ("ub", {M: (0,)}), "b": ("uc", {A: (0, 1)})})
    assert merge_patch(old, ledger_patch(old, new)) == new


claim_sets = st.lists(
    st.builds(lambda name, uid, blocks, qty, eligible, created: Claim(
        name=name, uid=uid, created=f"2026-05-01T10:00:0{created}Z", blocks=blocks,
        quantity=qty, eligible=eligible),
        st.sampled_from("abcdef"), st.sampled_from(["u1", "u2"]),
        st.sampled_from([(A,), (E,), (A, M), (A, E, M)]), st.integers(1, 3), st.booleans(),
        st.integers(0, 9)),
    max_size=8, unique_by=lambda c: c.name)


@settings(deadline=None)
@given(ledger_entries, claim_sets, st.booleans())
def test_ledger_change_is_the_whole_ledger_diff(old: dict[str, Any], claims: list[Claim],
                                                admitting: bool) -> None:
    """Comparing only the holders admitted or released gives the same merge-patch as
    comparing the whole ledger."""
    parsed = parse_ledger(old)
    planned = plan({A: 6, E: 6, M: 6}, parsed, claims, admitting)
    patch = ledger_change(old, len(parsed), planned)
    assert merge_patch(old, patch) == dump_ledger(planned.ledger)
    assert patch == ledger_patch(old, dump_ledger(planned.ledger))


def test_ledger_change_repairs_entries_written_around_the_schema() -> None:
    old: dict[str, Any] = {"a": {"uid": "u1", "seats": {"asia": [0]}}, "junk": "not an entry"}
    parsed = parse_ledger(old)
    planned = plan({A: 2}, parsed, [Claim("a", "u1", "t", (A,), 1, True)], True)
    assert ledger_change(old, len(parsed), planned) == {"junk": None}


# -- claim_of -----------------------------------------------------------------------------------


def sub_obj(phase: str | None = None, accepted: str | None = "True", deleting: bool = False,
            **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": "acme", "uid": "u-acme",
                     "creationTimestamp": "2026-05-01T10:00:00Z"},
        "spec": {"poolRef": {"name": "p"}, "customer": {"id": "c"},
                 "blocks": ["americas", "night"], "quantity": 2, **spec},
        "status": {},
    }
    if phase:
        body["status"]["phase"] = phase
    if accepted:
        body["status"]["conditions"] = [{"type": "Accepted", "status": accepted}]
    if deleting:
        body["metadata"]["deletionTimestamp"] = "2026-05-02T00:00:00Z"
    return body


def test_claim_of_an_accepted_subscription() -> None:
    c = claim_of(sub_obj())
    assert c is not None
    assert (c.name, c.uid, c.created) == ("acme", "u-acme", "2026-05-01T10:00:00Z")
    assert c.blocks == (A, M)  # night is asia; ordered by hour
    assert c.quantity == 2
    assert c.eligible


@pytest.mark.parametrize(
    "body",
    [sub_obj(accepted=None), sub_obj(accepted="False"), sub_obj(phase="canceled"),
     sub_obj(deleting=True)],
    ids=["not-accepted-yet", "refused", "canceled", "deleting"],
)
def test_claims_that_must_not_hold_seats(body: dict[str, Any]) -> None:
    c = claim_of(body)
    assert c is not None and not c.eligible


@pytest.mark.parametrize("phase", ["pending", "pledged", "pending_key", "active", "past_due"])
def test_holding_phases_stay_eligible(phase: str) -> None:
    c = claim_of(sub_obj(phase=phase))
    assert c is not None and c.eligible


def test_preaccept_claims_a_new_subscription_once_its_finalizer_is_in_place() -> None:
    fresh = sub_obj(accepted=None)
    assert not claim_of(fresh, preaccept=True).eligible  # type: ignore[union-attr]
    fresh["metadata"]["finalizers"] = ["gpupool.dev/cancel"]
    assert claim_of(fresh, preaccept=True).eligible  # type: ignore[union-attr]
    assert not claim_of(fresh, preaccept=False).eligible  # type: ignore[union-attr]
    elsewhere = sub_obj(accepted=None, poolRef={"name": "p", "namespace": "other"})
    elsewhere["metadata"].update(namespace="mine", finalizers=["gpupool.dev/cancel"])
    assert not claim_of(elsewhere, preaccept=True).eligible  # type: ignore[union-attr]
    refused = sub_obj(accepted="False")
    refused["metadata"]["finalizers"] = ["gpupool.dev/cancel"]
    assert not claim_of(refused, preaccept=True).eligible  # type: ignore[union-attr]


def test_claim_of_an_unreadable_spec_is_none() -> None:
    assert claim_of(sub_obj(quantity=21)) is None
    assert claim_of(sub_obj(blocks=["mars"])) is None


# -- deployment_ready ---------------------------------------------------------------------------


def deployment(ready: int, available: str, observed: int = 3, generation: int = 3) -> Any:
    return {"metadata": {"generation": generation},
            "status": {"readyReplicas": ready, "observedGeneration": observed,
                       "conditions": [{"type": "Available", "status": available}]}}


def test_deployment_ready() -> None:
    assert deployment_ready(deployment(1, "True"), 1) == (True, 1)
    assert deployment_ready(deployment(2, "True"), 3) == (True, 2)
    assert deployment_ready(deployment(0, "True"), 1) == (False, 0)
    assert deployment_ready(deployment(1, "False"), 1) == (False, 1)
    assert deployment_ready(deployment(1, "True", observed=2), 1) == (False, 1)  # stale status
    assert deployment_ready(None, 1) == (False, 0)
    assert deployment_ready(deployment(1, "True"), 0) == (False, 0)  # nothing wanted


# -- add_months ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "months", "expected"),
    [
        (datetime(2026, 4, 4, 0, 0, tzinfo=UTC), 1, datetime(2026, 5, 4, 0, 0, tzinfo=UTC)),
        (datetime(2026, 1, 31, 12, 30, tzinfo=UTC), 1,
         datetime(2026, 2, 28, 12, 30, tzinfo=UTC)),  # month-end clamp
        (datetime(2028, 1, 31, tzinfo=UTC), 1, datetime(2028, 2, 29, tzinfo=UTC)),  # leap
        (datetime(2026, 3, 31, tzinfo=UTC), 1, datetime(2026, 4, 30, tzinfo=UTC)),
        (datetime(2026, 12, 15, tzinfo=UTC), 1, datetime(2027, 1, 15, tzinfo=UTC)),
        (datetime(2026, 11, 30, tzinfo=UTC), 3, datetime(2027, 2, 28, tzinfo=UTC)),
        (datetime(2028, 2, 29, tzinfo=UTC), 12, datetime(2029, 2, 28, tzinfo=UTC)),
        (datetime(2026, 5, 14, tzinfo=UTC), 12, datetime(2027, 5, 14, tzinfo=UTC)),
        (datetime(2026, 5, 14, tzinfo=UTC), 0, datetime(2026, 5, 14, tzinfo=UTC)),
        (datetime(2026, 1, 15, tzinfo=UTC), 25, datetime(2028, 2, 15, tzinfo=UTC)),
    ],
)
def test_add_months(start: datetime, months: int, expected: datetime) -> None:
    assert add_months(start, months) == expected


def test_add_months_keeps_time_and_zone() -> None:
    tz = timezone(timedelta(hours=5))
    got = add_months(datetime(2026, 8, 31, 23, 59, 58, 7, tzinfo=tz), 1)
    assert got == datetime(2026, 9, 30, 23, 59, 58, 7, tzinfo=tz)
    assert got.tzinfo is tz


@settings(deadline=None)
@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1),
                    timezones=st.just(UTC)), st.integers(1, 120))
def test_add_months_properties(start: datetime, months: int) -> None:
    got = add_months(start, months)
    assert got > start
    assert (got.year * 12 + got.month) - (start.year * 12 + start.month) == months
    assert got.day == start.day or (got.day < start.day and
                                    (got + timedelta(days=1)).day == 1)  # clamped to month end
    assert got.time() == start.time()


def test_parse_time_reads_what_iso_writes() -> None:
    assert parse_time("2026-05-04T00:00:00Z") == datetime(2026, 5, 4, tzinfo=UTC)
    assert parse_time(None) is None
    assert parse_time("") is None


# -- gate_fields --------------------------------------------------------------------------------


def test_gate_fields_move_changed_at_only_when_the_gate_changes() -> None:
    t0 = datetime(2026, 5, 4, 8, 0, tzinfo=UTC)
    first = gate_fields("open", "active", "active", (E,), t0, {})
    assert first == {"gate": "open", "gateChangedAt": "2026-05-04T08:00:00Z",
                     "nextGateChangeAt": "2026-05-04T16:00:00Z"}
    later = gate_fields("open", "active", "active", (E,), t0 + timedelta(hours=1), first)
    assert later["gateChangedAt"] == "2026-05-04T08:00:00Z"
    closed = gate_fields("closed", "active", "active", (E,), t0 + timedelta(hours=8), later)
    assert closed == {"gate": "closed", "gateChangedAt": "2026-05-04T16:00:00Z",
                      "nextGateChangeAt": "2026-05-05T08:00:00Z"}


def test_gate_fields_no_next_change_when_state_or_blocks_keep_it() -> None:
    t0 = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)
    assert gate_fields("closed", "past_due", "active", (E,), t0, {})["nextGateChangeAt"] is None
    assert gate_fields("closed", "active", "paused", (E,), t0, {})["nextGateChangeAt"] is None
    assert gate_fields("open", "active", "active", (A, E, M), t0, {})["nextGateChangeAt"] is None
