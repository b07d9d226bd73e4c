"""Money for seats: exact decimal arithmetic, whole cents, never floats."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from gpupool.blocks import HOURS_PER_BLOCK, Block

CENT = Decimal("0.01")


def to_cents(amount: Decimal | str) -> int:
    """A two-decimal amount as integer cents; refuses fractions of a cent."""
    value = Decimal(amount)
    cents = value * 100
    if cents != cents.to_integral_value():
        raise ValueError(f"{amount} is not exact to the cent")
    return int(cents)


def from_cents(cents: int) -> Decimal:
    return (Decimal(cents) / 100).quantize(CENT)


def format_money(amount: Decimal) -> str:
    """Two-decimal string, as the seeds write money ("27.00")."""
    return str(amount.quantize(CENT, rounding=ROUND_HALF_UP))


def hourly_split(block_price: Decimal) -> list[Decimal]:
    """A block's monthly seat price spread over its 8 hours in whole cents.

    The parts add up exactly to the block price; leftover cents go to the earliest hours
    (39.00 -> 4.88 x 4, 4.87 x 4).
    """
    total = to_cents(block_price)
    base, leftover = divmod(total, HOURS_PER_BLOCK)
    return [from_cents(base + (1 if i < leftover else 0)) for i in range(HOURS_PER_BLOCK)]


def monthly_price(block_prices: Mapping[Block, Decimal], blocks: Iterable[Block],
                  quantity: int) -> Decimal:
    """quantity x the sum of the chosen blocks' seat prices."""
    return (quantity * sum((block_prices[b] for b in set(blocks)), Decimal(0))).quantize(CENT)


def yearly_amount(monthly: Decimal, annual_discount: Decimal) -> Decimal:
    """monthly x 12 x (1 - annualDiscount), half-up to the cent."""
    return (monthly * 12 * (1 - annual_discount)).quantize(CENT, rounding=ROUND_HALF_UP)


def cycle_amount(monthly: Decimal, billing_cycle: str, annual_discount: Decimal) -> Decimal:
    if billing_cycle == "year":
        return yearly_amount(monthly, annual_discount)
    return monthly


def min_price(block_prices: Mapping[Block, Decimal]) -> Decimal:
    return min(block_prices.values())


def slot_count(blocks: Iterable[Block], quantity: int) -> int:
    return HOURS_PER_BLOCK * len(set(blocks)) * quantity


@dataclass(frozen=True)
class HourSlot:
    hour: int
    slot_index: int
    price_per_day: Decimal

    def to_status(self) -> dict[str, object]:
        return {"hour": self.hour, "slotIndex": self.slot_index,
                "pricePerDay": format_money(self.price_per_day)}


def hour_slots(block: Block, slot_index: int, block_price: Decimal) -> list[HourSlot]:
    """The 8 hourly slots one seat holds in ``block``."""
    return [HourSlot(h, slot_index, p) for h, p in zip(block.hours, hourly_split(block_price),
                                                       strict=True)]
