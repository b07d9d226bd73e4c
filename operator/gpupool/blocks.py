"""The three fixed UTC blocks a seat is sold in, and the clock arithmetic around them."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

HOURS_PER_BLOCK = 8


class Block(enum.StrEnum):
    ASIA = "asia"
    EUROPE = "europe"
    AMERICAS = "americas"

    @property
    def start_hour(self) -> int:
        return BLOCK_ORDER.index(self) * HOURS_PER_BLOCK

    @property
    def hours(self) -> range:
        return range(self.start_hour, self.start_hour + HOURS_PER_BLOCK)


BLOCK_ORDER: tuple[Block, ...] = (Block.ASIA, Block.EUROPE, Block.AMERICAS)
ALIASES: dict[str, Block] = {"night": Block.ASIA}
ACCEPTED_NAMES: tuple[str, ...] = (*(b.value for b in BLOCK_ORDER), *ALIASES)


def parse_block(name: str) -> Block:
    """Read a block name as written by a user; ``night`` is accepted and becomes ``asia``."""
    key = name.strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    try:
        return Block(key)
    except ValueError:
        raise ValueError(
            f"unknown block {name!r}: expected one of {', '.join(ACCEPTED_NAMES)}"
        ) from None


def normalize_blocks(names: Iterable[str]) -> tuple[Block, ...]:
    """Parse, de-duplicate (``night`` and ``asia`` are one block) and order blocks by hour."""
    chosen = {parse_block(n) for n in names}
    return tuple(b for b in BLOCK_ORDER if b in chosen)


def _as_utc(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ValueError("naive datetime: gpupool only reasons in aware UTC instants")
    return at.astimezone(UTC)


def block_at(at: datetime) -> Block:
    """The block a UTC instant falls in."""
    return BLOCK_ORDER[_as_utc(at).hour // HOURS_PER_BLOCK]


def block_start(at: datetime) -> datetime:
    """The boundary that opened the block ``at`` is in."""
    u = _as_utc(at)
    return u.replace(hour=(u.hour // HOURS_PER_BLOCK) * HOURS_PER_BLOCK, minute=0, second=0,
                     microsecond=0)


def next_boundary(at: datetime) -> datetime:
    """The first block boundary (00:00, 08:00, 16:00 UTC) strictly after ``at``."""
    return block_start(at) + timedelta(hours=HOURS_PER_BLOCK)


def next_change(at: datetime, blocks: Iterable[Block]) -> datetime | None:
    """When a key bought for ``blocks`` next flips (opens or closes), or None if it never does.

    A key for all three blocks (or none) is never flipped by the clock.
    """
    owned = set(blocks)
    if not owned or len(owned) == len(BLOCK_ORDER):
        return None
    is_open = block_at(at) in owned
    boundary = next_boundary(at)
    while (block_at(boundary) in owned) == is_open:
        boundary += timedelta(hours=HOURS_PER_BLOCK)
    return boundary


def next_opening(at: datetime, blocks: Iterable[Block]) -> datetime | None:
    """The next instant at or after ``at`` when one of ``blocks`` is current."""
    owned = set(blocks)
    if not owned:
        return None
    if block_at(at) in owned:
        return _as_utc(at)
    boundary = next_boundary(at)
    while block_at(boundary) not in owned:
        boundary += timedelta(hours=HOURS_PER_BLOCK)
    return boundary


def utcnow() -> datetime:
    """The one clock gpupool reads; tests shift it with faketime."""
    return datetime.now(UTC)
