"""Management keys (``mk_...``): who is calling the REST API, and for which customer.

A management key is ``mk_`` + 32 random bytes, URL-safe (43 characters). It is shown once, by
``gpupool api create-key``, and stored only as its SHA-256 digest, in a Secret in the API's
namespace:

    name    gpupool-mk-<first 20 hex digits of the digest>
    labels  gpupool.dev/kind=management-key, app.kubernetes.io/managed-by=gpupool
    data    sha256      hex digest of the whole key (compared in constant time)
            keyId       mkid_<first 16 hex digits>: public id, safe to log
            customerId  the customer the key acts for (the Stripe customer id with billing on)
            email       optional contact, copied into the Subscriptions it creates
            createdAt   when it was made

The Secret's name follows from the key, so a request costs one ``get`` (no ``list``) and the API
never needs to read every key. A plain SHA-256 is the right hash here: the key is 256 random
bits, so there is nothing to brute-force (slow, salted hashes are for passwords people choose).
Revoking a key is deleting its Secret (``gpupool api revoke-key --key-id mkid_...``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gpupool import names
from gpupool.keys import decode, encode

PREFIX = "mk_"
KIND = "management-key"
KEY_BYTES = 32
# mk_ and then URL-safe base64; a little slack either side of the 43 characters minted here.
SHAPE = re.compile(r"^mk_[A-Za-z0-9_-]{32,128}$")
KEY_ID_SHAPE = re.compile(r"^mkid_[0-9a-f]{16}$")
SECRET_PREFIX = "gpupool-mk-"


class Malformed(ValueError):
    """The Authorization header does not carry a management key at all."""


@dataclass(frozen=True)
class Customer:
    """Who a valid management key acts for."""

    id: str
    key_id: str
    email: str | None = None


def mint() -> str:
    return PREFIX + secrets.token_urlsafe(KEY_BYTES)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of_digest(hexdigest: str) -> str:
    return f"mkid_{hexdigest[:16]}"


def secret_name_of_digest(hexdigest: str) -> str:
    return SECRET_PREFIX + hexdigest[:20]


def secret_name(key: str) -> str:
    return secret_name_of_digest(digest(key))


def bearer(header: str | None) -> str:
    """The management key in an ``Authorization`` header; ``Malformed`` when there is none.

    ``None`` (no header) is reported by the caller as missing; anything else that is not
    ``Bearer mk_...`` of the right shape is malformed."""
    if header is None:
        raise Malformed("missing")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Malformed("not a Bearer token")
    if not SHAPE.match(token):
        raise Malformed("not a management key")
    return token


def build_secret(key: str, *, namespace: str, customer_id: str, email: str | None = None,
                 now: datetime | None = None) -> dict[str, Any]:
    """The Secret that stores ``key`` hashed (the key itself is not in it)."""
    hexdigest = digest(key)
    data = {"sha256": hexdigest, "keyId": key_id_of_digest(hexdigest), "customerId": customer_id,
            "createdAt": (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if email:
        data["email"] = email
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {
            "name": secret_name_of_digest(hexdigest), "namespace": namespace,
            "labels": {**names.MANAGED_BY, names.LABEL_KIND: KIND},
        },
        "data": encode(data),
    }


def customer_of(secret: dict[str, Any] | None, key: str) -> Customer | None:
    """The customer ``key`` acts for, if ``secret`` (looked up by ``secret_name(key)``) is its
    record; None for no Secret, a Secret of another kind, or a digest that does not match."""
    if not secret:
        return None
    labels = (secret.get("metadata") or {}).get("labels") or {}
    if labels.get(names.LABEL_KIND) != KIND:
        return None
    try:
        data = decode(secret.get("data"))
    except (ValueError, UnicodeDecodeError):
        return None
    stored = data.get("sha256", "")
    if not stored or not hmac.compare_digest(stored.encode(), digest(key).encode()):
        return None
    customer = data.get("customerId", "").strip()
    if not customer:
        return None
    return Customer(id=customer, key_id=data.get("keyId") or key_id_of_digest(stored),
                    email=data.get("email") or None)
