"""The seat ledger planner (issue 3 "Seat ledger", the ledger module's own contract).

A subscription for blocks B with quantity q holds q seat indexes in each block of B; the planner
never oversells, never moves or takes back a holding, frees the seats of subscriptions that are
gone, replaced (new uid) or no longer eligible, and admits waiting ones oldest first
(creationTimestamp, then name), skipping one that does not fit without blocking smaller ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from gpupool.blocks import BLOCK_ORDER, Block
from gpupool.ledger import Claim, Holding, Plan, dump_ledger, parse_ledger, plan

A, E, M = Block.ASIA, Block.EUROPE, Block.AMERICAS
Ledger = dict[str, tuple[str, Holding]]


def claim(name: str, created: str = "2026-01-01T00:00:00Z", blocks: tuple[Block, ...] = (A,),
          quantity: int = 1, *, uid: str | None = None, eligible: bool = True) -> Claim:
    return Claim(name=name, uid=uid or f"uid-{name}", created=created, blocks=blocks,
                 quantity=quantity, eligible=eligible)


def ts(second: int) -> str:
    return f"2026-01-01T00:00:{second:02d}Z"


def held(p: Plan) -> dict[str, dict[Block, tuple[int, ...]]]:
    return {name: holding for name, (_, holding) in p.ledger.items()}


# -- admission ----------------------------------------------------------------------------------


def test_empty_pool_admits_in_lowest_indexes() -> None:
    p = plan({A: 3}, {}, [claim("a", ts(1), quantity=2)], admitting=True)
    assert held(p) == {"a": {A: (0, 1)}}
    assert p.admitted == ["a"]
    assert p.released == []
    assert p.waiting == {}
    assert p.ledger["a"][0] == "uid-a"


def test_never_oversells_and_admits_oldest_first() -> None:
    claims = [claim(f"s{i}", ts(10 - i)) for i in range(5)]  # s4 is the oldest, s0 the newest
    p = plan({A: 3}, {}, claims, admitting=True)
    assert set(held(p)) == {"s4", "s3", "s2"}
    assert p.admitted == ["s4", "s3", "s2"]
    assert p.waiting == {"s1": "PoolFull", "s0": "PoolFull"}
    assert p.reserved()[A] == 3
    assert sorted(i for h in held(p).values() for i in h[A]) == [0, 1, 2]


def test_ties_on_creation_time_are_broken_by_name() -> None:
    claims = [claim(n, ts(5)) for n in ("charlie", "alpha", "bravo")]
    p = plan({A: 2}, {}, claims, admitting=True)
    assert p.admitted == ["alpha", "bravo"]
    assert held(p) == {"alpha": {A: (0,)}, "bravo": {A: (1,)}}
    assert p.waiting == {"charlie": "PoolFull"}


def test_creation_time_wins_over_name() -> None:
    p = plan({A: 1}, {}, [claim("a", ts(9)), claim("z", ts(1))], admitting=True)
    assert p.admitted == ["z"]
    assert p.waiting == {"a": "PoolFull"}


def test_a_claim_that_does_not_fit_does_not_block_smaller_ones() -> None:
    current: Ledger = {"h": ("uid-h", {A: (0,)})}
    claims = [claim("h", ts(0)), claim("big", ts(1), quantity=2), claim("small", ts(2))]
    p = plan({A: 2}, current, claims, admitting=True)
    assert p.waiting == {"big": "PoolFull"}
    assert p.admitted == ["small"]
    assert held(p) == {"h": {A: (0,)}, "small": {A: (1,)}}


def test_a_skipped_claim_keeps_its_place_in_line() -> None:
    # Two seats free again: the older big claim gets them before a newer small one.
    current: Ledger = {}
    claims = [claim("big", ts(1), quantity=2), claim("small", ts(2))]
    p = plan({A: 2}, current, claims, admitting=True)
    assert p.admitted == ["big"]
    assert held(p) == {"big": {A: (0, 1)}}
    assert p.waiting == {"small": "PoolFull"}


def test_multi_block_claims_hold_quantity_in_every_block_or_nothing() -> None:
    current: Ledger = {"h": ("uid-h", {E: (0, 1)})}
    claims = [claim("h", ts(0), (E,), 2),
              claim("both", ts(1), (A, E), 2),  # europe has only one seat left
              claim("asia", ts(2), (A,), 3)]
    p = plan({A: 3, E: 3}, current, claims, admitting=True)
    assert p.waiting == {"both": "PoolFull"}
    assert held(p)["asia"] == {A: (0, 1, 2)}
    assert "both" not in held(p)  # no partial holding in asia
    assert p.reserved() == {A: 3, E: 2, M: 0}

    p2 = plan({A: 3, E: 4}, {}, [claim("both", ts(1), (A, E, M), 2)], admitting=False)
    assert held(p2) == {}

    p3 = plan({A: 3, E: 4, M: 2}, {}, [claim("all", ts(1), (A, E, M), 2)], admitting=True)
    assert held(p3) == {"all": {A: (0, 1), E: (0, 1), M: (0, 1)}}
    # pledgedSlots counts seat-blocks: 2 seats x 3 blocks
    assert p3.pledged_slots() == 6


def test_lowest_free_indexes_fill_holes() -> None:
    current: Ledger = {"x": ("uid-x", {A: (0,)}), "y": ("uid-y", {A: (2,)}),
                       "z": ("uid-z", {A: (4,)})}
    claims = [claim("x"), claim("y"), claim("z"), claim("new", ts(9), quantity=2)]
    p = plan({A: 6}, current, claims, admitting=True)
    assert held(p)["new"] == {A: (1, 3)}


def test_block_not_offered() -> None:
    claims = [claim("eu", ts(1), (A, E)), claim("asia", ts(2), (A,))]
    p = plan({A: 1}, {}, claims, admitting=True)
    assert p.waiting == {"eu": "BlockNotOffered"}
    assert held(p) == {"asia": {A: (0,)}}  # the unofferable claim took nothing


def test_zero_seat_block_is_full_not_missing() -> None:
    p = plan({A: 0}, {}, [claim("a")], admitting=True)
    assert p.waiting == {"a": "PoolFull"}
    assert held(p) == {}


def test_nothing_is_admitted_while_the_pool_is_closed() -> None:
    current: Ledger = {"h": ("uid-h", {A: (0,)}), "gone": ("uid-gone", {A: (1,)})}
    claims = [claim("h", ts(0)), claim("new", ts(1))]
    p = plan({A: 5}, current, claims, admitting=False)
    assert p.admitted == []
    assert held(p) == {"h": {A: (0,)}}  # existing holdings stay
    assert p.released == ["gone"]  # and the gone still go
    assert "new" not in p.ledger


def test_ineligible_claims_are_not_admitted_and_get_no_reason() -> None:
    p = plan({A: 5}, {}, [claim("c", eligible=False)], admitting=True)
    assert held(p) == {}
    assert p.admitted == []
    assert p.waiting == {}


# -- keeping and releasing ----------------------------------------------------------------------


def test_existing_holdings_are_kept_even_ahead_of_older_waiting_claims() -> None:
    current: Ledger = {"newer": ("uid-newer", {A: (1,)})}
    claims = [claim("older", ts(1)), claim("newer", ts(5))]
    p = plan({A: 1}, current, claims, admitting=True)
    assert held(p) == {"newer": {A: (1,)}}  # not moved to index 0, not taken back
    assert p.waiting == {"older": "PoolFull"}
    assert p.released == []


def test_holdings_are_kept_when_capacity_shrinks_but_nobody_new_gets_in() -> None:
    current: Ledger = {"a": ("uid-a", {A: (0, 1, 2)})}
    p = plan({A: 1}, current, [claim("a", quantity=3), claim("b", ts(9))], admitting=True)
    assert held(p)["a"] == {A: (0, 1, 2)}
    assert p.waiting == {"b": "PoolFull"}


def test_gone_ineligible_and_replaced_holders_are_released() -> None:
    current: Ledger = {
        "gone": ("uid-gone", {A: (0,)}),
        "canceled": ("uid-canceled", {A: (1,)}),
        "replaced": ("uid-old", {A: (2,)}),
        "kept": ("uid-kept", {A: (3,)}),
    }
    claims = [
        claim("canceled", ts(1), eligible=False),
        claim("replaced", ts(2), uid="uid-new"),
        claim("kept", ts(3)),
    ]
    p = plan({A: 4}, current, claims, admitting=True)
    assert sorted(p.released) == ["canceled", "gone", "replaced"]
    # The new object that took over the name is a new claim: admitted from the freed seats,
    # under its own uid.
    assert p.admitted == ["replaced"]
    assert p.ledger["replaced"] == ("uid-new", {A: (0,)})
    assert p.ledger["kept"] == ("uid-kept", {A: (3,)})
    assert set(p.ledger) == {"replaced", "kept"}


def test_freed_seats_go_to_the_oldest_waiting_claim() -> None:
    current: Ledger = {"h": ("uid-h", {A: (0,)})}
    claims = [claim("w2", ts(3)), claim("w1", ts(2))]  # h is gone
    p = plan({A: 1}, current, claims, admitting=True)
    assert p.released == ["h"]
    assert p.admitted == ["w1"]
    assert held(p) == {"w1": {A: (0,)}}
    assert p.waiting == {"w2": "PoolFull"}


def test_plan_does_not_modify_its_inputs() -> None:
    current: Ledger = {"h": ("uid-h", {A: (0,)}), "gone": ("uid-gone", {A: (1,)})}
    snapshot = {k: (u, dict(h)) for k, (u, h) in current.items()}
    plan({A: 3}, current, [claim("h"), claim("n", ts(9))], admitting=True)
    assert current == snapshot


# -- parse / dump -------------------------------------------------------------------------------


def test_dump_and_parse_round_trip() -> None:
    ledger: Ledger = {
        "b": ("uid-b", {M: (1,), A: (0, 3)}),
        "a": ("uid-a", {E: (0, 1, 2)}),
    }
    raw = dump_ledger(ledger)
    assert raw == {
        "a": {"uid": "uid-a", "seats": {"europe": [0, 1, 2]}},
        "b": {"uid": "uid-b", "seats": {"asia": [0, 3], "americas": [1]}},
    }
    assert list(raw) == ["a", "b"]
    assert list(raw["b"]["seats"]) == ["asia", "americas"]  # type: ignore[index]
    assert parse_ledger(raw) == ledger


def test_parse_ledger_tolerates_junk_and_sorts_indexes() -> None:
    raw = {
        "ok": {"uid": "u1", "seats": {"europe": [3, 1], "mars": [0], "asia": "nope"}},
        "junk": "not a mapping",
        "noseats": {"uid": "u2"},
        "nouid": {"seats": {"americas": [0]}},
    }
    assert parse_ledger(raw) == {
        "ok": ("u1", {E: (1, 3)}),
        "noseats": ("u2", {}),
        "nouid": ("", {M: (0,)}),
    }
    assert parse_ledger(None) == {}
    assert parse_ledger({}) == {}


# -- properties ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sub:
    """One subscription of the generated world; ``uid`` changes when it is re-created."""

    name: str
    created: int
    blocks: tuple[Block, ...]
    quantity: int


blocks_st = st.sets(st.sampled_from(BLOCK_ORDER), min_size=1).map(
    lambda s: tuple(b for b in BLOCK_ORDER if b in s))
capacity_st = st.dictionaries(st.sampled_from(BLOCK_ORDER), st.integers(0, 6))
subs_st = st.lists(
    st.builds(Sub, name=st.sampled_from("abcdefghij"), created=st.integers(0, 5),
              blocks=blocks_st, quantity=st.integers(1, 4)),
    max_size=10, unique_by=lambda s: s.name)
# One step: which subscriptions exist (and whether they are eligible, or re-created under a new
# uid), whether the pool admits, and perhaps a new capacity.
step_st = st.tuples(
    st.dictionaries(st.sampled_from("abcdefghij"),
                    st.sampled_from(["eligible", "ineligible", "recreated"])),
    st.booleans(),
    st.one_of(st.none(), capacity_st),
)


def check_step(capacity: Mapping[Block, int], before: Ledger, claims: list[Claim],
               admitting: bool, p: Plan) -> None:
    by_name = {c.name: c for c in claims}
    reserved = p.reserved()
    kept = {n for n in p.ledger if n in before and before[n] == p.ledger[n]
            and n not in p.admitted}
    admitted = set(p.admitted)

    # Only admissions and keeps make up the new ledger; a kept holding is unchanged.
    assert set(p.ledger) == kept | admitted
    assert set(p.released) == set(before) - kept
    for name in kept:
        c = by_name[name]
        assert c.eligible and c.uid == before[name][0]
    # Everything held before by a present, eligible claim with the same uid is kept.
    for name, (uid, _) in before.items():
        present = by_name.get(name)
        if present is not None and present.eligible and present.uid == uid:
            assert name in kept
    if not admitting:
        assert not admitted

    # Holders hold exactly quantity seats in each of their blocks, under their own uid.
    for name, (uid, holding) in p.ledger.items():
        c = by_name[name]
        assert uid == c.uid
        assert set(holding) == set(c.blocks)
        for seats in holding.values():
            assert len(seats) == c.quantity
            assert list(seats) == sorted(seats)

    # Indexes are unique per block.
    for block in BLOCK_ORDER:
        indexes = [i for _, h in p.ledger.values() for i in h.get(block, ())]
        assert len(indexes) == len(set(indexes))
        assert reserved[block] == len(indexes)

    # Never oversold by an admission: a block anybody was admitted to is within capacity, and
    # new seats are inside the block's capacity and are the lowest free ones.
    for name in admitted:
        for block, seats in p.ledger[name][1].items():
            assert reserved[block] <= capacity[block]
            assert all(0 <= i < capacity[block] for i in seats)
            used = {i for _, h in p.ledger.values() for i in h.get(block, ())}
            assert set(range(max(seats) + 1)) <= used

    # Waiting claims: eligible, not holding, with a true reason; none of them would fit now.
    for name, reason in p.waiting.items():
        c = by_name[name]
        assert c.eligible and name not in p.ledger
        if reason == "BlockNotOffered":
            assert any(b not in capacity for b in c.blocks)
        else:
            assert reason == "PoolFull"
            assert all(b in capacity for b in c.blocks)
            assert any(capacity[b] - reserved[b] < c.quantity for b in c.blocks)
    if admitting:
        for c in claims:
            if c.eligible and c.name not in p.ledger:
                assert c.name in p.waiting


@settings(max_examples=300, deadline=None)
@given(capacity_st, subs_st, st.lists(step_st, min_size=1, max_size=8))
def test_plan_sequences_never_oversell(capacity: dict[Block, int], subs: list[Sub],
                                       steps: list[tuple[dict[str, str], bool,
                                                         dict[Block, int] | None]]) -> None:
    world = {s.name: s for s in subs}
    generation = dict.fromkeys(world, 0)
    ledger: Ledger = {}
    for present, admitting, new_capacity in steps:
        if new_capacity is not None:
            capacity = new_capacity
        claims = []
        for name, state in present.items():
            if name not in world:
                continue
            if state == "recreated":
                generation[name] += 1
            s = world[name]
            claims.append(Claim(name=name, uid=f"{name}-{generation[name]}",
                                created=f"2026-01-01T00:00:{s.created:02d}Z", blocks=s.blocks,
                                quantity=s.quantity, eligible=state != "ineligible"))
        p = plan(capacity, ledger, claims, admitting)
        check_step(capacity, ledger, claims, admitting, p)
        # The operator stores the ledger and reads it back on the next pass.
        ledger = parse_ledger(dump_ledger(p.ledger))
        assert ledger == p.ledger


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(BLOCK_ORDER), st.integers(0, 6), min_size=1), subs_st,
       st.integers(1, 6))
def test_fixed_capacity_is_never_exceeded(capacity: dict[Block, int], subs: list[Sub],
                                          rounds: int) -> None:
    """With a fixed capacity, every block's reserved seats stay within it across passes,
    whatever comes and goes, and a pass over an unchanged world changes nothing."""
    ledger: Ledger = {}
    for r in range(rounds):
        claims = [Claim(name=s.name, uid=f"{s.name}-u",
                        created=f"2026-01-01T00:00:{s.created:02d}Z", blocks=s.blocks,
                        quantity=s.quantity, eligible=(ord(s.name) + r) % 3 != 0)
                  for s in subs]
        p = plan(capacity, ledger, claims, admitting=True)
        for block, n in p.reserved().items():
            assert n <= capacity.get(block, 0)
        again = plan(capacity, p.ledger, claims, admitting=True)
        assert again.ledger == p.ledger
        assert again.admitted == [] and again.released == []
        ledger = p.ledger
