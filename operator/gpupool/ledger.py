"""The seat ledger: which subscription holds which seat indexes in which block.

Where it lives and why: one map in the Pool's own status (``status.ledger``), written only by
the Pool's reconcile, with the Pool's ``resourceVersion`` as a precondition. One object per pool
means one atomic write decides every admission for that pool, so two admissions can never take
the same seat: a concurrent writer (another operator replica, a restart racing its predecessor)
gets 409 Conflict and re-plans from what was actually written. Inside one operator process the
pool's reconcile runs on one worker at a time, so a burst of new subscriptions is batched into a
single write instead of racing. Nothing is held in memory across passes: after a restart the next
pass reads the ledger back and continues, so nothing is lost or admitted twice.

The planner is pure: given the pool's capacity, the current ledger and the subscriptions that
name the pool, it keeps every existing holding (seats are never moved or taken back while their
subscription holds them), drops holdings whose subscription is gone, canceled or being deleted,
and admits waiting subscriptions oldest first (creationTimestamp, then name). A waiting
subscription that does not fit is skipped, so a large request does not block smaller ones
behind it; it keeps its place and is admitted first when seats free up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gpupool.blocks import BLOCK_ORDER, Block

Holding = dict[Block, tuple[int, ...]]


@dataclass(frozen=True)
class Claim:
    """A subscription that names the pool, as the planner needs it."""

    name: str
    uid: str
    created: str
    blocks: tuple[Block, ...]
    quantity: int
    eligible: bool
    """False when it must not hold seats (canceled, deleting, invalid, blocked on payment)."""


@dataclass
class Plan:
    ledger: dict[str, tuple[str, Holding]]
    admitted: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)
    """name -> reason (PoolFull, BlockNotOffered) for eligible claims left without seats."""

    def reserved(self) -> dict[Block, int]:
        out = {b: 0 for b in BLOCK_ORDER}
        for _, holding in self.ledger.values():
            for block, seats in holding.items():
                out[block] += len(seats)
        return out

    def pledged_slots(self) -> int:
        """Seat-blocks held (the seeds' pledgedSlots)."""
        return sum(self.reserved().values())


def parse_ledger(raw: Mapping[str, object] | None) -> dict[str, tuple[str, Holding]]:
    out: dict[str, tuple[str, Holding]] = {}
    for name, entry in (raw or {}).items():
        if not isinstance(entry, Mapping):
            continue
        seats = entry.get("seats") or {}
        holding: Holding = {}
        if isinstance(seats, Mapping):
            for block_name, idx in seats.items():
                if block_name in Block._value2member_map_ and isinstance(idx, list):
                    holding[Block(block_name)] = tuple(sorted(int(i) for i in idx))
        out[name] = (str(entry.get("uid", "")), holding)
    return out


def dump_ledger(ledger: Mapping[str, tuple[str, Holding]]) -> dict[str, object]:
    return {
        name: {"uid": uid, "seats": {b.value: list(s) for b, s in sorted(
            holding.items(), key=lambda kv: BLOCK_ORDER.index(kv[0]))}}
        for name, (uid, holding) in sorted(ledger.items())
    }


def plan(capacity: Mapping[Block, int], current: Mapping[str, tuple[str, Holding]],
         claims: Iterable[Claim], admitting: bool) -> Plan:
    """Recompute the ledger. ``admitting`` is False while the pool takes no new seat-holders."""
    by_name = {c.name: c for c in claims}
    ledger: dict[str, tuple[str, Holding]] = {}
    result = Plan(ledger=ledger)
    for name, (uid, holding) in current.items():
        claim = by_name.get(name)
        if claim is None or claim.uid != uid or not claim.eligible:
            result.released.append(name)
            continue
        ledger[name] = (uid, holding)

    used: dict[Block, set[int]] = {b: set() for b in BLOCK_ORDER}
    for _, holding in ledger.values():
        for block, seats in holding.items():
            used[block].update(seats)

    waiting = sorted((c for c in by_name.values() if c.eligible and c.name not in ledger),
                     key=lambda c: (c.created, c.name))
    for claim in waiting:
        if not admitting:
            continue
        missing = [b for b in claim.blocks if b not in capacity]
        if missing:
            result.waiting[claim.name] = "BlockNotOffered"
            continue
        if any(capacity[b] - len(used[b]) < claim.quantity for b in claim.blocks):
            result.waiting[claim.name] = "PoolFull"
            continue
        holding = {}
        for block in claim.blocks:
            free = [i for i in range(capacity[block]) if i not in used[block]][: claim.quantity]
            used[block].update(free)
            holding[block] = tuple(free)
        ledger[claim.name] = (claim.uid, holding)
        result.admitted.append(claim.name)
    return result
