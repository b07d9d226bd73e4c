"""The gate, re-checked by the gateway on every request.

A key is open iff its subscription is ``active``, its pool is ``active`` and the current UTC block
is one it bought (``gpupool.gate``). The gateway reads the phases from the key's Secret and the
block from its own clock (:func:`gpupool.blocks.utcnow`), so it closes a key at the boundary to the
second even while the operator has not yet flipped the Secret.

Refusals, checked in this order:

==========================  ======  ========================
cause                       status  code
==========================  ======  ========================
subscription ``past_due``   402     ``subscription_past_due``
subscription ``canceled``   403     ``subscription_canceled``
``pending``/``pledged``/    403     ``key_not_active``
``pending_key``/other
pool not ``active``         503     ``pool_not_active``
outside the key's blocks    403     ``outside_blocks`` (+ ``next_open_at``, ``Retry-After``)
==========================  ======  ========================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

from gpupool.blocks import BLOCK_ORDER, Block, block_at, next_change, next_opening
from gpupool.gateway.keys import KeyRecord


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    code: str
    message: str
    retry_after: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


def iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def _hours(blocks: frozenset[Block]) -> str:
    parts = [f"{b.value} {b.start_hour:02d}:00-{b.start_hour + 7:02d}:59"
             for b in BLOCK_ORDER if b in blocks]
    return ", ".join(parts) + " UTC" if parts else "no block"


def outside_blocks(record: KeyRecord, now: datetime) -> Refusal:
    opens = next_opening(now, record.blocks)
    if opens is None:
        return Refusal(403, "outside_blocks", "This key has no time block, so it never opens.")
    return Refusal(
        403, "outside_blocks",
        f"This key is valid only during its blocks ({_hours(record.blocks)}); the current block "
        f"is {block_at(now).value}. It next opens at {iso(opens)}.",
        retry_after=max(1, math.ceil((opens - now).total_seconds())),
        extra={"next_open_at": iso(opens)},
    )


def check(record: KeyRecord, now: datetime) -> Refusal | None:
    """None when the key may be used at ``now``; otherwise why not."""
    phase = record.subscription_phase
    if phase != "active":
        if phase == "past_due":
            return Refusal(402, "subscription_past_due",
                           "The subscription for this key is past due: a payment failed, so the "
                           "key is suspended until the payment succeeds.")
        if phase == "canceled":
            return Refusal(403, "subscription_canceled",
                           "The subscription for this key has been canceled.")
        if phase == "pending_key":
            why = "it awaits manual provisioning by the pool operator"
        elif phase == "pledged":
            why = "the pool is still being funded; the key opens when the pool is active"
        else:
            why = f"the subscription is {phase or 'not active'}"
        return Refusal(403, "key_not_active", f"This key is not active yet: {why}.")
    if record.pool_phase != "active":
        return Refusal(503, "pool_not_active",
                       f"The pool {record.pool!r} is not active (phase: "
                       f"{record.pool_phase or 'unknown'}); try again later.")
    if block_at(now) not in record.blocks:
        return outside_blocks(record, now)
    return None


def closes_at(record: KeyRecord, now: datetime) -> datetime | None:
    """When an open key's current run of blocks ends (None: it holds every block)."""
    return next_change(now, record.blocks)
