"""Money for seats (DESIGN.md "Vocabulary", issue 3 "Pricing", the seeds' price examples).

Every expected amount below is worked out by hand from those texts, in whole cents.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpupool.blocks import Block
from gpupool.pricing import (
    HourSlot,
    cycle_amount,
    format_money,
    from_cents,
    hour_slots,
    hourly_split,
    min_price,
    monthly_price,
    slot_count,
    to_cents,
    yearly_amount,
)

A, E, M = Block.ASIA, Block.EUROPE, Block.AMERICAS
D = Decimal
PRICES = {A: D("27.00"), E: D("39.00"), M: D("45.50")}


# -- hourly_split -------------------------------------------------------------------------------


def test_hourly_split_39_is_four_at_4_88_then_four_at_4_87() -> None:
    # The unlimited-subscriptions seed: "pricePerDay": "4.88" for hours 0 and 1 of a 39.00 block;
    # DESIGN.md: 3900 cents -> 488,488,488,488,487,487,487,487.
    assert hourly_split(D("39.00")) == [D("4.88")] * 4 + [D("4.87")] * 4


def test_hourly_split_27_leftover_on_the_earliest_hours() -> None:
    # 2700 cents = 8 x 337 + 4: the four earliest hours carry 3.38 (DESIGN.md's rule), so the
    # first hour of a 27.00 americas seat is 3.38, as in the seed's my-pledge example.
    assert hourly_split(D("27.00")) == [D("3.38")] * 4 + [D("3.37")] * 4


@pytest.mark.parametrize(
    ("price", "expected_cents"),
    [
        ("0.01", [1, 0, 0, 0, 0, 0, 0, 0]),  # one cent: it goes to the earliest hour
        ("0.07", [1, 1, 1, 1, 1, 1, 1, 0]),
        ("0.08", [1, 1, 1, 1, 1, 1, 1, 1]),
        ("0.09", [2, 1, 1, 1, 1, 1, 1, 1]),
        ("0", [0] * 8),
        ("8.00", [100] * 8),
        ("100.03", [1251, 1251, 1251, 1250, 1250, 1250, 1250, 1250]),
        ("9999999.99", [125000000] * 7 + [124999999]),
    ],
)
def test_hourly_split_whole_cents_leftover_first(price: str, expected_cents: list[int]) -> None:
    parts = hourly_split(D(price))
    assert parts == [D(c) / 100 for c in expected_cents]
    assert sum(parts, D(0)) == D(price)
    assert all(p == p.quantize(D("0.01")) for p in parts)
    assert all(isinstance(p, Decimal) for p in parts)
    assert [format_money(p) for p in parts] == [f"{c // 100}.{c % 100:02d}"
                                                for c in expected_cents]


@settings(deadline=None)
@given(st.integers(min_value=0, max_value=999_999_999))
def test_hourly_split_adds_up_exactly(cents: int) -> None:
    price = D(cents) / 100
    parts = hourly_split(price)
    assert len(parts) == 8
    assert sum(parts, D(0)) == price
    part_cents = [int(p * 100) for p in parts]
    assert all(D(c) / 100 == p for c, p in zip(part_cents, parts, strict=True))
    # Never more than a cent apart, and the larger amounts come first.
    assert max(part_cents) - min(part_cents) <= 1
    assert part_cents == sorted(part_cents, reverse=True)
    assert part_cents.count(cents // 8 + 1) == cents % 8


@pytest.mark.parametrize("price", ["12.345", "0.001", "1.999"])
def test_hourly_split_refuses_fractions_of_a_cent(price: str) -> None:
    with pytest.raises(ValueError, match="cent"):
        hourly_split(D(price))


def test_cents_helpers() -> None:
    assert to_cents("39.00") == 3900
    assert to_cents(D("0.01")) == 1
    assert to_cents("0") == 0
    with pytest.raises(ValueError):
        to_cents("0.005")
    assert from_cents(488) == D("4.88")
    assert str(from_cents(0)) == "0.00"
    assert str(from_cents(3900)) == "39.00"


def test_format_money_always_two_decimals() -> None:
    assert format_money(D("27")) == "27.00"
    assert format_money(D("27.5")) == "27.50"
    assert format_money(D("0")) == "0.00"
    assert format_money(D("397.8")) == "397.80"


# -- monthly price, yearly amount ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("blocks", "quantity", "expected"),
    [
        ([M], 1, "45.50"),
        ([A], 1, "27.00"),
        # seeds: "With quantity: 2 and two blocks selected, you pay 2 x (block_a + block_b)"
        ([A, E], 2, "132.00"),  # 2 x (27.00 + 39.00)
        ([A, E, M], 1, "111.50"),
        ([A, E, M], 20, "2230.00"),  # 20 seats x three blocks = 20 x 111.50
        ([E, E], 1, "39.00"),  # a block counts once
    ],
)
def test_monthly_price(blocks: list[Block], quantity: int, expected: str) -> None:
    got = monthly_price(PRICES, blocks, quantity)
    assert isinstance(got, Decimal)
    assert got == D(expected)
    assert format_money(got) == expected


def test_monthly_price_one_cent_blocks_twenty_seats() -> None:
    cent = {A: D("0.01"), E: D("0.01"), M: D("0.01")}
    assert monthly_price(cent, [A], 1) == D("0.01")
    assert monthly_price(cent, [A, E, M], 20) == D("0.60")


def test_monthly_price_is_the_sum_of_the_held_hourly_slots() -> None:
    # seeds: "monthlyPrice = sum of prices for all reserved slots"
    for blocks, quantity in (([M], 1), ([A, E], 2), ([A, E, M], 20)):
        slots = [s for b in blocks for i in range(quantity) for s in hour_slots(b, i, PRICES[b])]
        assert sum((s.price_per_day for s in slots), D(0)) == monthly_price(
            PRICES, blocks, quantity)
        assert len(slots) == slot_count(blocks, quantity)


@pytest.mark.parametrize(
    ("monthly", "discount", "expected"),
    [
        ("39.00", "0.15", "397.80"),  # 39 x 12 = 468; x 0.85 = 397.80
        ("39.00", "0", "468.00"),
        ("27.00", "0.15", "275.40"),
        ("2230.00", "0.15", "22746.00"),  # 20 seats x three blocks, yearly
        ("0.01", "0.15", "0.10"),  # 0.12 x 0.85 = 0.102
        ("0.03", "0.875", "0.05"),  # 0.36 x 0.125 = 0.045 -> half-up 0.05 (half-even: 0.04)
        ("27.03", "0.875", "40.55"),  # 324.36 x 0.125 = 40.545 -> 40.55 (half-even: 40.54)
        ("0.01", "0.875", "0.02"),  # 0.015 -> 0.02
        ("10.00", "0.9999", "0.01"),  # 120 x 0.0001 = 0.012
    ],
)
def test_yearly_amount_half_up_to_the_cent(monthly: str, discount: str, expected: str) -> None:
    got = yearly_amount(D(monthly), D(discount))
    assert isinstance(got, Decimal)
    assert got == D(expected)
    assert format_money(got) == expected


def test_cycle_amount() -> None:
    assert cycle_amount(D("39.00"), "month", D("0.15")) == D("39.00")
    assert cycle_amount(D("39.00"), "year", D("0.15")) == D("397.80")
    assert cycle_amount(D("39.00"), "year", D("0")) == D("468.00")


def test_min_price_is_the_lowest_block_price() -> None:
    assert min_price(PRICES) == D("27.00")
    assert min_price({E: D("39.00")}) == D("39.00")
    assert min_price({A: D("39.00"), M: D("38.99")}) == D("38.99")


# -- slots --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blocks", "quantity", "expected"),
    [
        ([M], 1, 8),  # the gpu-boosts seed: one block, default quantity -> "slotCount": 8
        ([A, E], 2, 32),
        ([A, E, M], 20, 480),
        ([A, A], 1, 8),
    ],
)
def test_slot_count_is_8_x_blocks_x_quantity(blocks: list[Block], quantity: int,
                                             expected: int) -> None:
    assert slot_count(blocks, quantity) == expected


def test_hour_slots_of_an_americas_seat() -> None:
    slots = hour_slots(M, 0, D("27.00"))
    assert [s.hour for s in slots] == [16, 17, 18, 19, 20, 21, 22, 23]
    assert {s.slot_index for s in slots} == {0}
    assert [s.price_per_day for s in slots] == [D("3.38")] * 4 + [D("3.37")] * 4
    # The gpu-boosts seed's my-pledge: { "hour": 16, "slotIndex": 0, "pricePerDay": "3.38" }
    assert slots[0].to_status() == {"hour": 16, "slotIndex": 0, "pricePerDay": "3.38"}


def test_hour_slots_of_an_asia_seat() -> None:
    slots = hour_slots(A, 3, D("39.00"))
    assert [s.hour for s in slots] == list(range(8))
    assert [s.to_status() for s in slots[:2]] == [
        {"hour": 0, "slotIndex": 3, "pricePerDay": "4.88"},
        {"hour": 1, "slotIndex": 3, "pricePerDay": "4.88"},
    ]
    assert slots[-1] == HourSlot(7, 3, D("4.87"))


def test_hour_slots_of_a_europe_seat_one_cent() -> None:
    slots = hour_slots(E, 1, D("0.01"))
    assert [(s.hour, s.price_per_day) for s in slots] == [(8, D("0.01"))] + [
        (h, D("0.00")) for h in range(9, 16)]
    assert slots[1].to_status()["pricePerDay"] == "0.00"
