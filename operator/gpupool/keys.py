"""API keys and the Secrets that carry them. See ``gpupool.names`` for the Secret format."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterable, Mapping

from gpupool import API_VERSION, names
from gpupool.blocks import Block
from gpupool.models import KeyLimits
from gpupool.ownership import Obj, owner_ref

KEY_PREFIX = "sk_pool_"
KEY_BYTES = 32


def mint_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def key_id(subscription_uid: str, generation: int = 0) -> str:
    """Public id of a key: stable per subscription and rotation, reveals nothing of the key."""
    digest = hashlib.sha256(f"{subscription_uid}:{generation}".encode()).hexdigest()[:16]
    return f"key_{digest}"


def owner_reference(kind: str, name: str, uid: str) -> dict[str, object]:
    return {"apiVersion": API_VERSION, "kind": kind, "name": name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def owned_by_subscription(secret: Obj) -> str | None:
    """The subscription a key Secret was made for, by its owner reference; None for a Secret
    that only carries the labels (made by hand or by another tool), which is not ours to delete."""
    ref = owner_ref(secret, "Subscription")
    return str(ref.get("name")) if ref else None


def key_secret_data(*, api_key: str, kid: str, pool: str, subscription: str, customer_id: str,
                    blocks: Iterable[Block], limits: KeyLimits, upstream: str,
                    served_model_name: str, sub_phase: str, pool_phase: str) -> dict[str, str]:
    return {
        "apiKey": api_key,
        "keyId": kid,
        "pool": pool,
        "subscription": subscription,
        "customerId": customer_id,
        "blocks": ",".join(b.value for b in blocks),
        "rpm": str(limits.rpm),
        "tpm": str(limits.tpm),
        "concurrency": str(limits.concurrency),
        "upstream": upstream,
        "upstreamKeySecret": names.upstream_key_secret_name(pool),
        "servedModelName": served_model_name,
        "subscriptionPhase": sub_phase,
        "poolPhase": pool_phase,
    }


def build_key_secret(*, namespace: str, subscription: str, subscription_uid: str, pool: str,
                     gate: str, data: Mapping[str, str]) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": names.key_secret_name(subscription),
            "namespace": namespace,
            "labels": _labels(pool, names.KIND_API_KEY, {names.LABEL_SUBSCRIPTION: subscription,
                                                         names.LABEL_GATE: gate}),
            "ownerReferences": [owner_reference("Subscription", subscription, subscription_uid)],
        },
        "data": encode(data),
    }


def build_upstream_key_secret(*, namespace: str, pool: str, pool_uid: str,
                              api_key: str) -> dict[str, object]:
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {
            "name": names.upstream_key_secret_name(pool), "namespace": namespace,
            "labels": _labels(pool, names.KIND_UPSTREAM_KEY),
            "ownerReferences": [owner_reference("Pool", pool, pool_uid)],
        },
        "data": encode({"apiKey": api_key}),
    }


def build_open_keys_secret(*, namespace: str, pool: str, pool_uid: str,
                           open_keys: Mapping[str, str]) -> dict[str, object]:
    """client id -> key for every open key: the Secret shape Envoy Gateway's APIKeyAuth reads."""
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {
            "name": names.open_keys_secret_name(pool), "namespace": namespace,
            "labels": _labels(pool, names.KIND_OPEN_KEYS),
            "ownerReferences": [owner_reference("Pool", pool, pool_uid)],
        },
        "data": encode(open_keys),
    }


def _labels(pool: str, kind: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    labels = names.pool_labels(pool)
    labels[names.LABEL_KIND] = kind
    labels.update(extra or {})
    return labels


def encode(data: Mapping[str, str]) -> dict[str, str]:
    return {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}


def decode(data: Mapping[str, str] | None) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (data or {}).items()}
