"""The gate (DESIGN.md "Keys and the gate", issue 5): a key is open iff its subscription is
``active``, its pool is ``active`` and the current UTC block is one it bought."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpupool.blocks import Block
from gpupool.gate import CLOSED, OPEN, gate_state, next_gate_change

SUB_PHASES = ("pending", "pledged", "pending_key", "active", "past_due", "canceled")
POOL_PHASES = ("draft", "funding", "activating", "active", "paused")
HOURS = {"asia": range(0, 8), "europe": range(8, 16), "americas": range(16, 24)}
A, E, M = Block.ASIA, Block.EUROPE, Block.AMERICAS
BLOCK_SETS = [frozenset(c) for n in range(4) for c in itertools.combinations(Block, n)]


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, 5, day, hour, minute, second, tzinfo=UTC)


def test_open_and_closed_are_the_status_words() -> None:
    assert (OPEN, CLOSED) == ("open", "closed")  # the CRD's status.gate enum


@pytest.mark.parametrize("blocks", BLOCK_SETS, ids=lambda s: "+".join(sorted(b.value for b in s))
                         or "none")
@pytest.mark.parametrize("sub_phase", SUB_PHASES)
@pytest.mark.parametrize("pool_phase", POOL_PHASES)
def test_gate_state_over_every_block_phase_and_hour(blocks: frozenset[Block], sub_phase: str,
                                                     pool_phase: str) -> None:
    bought = {b.value for b in blocks}
    for hour in range(24):
        owns_hour = any(hour in HOURS[name] for name in bought)
        expected = OPEN if sub_phase == "active" and pool_phase == "active" and owns_hour \
            else CLOSED
        for minute, second in ((0, 0), (59, 59)):
            assert gate_state(sub_phase, pool_phase, blocks, at(12, hour, minute, second)) \
                == expected, (hour, minute)


def test_gate_accepts_any_iterable_of_blocks() -> None:
    assert gate_state("active", "active", iter([E]), at(12, 9)) == OPEN
    assert gate_state("active", "active", (E, E), at(12, 16)) == CLOSED


@pytest.mark.parametrize(
    ("instant", "blocks", "expected"),
    [
        (at(12, 7, 59, 59), [E], at(12, 8)),  # opens at 08:00
        (at(12, 8), [E], at(12, 16)),  # closes at 16:00
        (at(12, 16), [E], at(13, 8)),
        (at(12, 22), [A], at(13, 0)),  # midnight wrap, opening
        (at(12, 16), [M], at(13, 0)),  # midnight wrap, closing
        (at(12, 23, 59, 59), [M, A], at(13, 8)),  # open across midnight until 08:00
        (at(12, 10), [M, A], at(12, 16)),
        (at(12, 3), [A, E], at(12, 16)),
        (datetime(2026, 12, 31, 23, 0, tzinfo=UTC), [A], datetime(2027, 1, 1, 0, 0, tzinfo=UTC)),
        (datetime(2028, 2, 28, 18, 0, tzinfo=UTC), [A, E],
         datetime(2028, 2, 29, 0, 0, tzinfo=UTC)),
    ],
)
def test_next_gate_change(instant: datetime, blocks: list[Block], expected: datetime) -> None:
    got = next_gate_change("active", "active", blocks, instant)
    assert got == expected
    assert gate_state("active", "active", blocks, got) != gate_state(
        "active", "active", blocks, instant)


def test_next_gate_change_is_none_for_all_blocks() -> None:
    for hour in (0, 7, 8, 16, 23):
        assert next_gate_change("active", "active", [A, E, M], at(12, hour)) is None


@pytest.mark.parametrize("sub_phase", [p for p in SUB_PHASES if p != "active"])
def test_next_gate_change_is_none_while_the_subscription_keeps_it_closed(sub_phase: str) -> None:
    assert next_gate_change(sub_phase, "active", [E], at(12, 3)) is None


@pytest.mark.parametrize("pool_phase", [p for p in POOL_PHASES if p != "active"])
def test_next_gate_change_is_none_while_the_pool_keeps_it_closed(pool_phase: str) -> None:
    assert next_gate_change("active", pool_phase, [E], at(12, 3)) is None


@settings(deadline=None)
@given(
    st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2040, 1, 1),
                 timezones=st.just(UTC)),
    st.sampled_from([s for s in BLOCK_SETS if 0 < len(s) < 3]),
)
def test_gate_holds_until_the_next_change_then_flips(instant: datetime,
                                                      blocks: frozenset[Block]) -> None:
    now = gate_state("active", "active", blocks, instant)
    change = next_gate_change("active", "active", blocks, instant)
    assert change is not None and change > instant
    # Sample every hour until the change (and the microsecond before it): the gate holds.
    probe = instant
    while probe < change:
        assert gate_state("active", "active", blocks, probe) == now
        probe += timedelta(hours=1)
    assert gate_state("active", "active", blocks, change - timedelta(microseconds=1)) == now
    assert gate_state("active", "active", blocks, change) != now
