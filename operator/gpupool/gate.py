"""The time gate: a key is open iff its subscription is active, its pool is active and the
current UTC block is one it bought."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from gpupool.blocks import Block, block_at, next_change

OPEN = "open"
CLOSED = "closed"


def gate_state(sub_phase: str, pool_phase: str, blocks: Iterable[Block], at: datetime) -> str:
    if sub_phase != "active" or pool_phase != "active":
        return CLOSED
    return OPEN if block_at(at) in set(blocks) else CLOSED


def next_gate_change(sub_phase: str, pool_phase: str, blocks: Iterable[Block],
                     at: datetime) -> datetime | None:
    """When the clock alone next flips this key; None while state keeps it closed."""
    if sub_phase != "active" or pool_phase != "active":
        return None
    return next_change(at, blocks)
