"""Deterministic names and labels of everything gpupool creates (the contract between parts).

Key Secret (one per Subscription, same namespace, owned by it), label ``gpupool.dev/kind=api-key``,
string data:
    apiKey              sk_pool_... (never logged)
    keyId               public id of the key, safe to log and use as a metric label
    pool, subscription, customerId
    blocks              comma-separated block names, e.g. "asia,europe"
    rpm, tpm, concurrency
    upstream            base URL of the pool's vLLM Service, e.g. http://NAME.NS.svc:8000
    upstreamKeySecret   name of the pool's upstream-key Secret (same namespace), key ``apiKey``
    servedModelName
    subscriptionPhase   pending|pledged|pending_key|active|past_due|canceled
    poolPhase           draft|funding|activating|active|paused
Upstream-key Secret (one per Pool, label ``gpupool.dev/kind=upstream-key``): ``apiKey`` is the
internal key vLLM is started with; only the gateway holds it.
Open-keys Secret (one per Pool, label ``gpupool.dev/kind=open-keys``): client id -> key for every
key open now, the shape Envoy Gateway's API-key authentication reads.
"""

from __future__ import annotations

import hashlib

PREFIX = "gpupool.dev"
MANAGED_BY = {"app.kubernetes.io/managed-by": "gpupool"}

LABEL_KIND = f"{PREFIX}/kind"
LABEL_POOL = f"{PREFIX}/pool"
LABEL_SUBSCRIPTION = f"{PREFIX}/subscription"
LABEL_GATE = f"{PREFIX}/gate"
LABEL_COMPONENT = "app.kubernetes.io/component"

KIND_API_KEY = "api-key"
KIND_UPSTREAM_KEY = "upstream-key"
KIND_OPEN_KEYS = "open-keys"

ANNOTATION_ROTATE = f"{PREFIX}/rotate-key"
ANNOTATION_APPROVED = f"{PREFIX}/key-approved"

FINALIZER = f"{PREFIX}/finalizer"
"""kopf's own finalizer name (kopf adds and removes it for the handlers that need one)."""
SUBSCRIPTION_FINALIZER = f"{PREFIX}/cancel"
"""Held by every Subscription: its deletion waits until it is canceled (Stripe told, key gone,
seats freed). Managed by the subscription reconcile itself (kopf removes its own finalizer
from objects no kopf handler needs it for)."""

_MAX_NAME = 63


def _bounded(base: str, suffix: str) -> str:
    """``base-suffix``, shortened with a stable hash when it would pass 63 characters."""
    name = f"{base}-{suffix}"
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    keep = _MAX_NAME - len(suffix) - len(digest) - 2
    return f"{base[:keep].rstrip('-.')}-{digest}-{suffix}"


def deployment_name(pool: str) -> str:
    return _bounded(pool, "vllm")


def service_name(pool: str) -> str:
    return _bounded(pool, "vllm")


def upstream_key_secret_name(pool: str) -> str:
    # Must not end in "-key": Subscription "<pool>-upstream" has key Secret "<pool>-upstream-key".
    return _bounded(pool, "upstream")


def open_keys_secret_name(pool: str) -> str:
    return _bounded(pool, "open-keys")


def key_secret_name(subscription: str) -> str:
    return _bounded(subscription, "key")


def upstream_url(pool: str, namespace: str, port: int) -> str:
    return f"http://{service_name(pool)}.{namespace}.svc:{port}"


def pool_labels(pool: str) -> dict[str, str]:
    return {**MANAGED_BY, LABEL_POOL: pool}
