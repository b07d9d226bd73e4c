"""Reconcile one Subscription: accept it, follow its seats through pledge and activation, charge
each step once, keep its key and gate right. Each pass starts from the object as stored."""

from __future__ import annotations

import asyncio
import calendar
import logging
from collections.abc import Awaitable
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from gpupool import events, keys, ledger, names
from gpupool.billing_port import Outcome
from gpupool.blocks import Block, normalize_blocks
from gpupool.conditions import get_condition, iso, set_condition
from gpupool.gate import gate_state, next_gate_change
from gpupool.kube import Conflict
from gpupool.models import (
    PoolSpec,
    SubscriptionSpec,
    describe_validation_error,
    parse_pool_spec,
    parse_subscription_spec,
)
from gpupool.ownership import Owner, is_child, owner_ref
from gpupool.pool_service import ACCEPTED, spec_readable
from gpupool.pricing import cycle_amount, format_money, hour_slots, monthly_price, slot_count
from gpupool.workqueue import RetryLater
from gpupool.world import pool_ref_of

if TYPE_CHECKING:
    from gpupool.controller import Controller

log = logging.getLogger(__name__)
Obj = dict[str, Any]

HOLDING_PHASES = ("pledged", "pending_key", "active", "past_due")
NO_PAYMENT_METHOD = "No payment method found — add a card first"
PAYMENT_METHOD_RECHECK = 30.0
RESERVATION_DUE = "ReservationFeeDue"
RESERVATION_RETRY = 300.0
POOL_SPEC_VALID = "PoolSpecValid"
FRESH_SECONDS = 60.0
"""How long at most a new subscription waits for its pool's pass before saying it is pending."""
NOTE_RANK = {"KeyIssued": 0, "KeyRotated": 0, "KeyRevoked": 0, "PhaseChanged": 1}
"""Which reason names a pass's one Event when several things happened (lowest first)."""


def add_months(at: datetime, months: int) -> datetime:
    month = at.month - 1 + months
    year = at.year + month // 12
    month = month % 12 + 1
    day = min(at.day, calendar.monthrange(year, month)[1])
    return at.replace(year=year, month=month, day=day)


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class Pass:
    """One reconcile of one Subscription: reads, decisions and the status it will write."""

    def __init__(self, ctl: Controller, sub: Obj) -> None:
        self.ctl = ctl
        self.sub = sub
        self.meta = sub["metadata"]
        self.ns: str = self.meta["namespace"]
        self.name: str = self.meta["name"]
        self.gen = self.meta.get("generation")
        self.old: Obj = dict(sub.get("status") or {})
        self.status: Obj = dict(self.old)
        self.status.setdefault("billing", {})
        self.status["billing"] = dict(self.status["billing"])
        self.now = ctl.clock()
        self.again: float | None = None
        self.notes: list[tuple[str, str, str]] = []
        self.defer = False
        """Write nothing this pass: the pool's next pass decides and wakes this one again."""

    # -- status helpers ------------------------------------------------------------------------
    def cond(self, type_: str, ok: bool, reason: str, message: str) -> None:
        self.status["conditions"] = set_condition(self.status.get("conditions"), type_, ok,
                                                  reason, message, self.gen, self.now)

    def wake(self, seconds: float) -> None:
        self.again = seconds if self.again is None else min(self.again, seconds)

    def note(self, reason: str, message: str, type_: str = "Normal") -> None:
        """Something worth an Event happened; one Event per pass says all of it (save)."""
        self.notes.append((reason, message, type_))

    async def save(self) -> None:
        if self.defer:
            return
        self.status["observedGeneration"] = self.gen
        patch = {k: v for k, v in self.status.items() if self.old.get(k) != v}
        patch.update({k: None for k in self.old if k not in self.status})
        before, after = self.old.get("phase"), self.status.get("phase")
        if before != after:
            log.info("subscription %s/%s: %s -> %s", self.ns, self.name, before, after)
            self.notes.insert(0, ("PhaseChanged", f"{before} -> {after}", "Normal"))
            self.ctl.metrics.transition(after or "")

        async def write() -> None:
            if patch:
                self.ctl.world.wrote(await self.ctl.kube.patch_status(
                    "subscriptions", self.ns, self.name, patch))

        # The Event goes out alongside the status write, not after it: a key issued is said
        # once the Secret holds it, whichever of the two a crash cuts short.
        await asyncio.gather(write(), self._post_notes())

    async def _post_notes(self) -> None:
        if not self.notes:
            return
        warnings = [n for n in self.notes if n[2] == "Warning"]
        reason, _, type_ = warnings[0] if warnings else min(
            self.notes, key=lambda n: NOTE_RANK.get(n[0], len(NOTE_RANK)))
        await events.post(self.ctl.kube, self.sub, reason,
                          "; ".join(message for _, message, _ in self.notes), type_)

    def set_pending(self, reason: str, message: str) -> None:
        self.status["phase"] = "pending"
        self.cond("SeatsHeld", False, reason, message)


async def _read(ctl: Controller, kind: str, plural: str, key: tuple[str, str]) -> Obj | None:
    """The subscription or its pool as this pass starts from.

    With billing on, from the API server: a step that moves money must see the step recorded
    last. Off, the world's copy (the watch's, or this operator's own last write, whichever is
    newer) serves: the pool's ledger was written by this process, and the watch brings the rest.
    """
    if not ctl.billing.enabled:
        cached = ctl.world.latest(kind, key)
        if cached is not None:
            return cached
    obj = await ctl.kube.get_custom(plural, *key)
    ctl.world.wrote(obj)
    return obj


async def reconcile_subscription(ctl: Controller, key: tuple[str, str]) -> float | None:
    sub = await _read(ctl, "Subscription", "subscriptions", key)
    if sub is None:
        await _drop_orphaned_key(ctl, key)
        return None
    if sub["metadata"].get("deletionTimestamp"):
        await _finalize(ctl, sub)
        return None
    sub = await _hold_finalizer(ctl, sub)
    p = Pass(ctl, sub)
    try:
        spec = parse_subscription_spec(sub.get("spec") or {})
    except (ValidationError, ValueError) as exc:
        p.set_pending("InvalidSpec", describe_validation_error(exc))
        p.cond(ACCEPTED, False, "InvalidSpec", describe_validation_error(exc))
        await p.save()
        return None
    if p.status.get("phase") == "canceled":
        await _drop_key(p)
        await p.save()
        return None

    pinned = p.status.get("pool")
    pool_ns = p.ns if pinned else (spec.pool_ref.namespace or p.ns)
    if pool_ns != p.ns:
        msg = (f"spec.poolRef.namespace: pool {pool_ns}/{spec.pool_ref.name} is in another "
               f"namespace; subscriptions may only use pools in {p.ns}")
        p.set_pending("PoolInOtherNamespace", msg)
        p.cond(ACCEPTED, False, "PoolInOtherNamespace", msg)
        await p.save()
        return None
    pool_name = pinned or spec.pool_ref.name
    spec = _held_terms(p, spec)
    pool = await _read(ctl, "Pool", "pools", (p.ns, pool_name))
    await _run(p, spec, pool)
    await p.save()
    return p.again


async def _hold_finalizer(ctl: Controller, sub: Obj) -> Obj:
    """Deleting a Subscription cancels it: the finalizer is in place before its first seat,
    key or Stripe step, so that once the object is gone, all of that is undone."""
    meta = sub["metadata"]
    held = list(meta.get("finalizers") or [])
    if names.SUBSCRIPTION_FINALIZER in held:
        return sub
    patched = await ctl.kube.patch_custom(
        "subscriptions", meta["namespace"], meta["name"],
        {"metadata": {"finalizers": [*held, names.SUBSCRIPTION_FINALIZER],
                      "resourceVersion": meta["resourceVersion"]}})
    if patched is None:
        raise RetryLater(1, "gone while adding the finalizer")
    ctl.world.wrote(patched)
    return patched


async def _finalize(ctl: Controller, sub: Obj) -> None:
    """Deleting a Subscription cancels it at once: billing stops, the key goes, seats free up;
    then the finalizer comes off."""
    meta = sub["metadata"]
    ns, name = meta["namespace"], meta["name"]
    held = list(meta.get("finalizers") or [])
    if names.SUBSCRIPTION_FINALIZER not in held:
        await _delete_key_secret(ctl, name, await _read_key_secret(ctl, ns, name))
        return
    status = sub.get("status") or {}
    billing = status.get("billing") or {}
    if billing.get("subscriptionId") and ctl.billing.enabled \
            and billing.get("status") != "canceled":
        await ctl.billing.cancel_now(billing["subscriptionId"])
        ctl.world.wrote(await ctl.kube.patch_status("subscriptions", ns, name,
                                                    {"billing": {"status": "canceled"}}))
    await _delete_key_secret(ctl, name, await _read_key_secret(ctl, ns, name))
    pool_key = pool_ref_of(sub)
    pool = await ctl.kube.get_custom("pools", *pool_key)
    holder = ledger.parse_ledger(((pool or {}).get("status") or {}).get("ledger")).get(name)
    # A pool whose spec cannot be read cannot write its ledger either; it releases the seats of
    # a subscription that is gone once it is fixed, so the deletion need not wait for that.
    if holder is not None and holder[0] == meta.get("uid") and spec_readable(pool):
        ctl.pools.add(pool_key)
        raise RetryLater(1, "waiting for the pool to release the seats")
    await ctl.kube.patch_custom("subscriptions", ns, name, {"metadata": {
        "finalizers": [f for f in held if f != names.SUBSCRIPTION_FINALIZER],
        "resourceVersion": meta["resourceVersion"]}})
    ctl.open_keys.add(pool_key)


async def _drop_orphaned_key(ctl: Controller, key: tuple[str, str]) -> None:
    """The subscription is gone (the API server says so): the key Secret made for it goes too,
    at once, rather than whenever garbage collection gets to it."""
    await _delete_key_secret(ctl, key[1],
                             ctl.world.key_secrets.get((key[0], names.key_secret_name(key[1]))))


async def _read_key_secret(ctl: Controller, ns: str, sub_name: str) -> Obj | None:
    secret = names.key_secret_name(sub_name)
    return ctl.world.latest("Secret", (ns, secret)) or await ctl.kube.get("secrets", ns, secret)


async def _delete_key_secret(ctl: Controller, sub_name: str, secret: Obj | None) -> bool:
    """Delete ``secret`` if it is the key Secret made for the subscription ``sub_name``; one
    that only bears the name or the labels (made by hand, or by another tool) is left alone."""
    if secret is None or keys.owned_by_subscription(secret) != sub_name:
        return False
    ns, name = secret["metadata"]["namespace"], secret["metadata"]["name"]
    await ctl.kube.delete("secrets", ns, name)
    ctl.world.forget("Secret", (ns, name))
    return True


def _held_terms(p: Pass, spec: SubscriptionSpec) -> SubscriptionSpec:
    """Once seats are held, the pool, blocks and quantity they were bought with stay in force;
    a spec that tries to change them gets a condition saying so."""
    pool, held_blocks = p.status.get("pool"), p.status.get("heldBlocks")
    if not pool or not held_blocks:
        p.status["conditions"] = [c for c in p.status.get("conditions") or []
                                  if c.get("type") != "SpecLocked"]
        return spec
    held_qty = int(p.status.get("heldQuantity") or spec.quantity)
    changed = []
    if spec.pool_ref.name != pool or (spec.pool_ref.namespace or p.ns) != p.ns:
        changed.append(f"spec.poolRef (held in pool {pool})")
    if set(spec.normalized_blocks()) != set(normalize_blocks(held_blocks)):
        changed.append(f"spec.blocks (held: {', '.join(held_blocks)})")
    if spec.quantity != held_qty:
        changed.append(f"spec.quantity (held: {held_qty})")
    if changed:
        p.cond("SpecLocked", False, "ImmutableAfterSeatsHeld",
               f"{'; '.join(changed)} cannot change once seats are held; the held terms stay "
               "in force. Cancel and subscribe again to change them.")
    else:
        p.status["conditions"] = [c for c in p.status.get("conditions") or []
                                  if c.get("type") != "SpecLocked"]
    return spec.model_copy(update={
        "pool_ref": spec.pool_ref.model_copy(update={"name": pool, "namespace": None}),
        "blocks": list(held_blocks), "quantity": held_qty})


async def _run(p: Pass, spec: SubscriptionSpec, pool: Obj | None) -> None:
    blocks = spec.normalized_blocks()
    p.status["blocks"] = [b.value for b in blocks]
    p.status["billingCycle"] = spec.billing_cycle
    holding = _holding(p, pool)

    if pool is None:
        await _lose_seats(p, "PoolNotFound", f"spec.poolRef.name: pool {spec.pool_ref.name} "
                          f"does not exist in namespace {p.ns}")
        return
    try:
        pool_spec = parse_pool_spec(pool.get("spec") or {})
    except (ValidationError, ValueError):
        message = f"pool {spec.pool_ref.name} has an invalid spec; see its Ready condition"
        if holding is not None:
            # Its workload runs on as it was and its ledger stands: what was bought stays as it
            # is (seats, key, gate, phase) until the spec is fixed; the status says why nothing
            # moves meanwhile.
            p.cond(POOL_SPEC_VALID, False, "PoolInvalid", f"{message}; the seats, key and gate "
                   "held stay as they are until it is fixed")
            return
        await _lose_seats(p, "PoolInvalid", message)
        return
    p.status["conditions"] = [c for c in p.status.get("conditions") or []
                              if c.get("type") != POOL_SPEC_VALID]
    _prices(p, spec, pool_spec, blocks, holding)
    pool_phase = (pool.get("status") or {}).get("phase") or "draft"
    activated = bool((pool.get("status") or {}).get("activatedAt"))

    if holding is None:
        await _not_holding(p, spec, pool_spec, pool, blocks)
        return
    p.cond("SeatsHeld", True, "SeatsHeld", f"{spec.quantity} seat(s) in "
           f"{', '.join(b.value for b in blocks)}")
    accepted = get_condition(p.status.get("conditions"), ACCEPTED)
    if not accepted or accepted.get("status") != "True":
        p.cond(ACCEPTED, True, "Accepted", "seats held")
    p.status["pool"] = spec.pool_ref.name
    p.status["heldBlocks"] = [b.value for b in blocks]
    p.status["heldQuantity"] = spec.quantity
    if not activated:
        await _pledge_step(p, spec, pool_spec)
        return
    if not spec.cancel_at_period_end and _pledged_before_activation(p) \
            and not await _charge_reservation(p, spec, pool_spec):
        return
    await _activation_step(p, spec, pool_spec, pool, pool_phase, blocks)


def _holding(p: Pass, pool: Obj | None) -> ledger.Holding | None:
    if pool is None:
        return None
    # This subscription's entry alone: a pool's ledger has one per holder.
    raw = ((pool.get("status") or {}).get("ledger") or {}).get(p.name)
    entry = ledger.parse_ledger({p.name: raw}).get(p.name) if raw is not None else None
    if entry is None or entry[0] != p.meta.get("uid"):
        return None
    return entry[1]


def _prices(p: Pass, spec: SubscriptionSpec, pool_spec: PoolSpec, blocks: tuple[Block, ...],
            holding: ledger.Holding | None) -> None:
    prices = pool_spec.prices()
    if any(b not in prices for b in blocks):
        return
    monthly = monthly_price(prices, blocks, spec.quantity)
    p.status["monthlyPrice"] = format_money(monthly)
    p.status["amount"] = format_money(cycle_amount(monthly, spec.billing_cycle,
                                                   pool_spec.annual_discount_decimal))
    p.status["currency"] = pool_spec.currency
    p.status["slotCount"] = slot_count(blocks, spec.quantity)
    slots: list[dict[str, object]] = []
    for block, seats in sorted((holding or {}).items(), key=lambda kv: kv[0].start_hour):
        for seat in seats:
            slots.extend(s.to_status() for s in hour_slots(block, seat, prices[block]))
    slots.sort(key=lambda s: (int(str(s["hour"])), int(str(s["slotIndex"]))))
    p.status["slots"] = slots


def _unpin(p: Pass) -> None:
    for field in ("pool", "heldBlocks", "heldQuantity"):
        p.status.pop(field, None)


async def _lose_seats(p: Pass, reason: str, message: str) -> None:
    _unpin(p)
    if p.status.get("phase") in HOLDING_PHASES:
        p.note(reason, message, "Warning")
    p.set_pending(reason, message)
    p.cond(ACCEPTED, False, reason, message)
    p.status["slots"] = []
    await _drop_key(p)


async def _not_holding(p: Pass, spec: SubscriptionSpec, pool_spec: PoolSpec, pool: Obj,
                       blocks: tuple[Block, ...]) -> None:
    if spec.cancel_at_period_end:
        await _cancel(p, "CanceledBeforeSeats", "canceled before it held seats")
        return
    _unpin(p)
    if p.status.get("phase") in HOLDING_PHASES:
        # It held seats and the ledger no longer says so (the pool was re-created, say).
        p.note("SeatsLost", "the pool's ledger no longer lists this subscription; waiting "
               "for seats again", "Warning")
        await _drop_key(p)
    p.status["slots"] = []
    if not pool_spec.published:
        p.set_pending("PoolNotPublished", f"pool {spec.pool_ref.name} is not published (draft)")
        return
    if pool_spec.paused:
        p.set_pending("PoolPaused", f"pool {spec.pool_ref.name} is paused")
        return
    capacity = pool_spec.capacity()
    missing = [b.value for b in blocks if b not in capacity]
    if missing:
        msg = f"spec.blocks: pool {spec.pool_ref.name} does not sell {', '.join(missing)}"
        p.set_pending("BlockNotOffered", msg)
        p.cond(ACCEPTED, False, "BlockNotOffered", msg)
        return
    if _declined_recently(p):
        return
    if not await _payment_method(p, spec):
        return
    was_accepted = get_condition(p.status.get("conditions"), ACCEPTED)
    reserved = (pool.get("status") or {}).get("seats") or {}
    full = [b.value for b in blocks
            if capacity[b] - int((reserved.get(b.value) or {}).get("reserved", 0)) < spec.quantity]
    if not full and not p.old.get("phase") and not p.ctl.billing.enabled:
        # A new subscription the pool has room for: with billing off the pool seats it without
        # waiting for an Accepted condition, and wakes it once it has (or once it knows why it
        # cannot). Saying "pending" while the pool's pass is on its way would be one more write
        # and Event per subscription, overwritten within a second or so.
        age = p.ctl.world.sub_age((p.ns, p.name))
        if age < FRESH_SECONDS and p.ctl.pools.pending((p.ns, spec.pool_ref.name)):
            p.defer = True
            p.wake(FRESH_SECONDS - age)
            return
    if full and was_accepted and was_accepted.get("status") == "True":
        p.set_pending("PoolFull", f"no {spec.quantity} free seat(s) in {', '.join(full)}; "
                      "waiting in line (oldest first)")
    else:
        p.set_pending("Queued", "waiting for the pool to assign seats")
    p.cond(ACCEPTED, True, "Accepted", "waiting for seats")
    _note_reservation_due(p, pool)


def _declined_recently(p: Pass) -> bool:
    """Wait RESERVATION_RETRY after a declined reservation fee before asking for seats again.

    The decline gave the seats up. Asking again at once (the status write that recorded the
    decline starts the next pass) would be accepted, admitted and declined on the same card in
    a tight loop of Stripe and API calls."""
    conds = p.status.get("conditions")
    charged, accepted = get_condition(conds, "Charged"), get_condition(conds, ACCEPTED)
    if not charged or charged.get("reason") != "ReservationDeclined" \
            or not accepted or accepted.get("status") != "False":
        return False
    since = parse_time(accepted.get("lastTransitionTime"))
    left = RESERVATION_RETRY - (p.now - since).total_seconds() if since else 0.0
    if left <= 0:
        return False
    p.set_pending("ReservationDeclined", str(charged.get("message") or "payment declined"))
    p.wake(left)
    return True


async def _payment_method(p: Pass, spec: SubscriptionSpec) -> bool:
    billing = p.ctl.billing
    if not billing.enabled:
        return True
    if await billing.has_payment_method(spec.customer.id):
        return True
    p.set_pending("NoPaymentMethod", NO_PAYMENT_METHOD)
    p.cond(ACCEPTED, False, "NoPaymentMethod", NO_PAYMENT_METHOD)
    p.wake(PAYMENT_METHOD_RECHECK)
    return False


async def _cancel(p: Pass, reason: str, message: str) -> None:
    _unpin(p)
    p.status["phase"] = "canceled"
    p.status["canceledAt"] = iso(p.now)
    p.status["slots"] = []
    p.cond(ACCEPTED, False, "Canceled", message)
    p.cond("SeatsHeld", False, reason, message)
    await _drop_key(p)


async def _pledge_step(p: Pass, spec: SubscriptionSpec, pool_spec: PoolSpec) -> None:
    if spec.cancel_at_period_end:
        await _cancel(p, "PledgeCanceled", "pledge canceled; seats freed, the reservation fee "
                      "is not refunded")
        return
    if not await _charge_reservation(p, spec, pool_spec):
        return
    p.status["phase"] = "pledged"
    p.cond("Charged", True, "ReservationFeePaid", "reservation fee charged; waiting for the "
           "pool to activate")


async def _charge_reservation(p: Pass, spec: SubscriptionSpec, pool_spec: PoolSpec) -> bool:
    """The reservation fee, once. False when it is declined (the seats are given up)."""
    billing = p.status["billing"]
    if billing.get("reservationCharged"):
        return True
    outcome = await p.ctl.billing.charge_reservation(
        p.meta["uid"], spec.customer.id, Decimal(pool_spec.reservation_fee),
        pool_spec.currency, f"gpupool reservation fee: {p.ns}/{spec.pool_ref.name}")
    if not outcome.ok:
        p.cond("Charged", False, "ReservationDeclined", outcome.reason or "declined")
        await _lose_seats(p, "ReservationDeclined", outcome.reason or "payment declined")
        p.wake(RESERVATION_RETRY)
        return False
    billing["reservationCharged"] = True
    if outcome.id:
        billing["reservationPaymentIntentId"] = outcome.id
    billing["customerId"] = spec.customer.id
    return True


def _note_reservation_due(p: Pass, pool: Obj) -> None:
    """Seats asked for while the pool is not active yet will be a pledge: record that its fee
    is due (a ``Charged`` condition), so that it is charged even when the pool activates before
    this subscription's pledge step has run. Still waiting once the pool is active: no pledge."""
    charged = get_condition(p.status.get("conditions"), "Charged")
    if (pool.get("status") or {}).get("activatedAt"):
        if charged and charged.get("reason") == RESERVATION_DUE:
            p.status["conditions"] = [c for c in p.status.get("conditions") or []
                                      if c.get("type") != "Charged"]
    elif charged is None:
        p.cond("Charged", False, RESERVATION_DUE, "the reservation fee is charged once the "
               "pool holds seats for this subscription")


def _pledged_before_activation(p: Pass) -> bool:
    """Whether seats held in a pool that is now activated still owe the reservation fee.

    The pool admits a subscription as soon as it is accepted and activates as soon as its
    workload is Available: on a fast cluster within a second of the pledge that reached the
    threshold, or while this subscription's fee step was held up by a crash or a Stripe outage.
    Its next pass then finds the pool activated and would skip the pledge step; the fee noted as
    due when it was accepted (``_note_reservation_due``) is charged before activation instead.
    """
    billing = p.status["billing"]
    if billing.get("reservationCharged") or billing.get("subscriptionId") \
            or p.old.get("phase") in ("active", "pending_key", "past_due"):
        return False
    charged = get_condition(p.old.get("conditions"), "Charged")
    return bool(charged and charged.get("reason") == RESERVATION_DUE)


async def _activation_step(p: Pass, spec: SubscriptionSpec, pool_spec: PoolSpec, pool: Obj,
                           pool_phase: str, blocks: tuple[Block, ...]) -> None:
    billing = p.status["billing"]
    ctl = p.ctl
    if spec.cancel_at_period_end and not billing.get("subscriptionId") \
            and p.status.get("phase") not in ("active", "past_due", "pending_key"):
        await _cancel(p, "PledgeCanceled", "canceled before the first charge")
        return

    def subscribe() -> Awaitable[Outcome]:
        """The one Stripe subscription of this Subscription, made if there is none."""
        return ctl.billing.ensure_subscription(
            p.meta["uid"], spec.customer.id, f"{p.ns}/{spec.pool_ref.name}",
            Decimal(p.status["amount"]), pool_spec.currency, spec.billing_cycle,
            f"gpupool {spec.pool_ref.name}: {spec.quantity} seat(s) in "
            f"{', '.join(b.value for b in blocks)}")

    outcome = None
    if ctl.billing.enabled and not billing.get("subscriptionId"):
        outcome = await subscribe()
        if outcome.id:
            billing["subscriptionId"] = outcome.id
            billing["customerId"] = spec.customer.id
    elif ctl.billing.enabled:
        outcome = await ctl.billing.fetch_subscription(billing["subscriptionId"])
        if outcome.status == "incomplete":
            # The first payment was declined. Asked again, Stripe pays the open first invoice
            # once with a new default card, and says the same decline for the same card.
            retried = await subscribe()
            if retried.id == billing["subscriptionId"]:
                outcome = retried
        elif outcome.status == "past_due":
            # A renewal was declined: a new default card pays it now, not at Stripe's next retry.
            outcome = await ctl.billing.retry_past_due(billing["subscriptionId"],
                                                       spec.customer.id, p.meta["uid"])
    if outcome is not None:
        if outcome.status:
            billing["status"] = outcome.status
        elif not outcome.ok:
            billing["status"] = "unpaid"
        if outcome.current_period_end:
            p.status["currentPeriodEnd"] = iso(outcome.current_period_end)
        if not outcome.ok:
            p.cond("Charged", False, "PaymentFailed", outcome.reason or "payment failed")
            p.wake(300)
    else:
        _rolling_period(p, spec, pool)

    stripe_status = billing.get("status") or "active"
    if stripe_status in ("canceled", "incomplete_expired"):
        await _cancel(p, "StripeCanceled", "the Stripe subscription ended")
        return
    if spec.cancel_at_period_end:
        await _schedule_cancel(p, billing)
        if p.status.get("phase") == "canceled":
            return
    if stripe_status not in ("active", "trialing"):
        # A re-fetched subscription carries no decline message: keep the one recorded when the
        # payment failed rather than replace it with a generic line on the next pass.
        earlier = get_condition(p.old.get("conditions"), "Charged") or {}
        kept = (str(earlier["message"]) if earlier.get("status") == "False"
                and earlier.get("reason") == "PaymentFailed" and earlier.get("message") else None)
        reason = (outcome.reason if outcome and outcome.reason else
                  kept or f"payment failed (Stripe status {stripe_status})")
        p.status["phase"] = "past_due"
        p.cond("Charged", False, "PaymentFailed", reason)
        # Close (never mint) the key: a failed first charge has none, a renewal failure has one.
        await _ensure_key(p, spec, pool_spec, pool_phase, blocks, mint=False)
        return
    p.cond("Charged", True, "Paid", f"{p.status.get('amount')} {pool_spec.currency} per "
           f"{spec.billing_cycle}")
    approved = p.meta.get("annotations", {}).get(names.ANNOTATION_APPROVED) == "true"
    if pool_spec.manual_provisioning and not approved and not p.status.get("keySecretName"):
        p.status["phase"] = "pending_key"
        p.cond("KeyIssued", False, "AwaitingApproval", "manual provisioning: annotate "
               f"{names.ANNOTATION_APPROVED}=true to issue the key")
        return
    p.status["phase"] = "active"
    await _ensure_key(p, spec, pool_spec, pool_phase, blocks, mint=True)


def _rolling_period(p: Pass, spec: SubscriptionSpec, pool: Obj) -> None:
    """Billing off: periods run from activation and renew until canceled."""
    start = parse_time(p.status.get("currentPeriodEnd"))
    if start is None:
        start = add_months(p.now, 12 if spec.billing_cycle == "year" else 1)
    while start <= p.now and not spec.cancel_at_period_end:
        start = add_months(start, 12 if spec.billing_cycle == "year" else 1)
    p.status["currentPeriodEnd"] = iso(start)


async def _schedule_cancel(p: Pass, billing: Obj) -> None:
    if p.ctl.billing.enabled and billing.get("subscriptionId") \
            and not billing.get("cancelAtPeriodEnd"):
        await p.ctl.billing.set_cancel_at_period_end(billing["subscriptionId"], True)
        billing["cancelAtPeriodEnd"] = True
    end = parse_time(p.status.get("currentPeriodEnd"))
    if end is None or end <= p.now:
        await _cancel(p, "PeriodEnded", "canceled at the end of the paid period; no refund")
        return
    p.cond("CancelScheduled", True, "CancelAtPeriodEnd",
           f"the key works until {iso(end)}, then the subscription ends")
    p.wake((end - p.now).total_seconds() + 0.5)


async def _ensure_key(p: Pass, spec: SubscriptionSpec, pool_spec: PoolSpec, pool_phase: str,
                      blocks: tuple[Block, ...], *, mint: bool) -> None:
    ctl = p.ctl
    secret_name = names.key_secret_name(p.name)
    # The key is read back, never minted twice: from the watch (or this process's own write),
    # else from the API server. A first key is created without a read: if an earlier pass
    # (cut short before its status write) stored one, the create conflicts and that one stands.
    current = await _key_secret(p, secret_name)
    if current is None and not mint:
        p.status["gate"] = "closed"
        return
    rotation = p.meta.get("annotations", {}).get(names.ANNOTATION_ROTATE, "")
    phase = p.status["phase"]
    gate = gate_state(phase, pool_phase, blocks, p.now)
    while True:
        if current is not None and not is_child(current, Owner.subscription(p.name)):
            # Someone else's: not ours to use or replace.
            p.status["gate"] = "closed"
            if mint:
                p.status["phase"] = "pending_key"
                p.cond("KeyIssued", False, "SecretNameTaken",
                       f"Secret {secret_name} exists and was not made for this subscription; "
                       "the key is issued once it is deleted")
                p.wake(30)
            return
        # A key made for an earlier subscription of the same name is never handed on.
        ours = current is not None and \
            (owner_ref(current, "Subscription") or {}).get("uid") == p.meta["uid"]
        existing = keys.decode((current or {}).get("data")) if ours else {}
        rotated = ours and existing.get("rotation", "") != rotation
        api_key = existing.get("apiKey") if ours and not rotated else None
        generation = int(existing.get("keyGeneration", "0")) + (1 if rotated else 0)
        minted = api_key is None
        kid = keys.key_id(p.meta["uid"], generation)
        data = keys.key_secret_data(
            api_key=api_key or keys.mint_key(), kid=kid, pool=spec.pool_ref.name,
            subscription=p.name, customer_id=spec.customer.id, blocks=blocks,
            limits=pool_spec.limits,
            upstream=names.upstream_url(spec.pool_ref.name, p.ns, pool_spec.runtime.port),
            served_model_name=pool_spec.model.id, sub_phase=phase, pool_phase=pool_phase)
        data["rotation"] = rotation
        data["keyGeneration"] = str(generation)
        body = keys.build_key_secret(
            namespace=p.ns, subscription=p.name, subscription_uid=p.meta["uid"],
            pool=spec.pool_ref.name, gate=gate, data=data)
        if current is not None:
            ctl.world.wrote(await ctl.kube.ensure("secrets", body,
                                                  compare=("data", "metadata.labels",
                                                           "metadata.ownerReferences"),
                                                  current=current, read=False))
            break
        try:
            ctl.world.wrote(await ctl.kube.create("secrets", p.ns, body))
            break
        except Conflict:
            current = await ctl.kube.get("secrets", p.ns, secret_name)
    if minted:
        # Said once the Secret holds it: a pass cut short before that mints again, unsaid.
        p.note("KeyRotated" if rotated else "KeyIssued", f"API key issued in Secret {secret_name}")
    p.status["keySecretName"] = secret_name
    p.status["keyId"] = kid
    p.cond("KeyIssued", True, "KeyIssued", f"Secret {secret_name}")
    await ctl.gates.record_gate(p, gate, phase, pool_phase, blocks)


async def _key_secret(p: Pass, secret_name: str) -> Obj | None:
    """The subscription's key Secret as known here; read from the API server only when the
    status says a key was issued and the watch has not delivered it (right after a start)."""
    current = p.ctl.world.latest("Secret", (p.ns, secret_name))
    if current is None and p.old.get("keySecretName"):
        current = await p.ctl.kube.get("secrets", p.ns, secret_name)
    return current


async def _drop_key(p: Pass) -> None:
    secret_name = p.status.get("keySecretName") or names.key_secret_name(p.name)
    if await _delete_key_secret(p.ctl, p.name, await _key_secret(p, secret_name)):
        p.note("KeyRevoked", f"Secret {secret_name} deleted")
    p.status.pop("keySecretName", None)
    p.status.pop("keyId", None)
    p.status["gate"] = "closed"
    p.status.pop("nextGateChangeAt", None)


def gate_fields(gate: str, sub_phase: str, pool_phase: str, blocks: tuple[Block, ...],
                now: datetime, old: Obj) -> Obj:
    """The status fields describing the gate; gateChangedAt moves only when the gate does."""
    nxt = next_gate_change(sub_phase, pool_phase, blocks, now)
    out: Obj = {"gate": gate, "nextGateChangeAt": iso(nxt) if nxt else None}
    out["gateChangedAt"] = iso(now) if old.get("gate") != gate else old.get("gateChangedAt")
    return out


__all__ = ["RetryLater", "gate_fields", "reconcile_subscription"]
