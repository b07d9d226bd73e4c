"""The UTC blocks and the clock arithmetic around them (DESIGN.md "Vocabulary", the seeds' tables).

Expected values come from the block table: asia 00:00-07:59 (alias night), europe 08:00-15:59,
americas 16:00-23:59, all UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpupool.blocks import (
    Block,
    block_at,
    next_boundary,
    next_change,
    next_opening,
    normalize_blocks,
    parse_block,
)

# The seeds' table, written out hour by hour rather than computed the way the module does.
HOURS = {
    "asia": [0, 1, 2, 3, 4, 5, 6, 7],
    "europe": [8, 9, 10, 11, 12, 13, 14, 15],
    "americas": [16, 17, 18, 19, 20, 21, 22, 23],
}
BLOCK_OF_HOUR = {h: name for name, hours in HOURS.items() for h in hours}
BOUNDARY_HOURS = (0, 8, 16)


def at(day: int, hour: int, minute: int = 0, second: int = 0, micro: int = 0) -> datetime:
    return datetime(2026, 3, day, hour, minute, second, micro, tzinfo=UTC)


# -- block_at -----------------------------------------------------------------------------------


@pytest.mark.parametrize("hour", range(24))
def test_block_at_every_hour_start_and_end(hour: int) -> None:
    assert block_at(at(10, hour)).value == BLOCK_OF_HOUR[hour]
    assert block_at(at(10, hour, 59, 59, 999_999)).value == BLOCK_OF_HOUR[hour]


@pytest.mark.parametrize(
    ("instant", "expected"),
    [
        (at(10, 0), "asia"),
        (at(10, 7, 59, 59, 999_999), "asia"),
        (at(10, 8), "europe"),
        (at(10, 15, 59, 59, 999_999), "europe"),
        (at(10, 16), "americas"),
        (at(10, 23, 59, 59, 999_999), "americas"),
    ],
)
def test_block_at_boundaries(instant: datetime, expected: str) -> None:
    assert block_at(instant).value == expected


def test_block_at_converts_other_zones_to_utc() -> None:
    # 09:30 at UTC+2 is 07:30 UTC: still asia, although the local clock reads europe hours.
    plus_two = timezone(timedelta(hours=2))
    assert block_at(datetime(2026, 3, 10, 9, 30, tzinfo=plus_two)) is Block.ASIA
    # 20:00 at UTC-5 is 01:00 UTC the next day.
    minus_five = timezone(timedelta(hours=-5))
    assert block_at(datetime(2026, 3, 10, 20, 0, tzinfo=minus_five)) is Block.ASIA
    assert block_at(datetime(2026, 3, 10, 10, 59, tzinfo=minus_five)) is Block.EUROPE


def test_naive_instants_are_refused() -> None:
    naive = datetime(2026, 3, 10, 12, 0)
    for fn in (block_at, next_boundary):
        with pytest.raises(ValueError, match="naive"):
            fn(naive)
    with pytest.raises(ValueError, match="naive"):
        next_change(naive, [Block.EUROPE])


def test_block_hours_match_the_table() -> None:
    for block in Block:
        assert list(block.hours) == HOURS[block.value]
        assert block.start_hour == HOURS[block.value][0]


# -- next_boundary ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("instant", "expected"),
    [
        (at(10, 0), at(10, 8)),  # on a boundary: strictly after
        (at(10, 7, 59, 59, 999_999), at(10, 8)),
        (at(10, 8), at(10, 16)),
        (at(10, 12, 34, 56), at(10, 16)),
        (at(10, 16), at(11, 0)),
        (at(10, 23, 59, 59), at(11, 0)),  # midnight wrap
        (datetime(2026, 12, 31, 20, 0, tzinfo=UTC), datetime(2027, 1, 1, 0, 0, tzinfo=UTC)),
        (datetime(2028, 2, 28, 17, 0, tzinfo=UTC), datetime(2028, 2, 29, 0, 0, tzinfo=UTC)),
    ],
)
def test_next_boundary(instant: datetime, expected: datetime) -> None:
    got = next_boundary(instant)
    assert got == expected
    assert got.utcoffset() == timedelta(0)


def test_next_boundary_of_a_non_utc_instant_is_a_utc_boundary() -> None:
    # 07:30 at UTC-1 is 08:30 UTC -> next boundary 16:00 UTC.
    minus_one = timezone(timedelta(hours=-1))
    got = next_boundary(datetime(2026, 3, 10, 7, 30, tzinfo=minus_one))
    assert got == at(10, 16)
    assert got.hour == 16
    assert got.tzinfo is not None
    assert got.utcoffset() == timedelta(0)


instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@settings(deadline=None)
@given(instants)
def test_next_boundary_properties(instant: datetime) -> None:
    got = next_boundary(instant)
    assert instant < got <= instant + timedelta(hours=8)
    assert (got.hour, got.minute, got.second, got.microsecond) in {(h, 0, 0, 0)
                                                                     for h in BOUNDARY_HOURS}
    # Nothing between the instant and the boundary is in a different block.
    assert block_at(got - timedelta(microseconds=1)) == block_at(instant)
    assert block_at(got) != block_at(instant)


# -- parse_block / normalize_blocks -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("asia", Block.ASIA),
        ("europe", Block.EUROPE),
        ("americas", Block.AMERICAS),
        ("night", Block.ASIA),  # the gpu-boosts seed's name for 00:00-07:59
        ("Night", Block.ASIA),
        (" europe ", Block.EUROPE),
    ],
)
def test_parse_block(name: str, expected: Block) -> None:
    assert parse_block(name) is expected


def test_night_is_accepted_but_never_written() -> None:
    assert parse_block("night").value == "asia"
    assert "night" not in {b.value for b in Block}


@pytest.mark.parametrize("name", ["mars", "", "asia,europe", "nights", "emea"])
def test_parse_block_refuses_unknown_names(name: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_block(name)
    message = str(err.value)
    assert repr(name) in message
    for accepted in ("asia", "europe", "americas", "night"):
        assert accepted in message


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["americas", "night"], ("asia", "americas")),
        (["night", "asia"], ("asia",)),
        (["americas", "europe", "asia"], ("asia", "europe", "americas")),
        (["europe", "europe"], ("europe",)),
        (["night", "europe", "americas"], ("asia", "europe", "americas")),
        ([], ()),
    ],
)
def test_normalize_blocks_dedups_aliases_and_orders_by_hour(
        names: list[str], expected: tuple[str, ...]) -> None:
    got = normalize_blocks(names)
    assert isinstance(got, tuple)
    assert tuple(b.value for b in got) == expected


def test_normalize_blocks_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match="mars"):
        normalize_blocks(["asia", "mars"])


# -- next_change / next_opening -----------------------------------------------------------------

A, E, M = Block.ASIA, Block.EUROPE, Block.AMERICAS


@pytest.mark.parametrize(
    ("instant", "blocks", "expected"),
    [
        (at(10, 3), [E], at(10, 8)),  # closed -> opens at 08:00
        (at(10, 8), [E], at(10, 16)),  # open from the boundary itself -> closes at 16:00
        (at(10, 15, 59, 59), [E], at(10, 16)),
        (at(10, 20), [E], at(11, 8)),  # closed through asia, opens next morning
        (at(10, 20), [A], at(11, 0)),  # midnight wrap: opens at 00:00
        (at(10, 23, 59, 59), [M], at(11, 0)),  # midnight wrap: closes at 00:00
        (at(10, 17), [M, A], at(11, 8)),  # americas then asia: one stretch over midnight
        (at(10, 23), [A, E], at(11, 0)),
        (at(10, 1), [A, E], at(10, 16)),
        (at(10, 9), [A, M], at(10, 16)),
        (datetime(2026, 12, 31, 16, 0, tzinfo=UTC), [M],
         datetime(2027, 1, 1, 0, 0, tzinfo=UTC)),  # year wrap
    ],
)
def test_next_change(instant: datetime, blocks: list[Block], expected: datetime) -> None:
    assert next_change(instant, blocks) == expected


@pytest.mark.parametrize("blocks", [[], [A, E, M], [M, E, A, A]])
def test_next_change_never_for_no_blocks_or_all_blocks(blocks: list[Block]) -> None:
    assert next_change(at(10, 5), blocks) is None


block_sets = st.sets(st.sampled_from(list(Block)), min_size=1, max_size=2)


@settings(deadline=None)
@given(instants, block_sets)
def test_next_change_is_the_first_boundary_where_the_state_flips(
        instant: datetime, blocks: set[Block]) -> None:
    got = next_change(instant, blocks)
    assert got is not None
    assert got > instant
    assert (got.hour, got.minute, got.second, got.microsecond) in {(h, 0, 0, 0)
                                                                     for h in BOUNDARY_HOURS}
    is_open = BLOCK_OF_HOUR[instant.hour] in {b.value for b in blocks}
    assert (BLOCK_OF_HOUR[got.hour] in {b.value for b in blocks}) != is_open
    # Every boundary before it keeps the state: no earlier flip.
    boundary = next_boundary(instant)
    while boundary < got:
        assert (BLOCK_OF_HOUR[boundary.hour] in {b.value for b in blocks}) == is_open
        boundary += timedelta(hours=8)
    assert got - instant <= timedelta(hours=16)


@pytest.mark.parametrize(
    ("instant", "blocks", "expected"),
    [
        (at(10, 9, 15), [E], at(10, 9, 15)),  # inside: open now
        (at(10, 7, 59), [E], at(10, 8)),
        (at(10, 16), [E], at(11, 8)),
        (at(10, 16), [A], at(11, 0)),
        (at(10, 1), [M], at(10, 16)),
        (at(10, 17), [A, E], at(11, 0)),
        (datetime(2026, 12, 31, 22, 0, tzinfo=UTC), [E], datetime(2027, 1, 1, 8, 0, tzinfo=UTC)),
    ],
)
def test_next_opening(instant: datetime, blocks: list[Block], expected: datetime) -> None:
    assert next_opening(instant, blocks) == expected


def test_next_opening_never_without_blocks() -> None:
    assert next_opening(at(10, 5), []) is None


def test_next_opening_of_a_non_utc_instant_inside_a_block_is_that_instant_in_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    instant = datetime(2026, 3, 10, 11, 0, tzinfo=plus_two)  # 09:00 UTC, europe
    got = next_opening(instant, [E])
    assert got == instant
    assert got is not None and got.utcoffset() == timedelta(0)


@settings(deadline=None)
@given(instants, block_sets)
def test_next_opening_lands_in_a_bought_block(instant: datetime, blocks: set[Block]) -> None:
    got = next_opening(instant, blocks)
    assert got is not None
    assert got >= instant
    assert BLOCK_OF_HOUR[got.hour] in {b.value for b in blocks}
    if got > instant:
        # closed until then: the instant just before is outside every bought block
        assert BLOCK_OF_HOUR[(got - timedelta(microseconds=1)).hour] not in {
            b.value for b in blocks}
