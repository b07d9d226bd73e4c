"""Every kopf handler of the operator. Watch handlers only update the world cache and enqueue;
the reconciles in pool_service and subscription_service decide and write."""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from gpupool import GROUP, VERSION, names
from gpupool.controller import Controller
from gpupool.kube import Kube
from gpupool.pool_service import claim_of
from gpupool.world import key_of, pool_ref_of

log = logging.getLogger(__name__)
MANAGED = {"app.kubernetes.io/managed-by": "gpupool"}


class NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """The operator has no on.create/on.update handlers, so nothing reads kopf's diff base;
    kopf would still build it (a deep copy of every body, status included) on every event."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def _ctl(memo: Any) -> Controller:
    ctl: Controller = memo.ctl
    return ctl


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    settings.persistence.finalizer = names.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.PREFIX)
    settings.persistence.diffbase_storage = NoDiffBase(prefix=names.PREFIX)
    # Phase changes are Events the operator posts itself; kopf's own log lines stay in the log.
    settings.posting.level = logging.ERROR
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    # kopf keeps one worker per object with events in flight, alive idle_timeout after its last
    # event. The old cap of 64 with kopf's 5 s idle time held a slot per object for 5 s, so a
    # burst of new objects was handled at ~13 objects/s (benchmarks/control_plane.py).
    settings.queueing.worker_limit = None
    settings.queueing.idle_timeout = 0.5
    settings.execution.max_workers = 4

    from gpupool.billing_config import make_billing

    kube = await Kube.connect()
    ctl = Controller(kube, billing=make_billing(),
                     workers=int(os.environ.get("GPUPOOL_WORKERS", "16")),
                     resync_seconds=float(os.environ.get("GPUPOOL_RESYNC_SECONDS", "300")))
    port = int(os.environ.get("GPUPOOL_METRICS_PORT", "0"))
    if port:
        ctl.metrics.serve(port)
    memo.ctl = ctl
    ctl.start()
    webhook_port = int(os.environ.get("GPUPOOL_WEBHOOK_PORT", "8081"))
    if ctl.billing.enabled and webhook_port:
        from gpupool.billing import BillingConfig
        from gpupool.webhook_server import serve

        ctl.spawn(serve(ctl, BillingConfig.from_env(), webhook_port), "stripe-webhooks")


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    ctl = getattr(memo, "ctl", None)
    if ctl is not None:
        await ctl.stop()


@kopf.on.event(GROUP, VERSION, "pools")
async def pool_event(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    ctl = _ctl(memo)
    key = key_of(body)
    if type == "DELETED":
        ctl.world.pools.pop(key, None)
        for sub_key in ctl.world.sub_keys_of_pool(key):
            ctl.subs.add(sub_key)
        return
    old_phase = ((ctl.world.pools.get(key) or {}).get("status") or {}).get("phase")
    ctl.world.pools[key] = dict(body)
    ctl.pools.add(key)
    if old_phase != (body.get("status") or {}).get("phase"):
        ctl.open_keys.add(key)


@kopf.on.event(GROUP, VERSION, "subscriptions")
async def subscription_event(type: str, body: kopf.Body, memo: Any,
                             **_: Any) -> None:
    ctl = _ctl(memo)
    key = key_of(body)
    old = ctl.world.subs.get(key)
    new = dict(body)
    if type == "DELETED":
        ctl.world.drop_sub(key)
        ctl.pools.add(pool_ref_of(new))
        ctl.subs.add(key)  # its key Secret goes now
        ctl.open_keys.add(pool_ref_of(new))
        return
    echo = ctl.world.echo("Subscription", key, new)
    ctl.world.put_sub(new)
    if not echo:
        # An echo of the operator's own write was decided by the pass that wrote it.
        ctl.subs.add(key)
    old_st, new_st = (old or {}).get("status") or {}, new.get("status") or {}
    if old is None or any(old_st.get(f) != new_st.get(f) for f in ("phase", "gate", "keyId")):
        # The open-keys Secret is built from this view; rebuild it now that the view has moved.
        ctl.open_keys.add(pool_ref_of(new))
    if old is None or claim_of(old) != claim_of(new) or pool_ref_of(old) != pool_ref_of(new):
        ctl.pools.add(pool_ref_of(new))
        if old is not None and pool_ref_of(old) != pool_ref_of(new):
            ctl.pools.add(pool_ref_of(old))


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
async def deployment_event(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    ctl = _ctl(memo)
    pool = body.get("metadata", {}).get("labels", {}).get(names.LABEL_POOL)
    if type == "DELETED":
        ctl.world.deployments.pop(key_of(body), None)
    else:
        ctl.world.deployments[key_of(body)] = dict(body)
    if pool:
        ctl.pools.add((body["metadata"]["namespace"], pool))


@kopf.on.event("", "v1", "pods", labels=MANAGED)
async def pod_event(body: kopf.Body, memo: Any, **_: Any) -> None:
    pool = body.get("metadata", {}).get("labels", {}).get(names.LABEL_POOL)
    if pool:
        _ctl(memo).pools.add((body["metadata"]["namespace"], pool))


@kopf.on.event("", "v1", "secrets", labels={names.LABEL_KIND: names.KIND_API_KEY})
async def key_secret_event(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    ctl = _ctl(memo)
    key = key_of(body)
    if type == "DELETED":
        ctl.world.key_secrets.pop(key, None)
    else:
        ctl.world.key_secrets[key] = dict(body)
    pool = body.get("metadata", {}).get("labels", {}).get(names.LABEL_POOL)
    if pool:
        ctl.open_keys.add((key[0], pool))
