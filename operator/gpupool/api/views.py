"""Pools, Subscriptions and key Secrets as the seeds' JSON; request checks; the operator's decision.

Pure functions of the objects read from the API server (no I/O), unit-tested without a cluster.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from gpupool import keys, ledger, names
from gpupool.blocks import ACCEPTED_NAMES, BLOCK_ORDER, Block, parse_block
from gpupool.conditions import get_condition
from gpupool.models import PoolSpec, parse_pool_spec, parse_subscription_spec
from gpupool.pricing import format_money, hourly_split, min_price, monthly_price, slot_count
from gpupool.subscription_service import NO_PAYMENT_METHOD

Obj = dict[str, Any]

# Annotations the API writes on the Subscriptions it creates.
ANNOTATION_KEY_DELIVERY = f"{names.PREFIX}/key-delivery"
"""``on-request``: the key is shown only after ``POST /api/keys/subscription`` (the seeds'
Unlimited flow); absent or ``automatic``: shown as soon as the operator issues it."""
ANNOTATION_KEY_REQUESTED = f"{names.PREFIX}/key-requested-at"
"""When the customer asked for the key (``POST /api/keys/subscription``)."""
ANNOTATION_REQUESTED_AT = f"{names.PREFIX}/requested-at"
"""When the API created it, to the microsecond (creationTimestamp has whole seconds)."""
ANNOTATION_MGMT_KEY = f"{names.PREFIX}/management-key-id"
"""The public id of the management key that created it."""
DELIVERY_ON_REQUEST = "on-request"
DELIVERY_AUTOMATIC = "automatic"
LABEL_CREATED_BY = "app.kubernetes.io/created-by"
CREATED_BY = "gpupool-api"

HOLDING = ("pledged", "pending_key", "active", "past_due")
SLOT_NAMESPACE = uuid.UUID("5d1b8f4e-6a8e-4a35-9a57-0f6f2b0c9e11")

MIN_QUANTITY, MAX_QUANTITY = 1, 20
BILLING_CYCLES = ("month", "year")


class BadRequest(ValueError):
    """A request the seeds' API refuses with 400 and this message."""


# -- small formats ------------------------------------------------------------------------------

def money(value: str | Decimal | None) -> str | None:
    if value is None or value == "":
        return None
    return format_money(Decimal(value))


def js_time(value: str | None) -> str | None:
    """An RFC 3339 UTC time as the seeds write it: ``2026-05-04T00:00:00.000Z``."""
    if not value:
        return None
    at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def fraction(value: str) -> float:
    """The seeds write ``annualDiscount`` as a JSON number (0.15); the CR keeps the string."""
    return float(Decimal(value))


def is_uuid(ref: str) -> bool:
    try:
        return str(uuid.UUID(ref)) == ref.lower()
    except ValueError:
        return False


# -- pools ---------------------------------------------------------------------------------------

def pool_spec(pool: Obj) -> PoolSpec | None:
    try:
        return parse_pool_spec(pool.get("spec") or {})
    except (ValidationError, ValueError):
        return None


def pool_phase(pool: Obj) -> str:
    return str((pool.get("status") or {}).get("phase") or "draft")


def pool_visible(pool: Obj) -> bool:
    """Listed and sold: published, reconciled out of draft, with a spec the operator accepts."""
    spec = pool_spec(pool)
    if spec is None or not spec.published or pool_phase(pool) == "draft":
        return False
    return not pool["metadata"].get("deletionTimestamp")


def _held(pool: Obj) -> dict[Block, set[int]]:
    out: dict[Block, set[int]] = {b: set() for b in BLOCK_ORDER}
    for _, holding in ledger.parse_ledger((pool.get("status") or {}).get("ledger")).values():
        for block, seats in holding.items():
            out[block].update(seats)
    return out


def capacity(pool: Obj, spec: PoolSpec) -> dict[Block, int]:
    return spec.capacity()


def free_seats(pool: Obj, spec: PoolSpec) -> dict[Block, int]:
    held = _held(pool)
    return {b: max(0, c - len({i for i in held[b] if i < c})) for b, c in
            capacity(pool, spec).items()}


def pool_summary(pool: Obj) -> Obj:
    """One entry of ``GET /api/pools`` (both seeds' fields)."""
    spec = pool_spec(pool)
    assert spec is not None, "only visible pools are shown"
    status = pool.get("status") or {}
    held = _held(pool)
    cap = capacity(pool, spec)
    return {
        "id": pool["metadata"]["uid"],
        "slug": pool["metadata"]["name"],
        "modelId": spec.model.id,
        "modelName": spec.model.display_name or spec.model.id,
        "description": spec.model.description or "",
        "infraSpec": spec.model.infra_spec or "",
        "status": pool_phase(pool),
        "totalSlots": int(status.get("totalSlots", sum(cap.values()))),
        "pledgedSlots": int(status.get("pledgedSlots", sum(len(s) for s in held.values()))),
        "minPricePerDay": format_money(min_price(spec.prices())),
        "manualProvisioning": spec.manual_provisioning,
        "annualDiscount": fraction(spec.annual_discount),
        "reservationFee": format_money(Decimal(spec.reservation_fee)),
        "currency": spec.currency,
    }


def hour_slots(pool: Obj) -> list[Obj]:
    """Every hour of every seat: ``available`` or ``taken`` (held in the pool's seat ledger).

    Ordered seat by seat, then by hour (seat 0's hours 0-23, then seat 1's, ...), as the seeds'
    examples list them; the id is stable (derived from the pool's uid, hour and seat)."""
    spec = pool_spec(pool)
    assert spec is not None
    held = _held(pool)
    uid = pool["metadata"]["uid"]
    out: list[tuple[int, int, Obj]] = []
    for block, price in spec.prices().items():
        seats = sorted(set(range(capacity(pool, spec)[block])) | held[block])
        for seat in seats:
            for hour, part in zip(block.hours, hourly_split(price), strict=True):
                out.append((seat, hour, {
                    "id": str(uuid.uuid5(SLOT_NAMESPACE, f"{uid}/{hour}/{seat}")),
                    "hour": hour, "slotIndex": seat, "pricePerDay": format_money(part),
                    "status": "taken" if seat in held[block] else "available"}))
    out.sort(key=lambda t: (t[0], t[1]))
    return [slot for _, _, slot in out]


def block_offers(pool: Obj) -> list[Obj]:
    """Per offered block: hours, monthly seat price, seats and seats free now (an addition)."""
    spec = pool_spec(pool)
    assert spec is not None
    free = free_seats(pool, spec)
    cap = capacity(pool, spec)
    return [{"block": b.value, "startHour": b.start_hour, "endHour": b.start_hour + 7,
             "price": format_money(p), "seats": cap[b], "available": free[b]}
            for b, p in spec.prices().items()]


def pool_detail(pool: Obj) -> Obj:
    """``GET /api/pools/:id``: the summary plus every hour slot and the block offers."""
    return {**pool_summary(pool), "blocks": block_offers(pool), "hourSlots": hour_slots(pool)}


def find_pool(pools: Iterable[Obj], ref: str) -> Obj | None:
    """The visible pool whose uid (case-insensitive) or name (slug) is ``ref``."""
    ref_l = ref.lower()
    for pool in pools:
        meta = pool["metadata"]
        if meta.get("name") == ref or str(meta.get("uid", "")).lower() == ref_l:
            return pool if pool_visible(pool) else None
    return None


# -- subscribe requests ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SubscribeRequest:
    blocks: tuple[Block, ...]
    quantity: int
    billing_cycle: str


def parse_subscribe(body: object) -> SubscribeRequest:
    """The subscribe body, checked; ``BadRequest`` with a message naming the field."""
    if not isinstance(body, Mapping):
        raise BadRequest("The request body must be a JSON object")
    raw_blocks = body.get("blocks")
    accepted = ", ".join(f'"{n}"' for n in ACCEPTED_NAMES)
    if not isinstance(raw_blocks, list) or not raw_blocks:
        raise BadRequest(f"blocks is required: one or more of {accepted}")
    chosen: set[Block] = set()
    for name in raw_blocks:
        if not isinstance(name, str):
            raise BadRequest(f"blocks: each block is a string, one of {accepted}")
        if name not in ACCEPTED_NAMES:
            raise BadRequest(f"blocks: unknown block {name!r}; expected one of {accepted}")
        chosen.add(parse_block(name))
    quantity = body.get("quantity", 1)
    if isinstance(quantity, float) and quantity.is_integer():
        quantity = int(quantity)
    if isinstance(quantity, bool) or not isinstance(quantity, int) \
            or not MIN_QUANTITY <= quantity <= MAX_QUANTITY:
        raise BadRequest(f"quantity must be an integer from {MIN_QUANTITY} to {MAX_QUANTITY}")
    cycle = body.get("billingCycle", "month")
    if cycle not in BILLING_CYCLES:
        raise BadRequest('billingCycle must be "month" or "year"')
    return SubscribeRequest(tuple(b for b in BLOCK_ORDER if b in chosen), quantity, str(cycle))


def parse_key_request(body: object) -> str | None:
    """``POST /api/keys/subscription``: the optional subscriptionId."""
    if body is None:
        return None
    if not isinstance(body, Mapping):
        raise BadRequest("The request body must be a JSON object")
    sub_id = body.get("subscriptionId")
    if sub_id is None:
        return None
    if not isinstance(sub_id, str) or not sub_id:
        raise BadRequest("subscriptionId must be a subscription id (a string)")
    return sub_id


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str


def pre_check(pool: Obj, request: SubscribeRequest) -> Refusal | None:
    """What can be refused before a Subscription is made (the operator decides the rest)."""
    spec = pool_spec(pool)
    assert spec is not None
    if spec.paused or pool_phase(pool) == "paused":
        return Refusal(409, "This pool is paused and takes no new subscriptions")
    offered = spec.prices()
    missing = [b.value for b in request.blocks if b not in offered]
    if missing:
        return Refusal(400, f"This pool does not sell the {', '.join(missing)} block"
                            f"{'s' if len(missing) > 1 else ''}")
    free = free_seats(pool, spec)
    full = [b.value for b in request.blocks if free[b] < request.quantity]
    if full:
        return Refusal(409, pool_full_message(request.quantity, full))
    return None


def pool_full_message(quantity: int, blocks: list[str]) -> str:
    seats = "1 seat" if quantity == 1 else f"{quantity} seats"
    return f"Pool is full: no {seats} free in {', '.join(blocks)}"


def quote(pool: Obj, request: SubscribeRequest) -> tuple[str, int]:
    """(monthlyPrice, slotCount) of a request, as the operator will compute them."""
    spec = pool_spec(pool)
    assert spec is not None
    return (format_money(monthly_price(spec.prices(), request.blocks, request.quantity)),
            slot_count(request.blocks, request.quantity))


# -- subscriptions ---------------------------------------------------------------------------------

def sub_pool(sub: Obj) -> str:
    """The pool a subscription is for: where it holds seats, else what its spec names."""
    status = sub.get("status") or {}
    if status.get("pool"):
        return str(status["pool"])
    return str(((sub.get("spec") or {}).get("poolRef") or {}).get("name", ""))


def sub_customer(sub: Obj) -> str:
    return str(((sub.get("spec") or {}).get("customer") or {}).get("id", ""))


def sub_phase(sub: Obj) -> str:
    return str((sub.get("status") or {}).get("phase") or "pending")


def owned_by(sub: Obj, customer_id: str, namespace: str) -> bool:
    ref_ns = ((sub.get("spec") or {}).get("poolRef") or {}).get("namespace")
    return sub_customer(sub) == customer_id and ref_ns in (None, "", namespace)


def newest_first(subs: Iterable[Obj]) -> list[Obj]:
    def key(sub: Obj) -> tuple[str, str, str]:
        meta = sub["metadata"]
        return (meta.get("creationTimestamp", ""),
                (meta.get("annotations") or {}).get(ANNOTATION_REQUESTED_AT, ""),
                meta.get("name", ""))
    return sorted(subs, key=key, reverse=True)


def current(subs: Iterable[Obj]) -> Obj | None:
    """The customer's subscription a pool-level call means: the newest that holds seats (or is
    still being decided), else the newest of any."""
    ordered = newest_first(subs)
    for sub in ordered:
        if sub_phase(sub) != "canceled":
            return sub
    return ordered[0] if ordered else None


def cancelable(subs: Iterable[Obj]) -> Obj | None:
    """``DELETE .../pledge``: the newest subscription not canceled and not already ending."""
    for sub in newest_first(subs):
        if sub_phase(sub) != "canceled" and not (sub.get("spec") or {}).get("cancelAtPeriodEnd"):
            return sub
    return None


def hours(sub: Obj) -> list[Obj]:
    """The hourly slots held, seat by seat then by hour (as the seeds list them)."""
    slots = [{"hour": int(s["hour"]), "slotIndex": int(s["slotIndex"]),
              "pricePerDay": money(str(s["pricePerDay"]))}
             for s in (sub.get("status") or {}).get("slots") or []]
    return sorted(slots, key=lambda s: (s["slotIndex"], s["hour"]))


def key_revealed(sub: Obj) -> bool:
    """Whether the API shows this subscription's key (once the operator has issued one)."""
    ann = sub["metadata"].get("annotations") or {}
    return ann.get(ANNOTATION_KEY_DELIVERY) != DELIVERY_ON_REQUEST \
        or bool(ann.get(ANNOTATION_KEY_REQUESTED))


def key_view(secret: Obj | None, sub: Obj) -> Obj | None:
    """The seeds' key object from a key Secret (None when there is none, or not for ``sub``)."""
    if not secret:
        return None
    data = keys.decode(secret.get("data"))
    api_key = data.get("apiKey", "")
    if not api_key.startswith(keys.KEY_PREFIX) \
            or data.get("subscription") != sub["metadata"]["name"]:
        return None
    status = sub.get("status") or {}
    return {
        "id": data.get("keyId") or status.get("keyId") or "",
        "apiKey": api_key,
        "rpmLimit": int(data.get("rpm") or 0),
        "tpmLimit": int(data.get("tpm") or 0),
        "concurrencyLimit": int(data.get("concurrency") or 0),
        "isActive": sub_phase(sub) == "active",
        "gate": status.get("gate") or "closed",
        "subscriptionId": sub["metadata"]["uid"],
    }


def subscription_view(sub: Obj, pool_uid: str | None, key: Obj | None) -> Obj:
    """A subscription as the seeds show it (my-subscriptions, my-pledge, subscribe)."""
    spec = sub.get("spec") or {}
    status = sub.get("status") or {}
    try:
        parsed = parse_subscription_spec(spec)
        blocks = [b.value for b in parsed.normalized_blocks()]
    except (ValidationError, ValueError):
        blocks = list(status.get("blocks") or [])
    return {
        "id": sub["metadata"]["uid"],
        "poolId": pool_uid,
        "status": sub_phase(sub),
        "monthlyPrice": money(status.get("monthlyPrice")),
        "amount": money(status.get("amount")),
        "billingCycle": spec.get("billingCycle") or "month",
        "cancelAtPeriodEnd": bool(spec.get("cancelAtPeriodEnd")),
        "currentPeriodEnd": js_time(status.get("currentPeriodEnd")),
        "blocks": blocks,
        "quantity": int(status.get("heldQuantity") or spec.get("quantity") or 1),
        "slotCount": int(status.get("slotCount") or 0),
        "hours": hours(sub),
        "key": key,
    }


# -- the operator's decision on a new subscription -------------------------------------------------

@dataclass(frozen=True)
class Decision:
    accepted: bool
    status: int
    message: str = ""


# SeatsHeld reasons of a pending subscription the operator has turned down (for now).
_REFUSED: dict[str, tuple[int, str | None]] = {
    "NoPaymentMethod": (400, NO_PAYMENT_METHOD),
    "PoolFull": (409, None),
    "ReservationDeclined": (402, None),
    "BlockNotOffered": (400, None),
    "PoolNotPublished": (404, "Pool not found"),
    "PoolNotFound": (404, "Pool not found"),
    "PoolPaused": (409, "This pool is paused and takes no new subscriptions"),
    "PoolInvalid": (409, "This pool cannot take subscriptions right now"),
    "InvalidSpec": (400, None),
    "PoolInOtherNamespace": (400, None),
}


def decision(sub: Obj, quantity: int = 1) -> Decision | None:
    """The operator's answer to a new subscription, or None while it has not given one.

    Accepted: ``pledged``, ``active``, ``pending_key``. Refused: a ``pending`` subscription
    whose SeatsHeld condition (for the current generation) names a reason in ``_REFUSED``, or a
    first charge that failed (``past_due``, 402)."""
    meta, status = sub["metadata"], sub.get("status") or {}
    phase = status.get("phase")
    if phase in ("pledged", "active", "pending_key"):
        return Decision(True, 201)
    if status.get("observedGeneration") != meta.get("generation"):
        return None
    conds = status.get("conditions")
    if phase == "past_due":
        charged = get_condition(conds, "Charged") or {}
        return Decision(False, 402, f"Payment failed: {charged.get('message') or 'declined'}")
    if phase == "canceled":
        return Decision(False, 409, "The subscription was canceled before it started")
    seats = get_condition(conds, "SeatsHeld") or {}
    refused = _REFUSED.get(str(seats.get("reason")))
    if phase != "pending" or refused is None:
        return None
    status_code, message = refused
    if message is None:
        detail = str(seats.get("message") or seats.get("reason"))
        if seats.get("reason") == "PoolFull":
            message = pool_full_message(quantity, _blocks_in(detail))
        elif seats.get("reason") == "ReservationDeclined":
            message = f"Payment failed: {detail}"
        else:
            message = detail
    return Decision(False, status_code, message)


def _blocks_in(message: str) -> list[str]:
    return [b.value for b in BLOCK_ORDER if b.value in message] or ["the chosen blocks"]


def subscription_body(*, name: str, pool: str, customer_id: str, email: str | None,
                      request: SubscribeRequest, on_request: bool, mgmt_key_id: str,
                      requested_at: datetime) -> Obj:
    """The Subscription the API creates for a subscribe call (blocks written normalized)."""
    customer: Obj = {"id": customer_id}
    if email:
        customer["email"] = email
    return {
        "apiVersion": "gpupool.dev/v1alpha1", "kind": "Subscription",
        "metadata": {
            "name": name,
            "labels": {names.LABEL_POOL: pool, LABEL_CREATED_BY: CREATED_BY},
            "annotations": {
                ANNOTATION_KEY_DELIVERY: DELIVERY_ON_REQUEST if on_request
                else DELIVERY_AUTOMATIC,
                ANNOTATION_REQUESTED_AT: requested_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                ANNOTATION_MGMT_KEY: mgmt_key_id,
            },
        },
        "spec": {"poolRef": {"name": pool}, "customer": customer,
                 "blocks": [b.value for b in request.blocks], "quantity": request.quantity,
                 "billingCycle": request.billing_cycle},
    }


def key_on_request(pool: Obj) -> bool:
    """The seeds' Unlimited flow (no key until the customer asks for one) applies to pools that
    open active at once (``activationThreshold: 0``) and hand keys out without approval. Funded
    pools (the GPU Boosts flow) deliver the key with activation; manual-provisioning pools
    deliver it on approval."""
    spec = pool_spec(pool)
    return bool(spec and spec.activation_threshold == 0 and not spec.manual_provisioning)
