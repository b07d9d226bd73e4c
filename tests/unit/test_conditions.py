"""status.conditions in the Kubernetes metav1.Condition shape: lastTransitionTime moves only when
the status does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gpupool.conditions import get_condition, is_true, iso, set_condition

T0 = datetime(2026, 5, 4, 8, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)
T2 = T0 + timedelta(hours=1)


def test_iso_is_rfc3339_utc_without_fractions() -> None:
    assert iso(T0) == "2026-05-04T08:00:00Z"
    assert iso(datetime(2026, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)) == "2026-12-31T23:59:59Z"


def test_a_new_condition_gets_every_field() -> None:
    conds = set_condition(None, "Funded", False, "Funding", "3/6 seat-blocks", 4, T0)
    assert conds == [{"type": "Funded", "status": "False", "reason": "Funding",
                      "message": "3/6 seat-blocks", "observedGeneration": 4,
                      "lastTransitionTime": "2026-05-04T08:00:00Z"}]


@pytest.mark.parametrize(("given", "written"), [(True, "True"), (False, "False"),
                                                ("Unknown", "Unknown"), ("True", "True")])
def test_status_words(given: bool | str, written: str) -> None:
    assert set_condition([], "X", given, "R", "m", 1, T0)[0]["status"] == written


def test_same_status_keeps_the_transition_time_but_updates_the_rest() -> None:
    first = set_condition([], "Funded", False, "Funding", "3/6", 1, T0)
    again = set_condition(first, "Funded", False, "StillFunding", "5/6", 2, T1)
    assert again == [{"type": "Funded", "status": "False", "reason": "StillFunding",
                      "message": "5/6", "observedGeneration": 2,
                      "lastTransitionTime": iso(T0)}]


def test_a_status_change_moves_the_transition_time() -> None:
    first = set_condition([], "Funded", False, "Funding", "3/6", 1, T0)
    flipped = set_condition(first, "Funded", True, "ThresholdReached", "6/6", 1, T1)
    assert flipped[0]["status"] == "True"
    assert flipped[0]["lastTransitionTime"] == iso(T1)
    kept = set_condition(flipped, "Funded", True, "ThresholdReached", "6/6", 1, T2)
    assert kept[0]["lastTransitionTime"] == iso(T1)
    back = set_condition(kept, "Funded", False, "Funding", "5/6", 1, T2)
    assert back[0]["lastTransitionTime"] == iso(T2)


def test_other_conditions_are_left_alone_and_order_is_kept() -> None:
    conds = set_condition([], "Funded", False, "Funding", "m", 1, T0)
    conds = set_condition(conds, "Paused", False, "NotPaused", "m", 1, T0)
    conds = set_condition(conds, "Available", False, "ScaledToZero", "m", 1, T0)
    before = [dict(c) for c in conds]
    after = set_condition(conds, "Paused", True, "Paused", "spec.paused", 2, T2)
    assert [c["type"] for c in after] == ["Funded", "Paused", "Available"]
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1]["lastTransitionTime"] == iso(T2)
    assert conds == before  # the input list is not changed in place


def test_an_old_condition_without_a_transition_time_gets_one() -> None:
    old = [{"type": "Ready", "status": "True", "reason": "SpecValid", "message": "ok"}]
    got = set_condition(old, "Ready", True, "SpecValid", "ok", 3, T1)
    assert got[0]["lastTransitionTime"] == iso(T1)


def test_get_condition_and_is_true() -> None:
    conds = set_condition([], "Funded", True, "ThresholdReached", "m", 1, T0)
    conds = set_condition(conds, "Paused", False, "NotPaused", "m", 1, T0)
    funded = get_condition(conds, "Funded")
    assert funded is not None and funded["reason"] == "ThresholdReached"
    assert get_condition(conds, "Available") is None
    assert get_condition(None, "Funded") is None
    assert is_true(conds, "Funded")
    assert not is_true(conds, "Paused")
    assert not is_true(conds, "Available")
    assert not is_true(None, "Funded")
    assert not is_true(set_condition([], "U", "Unknown", "R", "m", 1, T0), "U")
