"""Reconcile one Pool: plan the seat ledger, decide the phase, run the workload, write status."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from gpupool import events, keys, ledger, names, workload
from gpupool.blocks import BLOCK_ORDER, Block, normalize_blocks
from gpupool.conditions import get_condition, iso, set_condition
from gpupool.kube import ApiError, Conflict
from gpupool.models import (
    PoolSpec,
    describe_validation_error,
    parse_pool_spec,
    parse_subscription_spec,
)
from gpupool.ownership import NotOurs, Owner, is_child
from gpupool.pricing import format_money, min_price
from gpupool.world import key_of

if TYPE_CHECKING:
    from gpupool.controller import Controller

log = logging.getLogger(__name__)
Obj = dict[str, Any]

ACCEPTED = "Accepted"
INVALID_SPEC = "InvalidSpec"
NAME_TAKEN_RETRY = 30.0
CHILD_FIELDS = ("spec", "metadata.labels", "metadata.ownerReferences")
LEDGER_INTERVAL = 0.5
"""Seconds between two ledger writes of one pool, at least."""


def claim_of(sub: Obj, preaccept: bool = False) -> ledger.Claim | None:
    """How the planner sees a subscription; None when its spec cannot be read at all.

    ``preaccept`` (billing off): a new subscription in the pool's namespace, with its
    finalizer in place, is a claim before its own reconcile has said Accepted; nothing it
    decides (a payment method) can refuse it that the planner does not check itself (blocks
    offered, room left)."""
    meta = sub.get("metadata", {})
    spec = sub.get("spec") or {}
    status = sub.get("status") or {}
    try:
        parsed = parse_subscription_spec(spec)
    except (ValidationError, ValueError):
        return None
    accepted = get_condition(status.get("conditions"), ACCEPTED)
    blocks, quantity = parsed.normalized_blocks(), parsed.quantity
    if status.get("pool") and status.get("heldBlocks"):
        # Seats are sold as bought: once held, the held blocks and quantity are the claim.
        blocks = normalize_blocks(status["heldBlocks"])
        quantity = int(status.get("heldQuantity") or quantity)
    if accepted is None:
        same_ns = (parsed.pool_ref.namespace or meta.get("namespace")) == meta.get("namespace")
        ok = (preaccept and same_ns and not status.get("phase")
              and names.SUBSCRIPTION_FINALIZER in (meta.get("finalizers") or []))
    else:
        ok = accepted.get("status") == "True"
    eligible = not meta.get("deletionTimestamp") and status.get("phase") != "canceled" and ok
    return ledger.Claim(name=meta["name"], uid=meta.get("uid", ""),
                        created=meta.get("creationTimestamp", ""),
                        blocks=blocks, quantity=quantity,
                        eligible=eligible)


def spec_readable(pool: Obj | None) -> bool:
    """Whether a pool's stored spec is one the operator can read (and so plan and write)."""
    try:
        parse_pool_spec((pool or {}).get("spec") or {})
    except (ValidationError, ValueError):
        return False
    return True


def deployment_ready(dep: Obj | None, desired: int) -> tuple[bool, int]:
    """(Available with at least one ready replica and the latest spec observed, ready count)."""
    if not dep or desired < 1:
        return False, 0
    st = dep.get("status") or {}
    ready = int(st.get("readyReplicas") or 0)
    current = st.get("observedGeneration") == dep.get("metadata", {}).get("generation")
    available = get_condition(st.get("conditions"), "Available")
    ok = bool(current and available and available.get("status") == "True" and ready >= 1)
    return ok, ready


def decide_phase(spec: PoolSpec, activated: bool, pledged: int, available: bool) -> str:
    if spec.paused:
        return "paused"
    if activated:
        return "active"
    if not spec.published:
        return "draft"
    if pledged >= spec.activation_threshold:
        return "active" if available else "activating"
    return "funding"


def ledger_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Merge-patch turning ledger ``old`` into ``new`` (null removes an entry).

    Recursive: a merge-patch merges nested objects, so a changed entry must null the blocks
    it no longer holds rather than just restate the new ones."""
    patch: dict[str, Any] = {}
    for k, v in new.items():
        was = old.get(k)
        if was == v:
            continue
        if isinstance(was, Mapping) and isinstance(v, Mapping):
            patch[k] = ledger_patch(was, v)
        else:
            patch[k] = v
    patch.update({k: None for k in old if k not in new})
    return patch


def ledger_change(old_raw: Mapping[str, Any], parsed: int,
                  planned: ledger.Plan) -> dict[str, Any]:
    """The merge-patch from the stored ledger to the planned one.

    Only the holders admitted or released can differ, so only those are compared (a pool's
    ledger has one entry per holder, and a pass in a burst admits a few of hundreds). Entries
    the parser had to drop (written around the schema) make it compare the whole ledger."""
    if parsed != len(old_raw):
        return ledger_patch(old_raw, ledger.dump_ledger(planned.ledger))
    changed = set(planned.admitted) | set(planned.released)
    old = {n: old_raw[n] for n in changed if n in old_raw}
    new = ledger.dump_ledger({n: planned.ledger[n] for n in changed if n in planned.ledger})
    return ledger_patch(old, new)


async def reconcile_pool(ctl: Controller, key: tuple[str, str]) -> float | None:
    # One ledger write per pool per LEDGER_INTERVAL at most: in a burst the claims that arrive
    # meanwhile are admitted together, in one write of an object that grows with its holders.
    wait = ctl.world.ledger_written.get(key, float("-inf")) + LEDGER_INTERVAL - time.monotonic()
    if wait > 0:
        await asyncio.sleep(wait)
    # The ledger is written on the resourceVersion it was planned from. Planned from the
    # newest copy known here (the watch's, or this process's own last write); when someone
    # else wrote since, the write conflicts and the pass runs again from the stored object.
    cached = ctl.world.latest("Pool", key)
    if cached is not None:
        try:
            return await _reconcile_pool(ctl, key, cached)
        except Conflict:
            log.debug("pool %s/%s: cached copy out of date; reading it", *key)
    pool = await ctl.kube.get_custom("pools", *key)
    ctl.world.wrote(pool)
    return await _reconcile_pool(ctl, key, pool)


async def _reconcile_pool(ctl: Controller, key: tuple[str, str],
                          pool: Obj | None) -> float | None:
    ns, name = key
    if pool is None or pool["metadata"].get("deletionTimestamp"):
        for sub_key in ctl.world.sub_keys_of_pool(key):
            ctl.subs.add(sub_key)
        return None
    meta = pool["metadata"]
    gen = meta.get("generation")
    status: Obj = dict(pool.get("status") or {})
    now = ctl.clock()
    conds = status.get("conditions") or []
    was_invalid = (get_condition(conds, "Ready") or {}).get("reason") == INVALID_SPEC

    try:
        spec = parse_pool_spec(pool.get("spec") or {})
        bad_args = workload.check_extra_args(spec.runtime.extra_args)
        bad_env = workload.check_env(spec.runtime.env)
    except (ValidationError, ValueError) as exc:
        conds = set_condition(conds, "Ready", False, INVALID_SPEC,
                              describe_validation_error(exc), gen, now)
        await _unreadable(ctl, pool, conds, was_invalid)
        return None
    if bad_args:
        conds = set_condition(
            conds, "Ready", False, "OwnedArgs",
            f"spec.runtime.extraArgs: {', '.join(bad_args)} are set by the operator; remove them",
            gen, now)
    elif bad_env:
        conds = set_condition(
            conds, "Ready", False, "OwnedEnv",
            f"spec.runtime.env: {', '.join(bad_env)} are set by the operator; remove them",
            gen, now)
    else:
        conds = set_condition(conds, "Ready", True, "SpecValid", "spec accepted", gen, now)

    old_ledger_raw = status.get("ledger") or {}
    old_ledger = ledger.parse_ledger(old_ledger_raw)
    claims = await _claims(ctl, key, old_ledger)
    admitting = spec.published and not spec.paused
    planned = ledger.plan(spec.capacity(), old_ledger, claims, admitting)
    pledged = planned.pledged_slots()

    activated_at = status.get("activatedAt")
    activated = bool(activated_at)
    name_taken = False
    provisional = decide_phase(spec, activated, pledged, available=False)
    desired = workload.desired_replicas(spec, planned.reserved(), now, provisional)
    if bad_args or bad_env:
        # A spec the operator refuses does not reach the running workload: it keeps serving as
        # it was until the spec is fixed. Only its pod template is frozen: replicas still follow
        # the phase and the clock, so pausing (or an unsold block) frees the GPUs all the same.
        dep_name = names.deployment_name(name)
        dep = await ctl.kube.get("deployments", ns, dep_name, group="apps/v1")
        if dep is not None and not is_child(dep, Owner.pool(name)):
            dep = None  # not this pool's: not touched
        if dep is None:
            desired = 0
        elif int((dep.get("spec") or {}).get("replicas") or 0) != desired:
            dep = await ctl.kube.patch("deployments", ns, dep_name,
                                       {"spec": {"replicas": desired}}, group="apps/v1")
    else:
        try:
            dep = await _apply_workload(ctl, pool, spec, desired)
        except NotOurs as exc:
            conds = set_condition(conds, "Ready", False, "NameTaken", str(exc), gen, now)
            dep, name_taken = None, True
    available, ready = deployment_ready(dep, desired)
    phase = decide_phase(spec, activated, pledged, available)
    if phase == "active" and not activated:
        activated_at = iso(now)

    conds = await _workload_conditions(ctl, pool, spec, phase, desired, dep, available, ready,
                                       conds, gen, now)
    reserved = planned.reserved()
    capacity = spec.capacity()
    prices = spec.prices()
    new_status: Obj = {
        "phase": phase,
        "observedGeneration": gen,
        "seats": {b.value: {"capacity": capacity[b], "reserved": reserved[b],
                            "price": format_money(prices[b])}
                  for b in BLOCK_ORDER if b in capacity},
        "totalSlots": sum(capacity.values()),
        "pledgedSlots": pledged,
        "minPricePerDay": format_money(min_price(prices)),
        "replicas": {"desired": desired, "ready": ready},
        "endpoint": names.upstream_url(name, ns, spec.runtime.port),
        "conditions": conds,
    }
    if activated_at:
        new_status["activatedAt"] = activated_at
    patch: Obj = {}
    for k, v in new_status.items():
        was = status.get(k)
        if was != v:
            # Nested maps are merged by a merge-patch: send what changed, null what is gone.
            if isinstance(was, Mapping) and isinstance(v, Mapping):
                patch[k] = ledger_patch(was, v)
            else:
                patch[k] = v
    lp = ledger_change(old_ledger_raw, len(old_ledger), planned)
    if lp:
        patch["ledger"] = lp
    if patch:
        # The ledger write is conditional on what was read: a concurrent writer makes this
        # raise Conflict and the queue re-plans from the fresh object.
        ctl.world.wrote(await ctl.kube.patch_status("pools", ns, name, patch,
                                                    meta["resourceVersion"] if lp else None))
        if lp:
            ctl.world.ledger_written[key] = time.monotonic()
        ctl.metrics.seats(ns, name, reserved, capacity)
    if activated_at and not activated:
        await events.post(ctl.kube, pool, "Activated", "the pool's workload is Available")
    if status.get("phase") != phase:
        log.info("pool %s/%s: %s -> %s", ns, name, status.get("phase"), phase)
        await events.post(ctl.kube, pool, "PhaseChanged", f"{status.get('phase')} -> {phase}")
    touched = set(planned.admitted) | set(planned.released)
    phase_changed = status.get("phase") != phase
    for sub_key in ctl.world.sub_keys_of_pool(key):
        sub = ctl.world.subs.get(sub_key) or {}
        waiting = planned.waiting.get(sub_key[1])
        if phase_changed or was_invalid or sub_key[1] in touched or (
                waiting and _reason(sub) != waiting):
            ctl.subs.add(sub_key)
    ctl.open_keys.add(key)
    wake = _next_wakeup(spec, planned.reserved(), now, phase)
    if name_taken:  # nothing watches a foreign object: look again for its removal
        return min(wake, NAME_TAKEN_RETRY) if wake is not None else NAME_TAKEN_RETRY
    return wake


async def _claims(ctl: Controller, key: tuple[str, str],
                  held: Mapping[str, tuple[str, ledger.Holding]]) -> list[ledger.Claim]:
    """The claims on this pool. A holder the watch has not delivered yet (right after a start,
    say) is read from the API server: seats are released only for a subscription that is really
    gone, canceled or being deleted, never for one the cache has not seen."""
    subs = {k[1]: s for k in ctl.world.sub_keys_of_pool(key)
            if (s := ctl.world.latest_sub(k)) is not None}
    for name, (uid, _) in held.items():
        if name in subs:
            continue
        sub = await ctl.kube.get_custom("subscriptions", key[0], name)
        if sub is not None and sub["metadata"].get("uid") == uid:
            subs[name] = sub
    preaccept = not ctl.billing.enabled
    return [c for s in subs.values() if (c := _cached_claim(ctl, key_of(s), s, preaccept))]


def _cached_claim(ctl: Controller, key: tuple[str, str], sub: Obj,
                  preaccept: bool) -> ledger.Claim | None:
    """``claim_of``, once per resourceVersion: a pool's pass reads every subscriber."""
    rv = str(sub.get("metadata", {}).get("resourceVersion", ""))
    held = ctl.world.claims.get(key)
    if held is not None and rv and held[0] == rv and held[1] == preaccept:
        claim: ledger.Claim | None = held[2]
        return claim
    claim = claim_of(sub, preaccept)
    if rv and key in ctl.world.subs:
        ctl.world.claims[key] = (rv, preaccept, claim)
    return claim


def _reason(sub: Obj) -> str | None:
    cond = get_condition((sub.get("status") or {}).get("conditions"), "SeatsHeld")
    return cond.get("reason") if cond else None


def _next_wakeup(spec: PoolSpec, reserved: Mapping[Block, int], now: datetime,
                 phase: str) -> float | None:
    if phase not in ("activating", "active"):
        return None
    change = workload.next_scaling_change(spec, reserved, now)
    if change is None:
        return None
    return max(0.5, (change - now).total_seconds())


async def _apply_workload(ctl: Controller, pool: Obj, spec: PoolSpec, desired: int) -> Obj | None:
    """The pool's upstream-key Secret, Service and Deployment, as the spec wants them.

    Nothing watches the Secret and the Service: once applied they are checked again when what
    is wanted changes or after a resync interval, not on every pass. The Deployment is compared
    with the watch's copy (or this process's last write) and written only when it differs."""
    meta = pool["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    secret_name = names.upstream_key_secret_name(name)
    ttl = ctl.resync_seconds
    if not ctl.world.applied_recently(("upstream-key", ns, secret_name), uid, ttl):
        # Minted once: an existing key is kept (only labels and owner are brought up to date).
        await ctl.kube.ensure("secrets", keys.build_upstream_key_secret(
            namespace=ns, pool=name, pool_uid=uid, api_key=keys.mint_key()),
            compare=("metadata.labels", "metadata.ownerReferences"), owner=Owner.pool(name))
        ctl.world.applied(("upstream-key", ns, secret_name), uid)
    service = workload.build_service(name, ns, uid, spec)
    fingerprint = json.dumps(service, sort_keys=True)
    if not ctl.world.applied_recently(("service", ns, name), fingerprint, ttl):
        await ctl.kube.ensure("services", service, compare=CHILD_FIELDS, owner=Owner.pool(name))
        ctl.world.applied(("service", ns, name), fingerprint)
    body = workload.build_deployment(name, ns, uid, spec, desired, secret_name)
    # ensure() merge-patches, which keeps whatever the patch does not mention: a field taken out
    # of the Pool (node selector, tolerations, ...) must be sent as null to leave the pods.
    pod_spec = body["spec"]["template"]["spec"]
    for field in workload.OPTIONAL_POD_SPEC_FIELDS:
        pod_spec.setdefault(field, None)
    # The Deployment's spec-hash annotation must follow its template, so it is compared too.
    cached = ctl.world.latest("Deployment", (ns, body["metadata"]["name"]))
    dep = await ctl.kube.ensure("deployments", body, group="apps/v1",
                                compare=(*CHILD_FIELDS, "metadata.annotations"),
                                current=cached, read=cached is None, owner=Owner.pool(name))
    ctl.world.wrote(dep)
    return dep


async def _workload_conditions(ctl: Controller, pool: Obj, spec: PoolSpec, phase: str,
                               desired: int, dep: Obj | None, available: bool, ready: int,
                               conds: list[Obj], gen: int | None, now: datetime) -> list[Obj]:
    meta = pool["metadata"]
    threshold = spec.activation_threshold
    funded = phase in ("activating", "active") or bool((pool.get("status") or {}).get(
        "activatedAt"))
    conds = set_condition(conds, "Funded", funded,
                          "ThresholdReached" if funded else "Funding",
                          f"activation threshold {threshold} seat-blocks", gen, now)
    conds = set_condition(conds, "Paused", spec.paused, "Paused" if spec.paused else "NotPaused",
                          "spec.paused is true" if spec.paused else "not paused", gen, now)
    if desired == 0:
        conds = set_condition(conds, "Available", phase == "active" and available,
                              "ScaledToZero", f"no replicas wanted in phase {phase}", gen, now)
        return set_condition(conds, "Progressing", False, "Idle", "nothing to roll out", gen, now)
    if available:
        conds = set_condition(conds, "Available", True, "MinimumReplicasAvailable",
                              f"{ready}/{desired} replicas ready", gen, now)
        return set_condition(conds, "Progressing", ready < desired, "ReplicasReady"
                             if ready >= desired else "ScalingUp",
                             f"{ready}/{desired} replicas ready", gen, now)
    reason, message = "WaitingForReplicas", f"{ready}/{desired} replicas ready"
    pods = await ctl.kube.list("pods", meta["namespace"],
                               label_selector=",".join(f"{k}={v}" for k, v in
                                                       workload.selector_labels(meta["name"])
                                                       .items()))
    for pod in pods:
        sched = get_condition((pod.get("status") or {}).get("conditions"), "PodScheduled")
        if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
            reason = "Unschedulable"
            message = f"pod {pod['metadata']['name']}: {sched.get('message', '')}".strip()
            break
    conds = set_condition(conds, "Available", False, reason, message, gen, now)
    return set_condition(conds, "Progressing", True, reason, message, gen, now)


async def _unreadable(ctl: Controller, pool: Obj, conds: list[Obj], was_invalid: bool) -> None:
    """A stored spec the operator cannot read (written around the schema, or under an older,
    looser CRD). The workload runs on as it was and no seat is sold, but holders that are gone,
    canceled or being deleted still give their seats back (a deletion waits for that), and the
    subscriptions are told when the spec turns unreadable and again when it is fixed."""
    meta, status = pool["metadata"], pool.get("status") or {}
    key = (meta["namespace"], meta["name"])
    old_raw = status.get("ledger") or {}
    old = ledger.parse_ledger(old_raw)
    planned = ledger.plan({}, old, await _claims(ctl, key, old), admitting=False)
    lp = ledger_patch(old_raw, ledger.dump_ledger(planned.ledger))
    patch: Obj = {k: v for k, v in (("conditions", conds),
                                    ("observedGeneration", meta.get("generation")))
                  if status.get(k) != v}
    if lp:
        reserved = planned.reserved()
        patch["ledger"] = lp
        patch["pledgedSlots"] = planned.pledged_slots()
        patch["seats"] = {b: {"reserved": reserved[Block(b)]} for b in status.get("seats") or {}}
    try:
        if patch:
            ctl.world.wrote(await ctl.kube.patch_status("pools", key[0], key[1], patch,
                                                        meta["resourceVersion"] if lp else None))
    except ApiError as exc:
        if exc.status != 422:
            raise
        # The API server validates the whole object on a status write: a spec that fails the
        # CRD's schema as it is now (tightened since the spec was stored) blocks every status
        # write. An Event says what is wrong, once per generation; a spec change retries.
        message = str((get_condition(conds, "Ready") or {}).get("message", ""))
        if not ctl.world.applied_recently(("invalid-spec", *key), str(meta.get("generation")),
                                          float("inf")):
            await events.post(ctl.kube, pool, INVALID_SPEC, message, "Warning")
            ctl.world.applied(("invalid-spec", *key), str(meta.get("generation")))
    for sub_key in ctl.world.sub_keys_of_pool(key):
        if not was_invalid or sub_key[1] in planned.released:
            ctl.subs.add(sub_key)
