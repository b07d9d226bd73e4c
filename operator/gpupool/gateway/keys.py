"""The gateway's view of the key Secrets: records held by SHA-256 hash, and where they come from.

The operator writes one Secret per subscription (``gpupool.dev/kind=api-key``) and one per pool
(``gpupool.dev/kind=upstream-key``); ``gpupool.names`` documents their fields. The gateway turns
each api-key Secret into a :class:`KeyRecord` that holds only the SHA-256 digest of the key, never
the key itself, and looks a presented key up by its digest (then compares digests in constant
time). The pool's upstream key is the one secret the gateway must hold in clear: it is sent to
vLLM.

A :class:`KeySource` fills a :class:`KeyStore`: :class:`gpupool.gateway.kube.KubernetesKeySource`
watches the Secrets through the Kubernetes API; :class:`StaticKeySource` takes records directly
(unit tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from gpupool import names
from gpupool.blocks import Block, normalize_blocks

log = logging.getLogger(__name__)

SUBSCRIPTION_PHASES = ("pending", "pledged", "pending_key", "active", "past_due", "canceled")
POOL_PHASES = ("draft", "funding", "activating", "active", "paused")


def hash_key(api_key: str) -> bytes:
    """The digest the gateway keeps instead of a key."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int
    tpm: int
    concurrency: int


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """Everything the gateway knows about one API key, except the key."""

    namespace: str
    secret_name: str
    key_hash: bytes = field(repr=False)
    key_id: str
    pool: str
    subscription: str
    blocks: frozenset[Block]
    limits: Limits
    upstream: str
    upstream_key_secret: str
    subscription_phase: str
    pool_phase: str
    served_model_name: str = ""
    customer_id: str = ""


@dataclass(frozen=True, slots=True)
class UpstreamKey:
    """A pool's internal vLLM key (``gpupool.dev/kind=upstream-key``)."""

    namespace: str
    secret_name: str
    api_key: str = field(repr=False)


class InvalidSecret(ValueError):
    """A key Secret the gateway cannot use; the message names fields, never values."""


_REQUIRED = ("apiKey", "keyId", "pool", "blocks", "rpm", "tpm", "concurrency", "upstream",
             "upstreamKeySecret", "subscriptionPhase", "poolPhase")


def decode_data(data: Mapping[str, str] | None) -> dict[str, str]:
    """A Secret's ``data`` (base64 values) as text."""
    out: dict[str, str] = {}
    for k, v in (data or {}).items():
        try:
            out[k] = base64.b64decode(v, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise InvalidSecret(f"field {k!r} is not base64-encoded UTF-8") from None
    return out


def _positive_int(data: Mapping[str, str], name: str) -> int:
    try:
        value = int(data[name].strip())
    except ValueError:
        raise InvalidSecret(f"field {name!r} is not an integer") from None
    if value < 1:
        raise InvalidSecret(f"field {name!r} must be at least 1")
    return value


def api_key_record(namespace: str, secret_name: str, data: Mapping[str, str]) -> KeyRecord:
    """Read one api-key Secret's decoded data (see ``gpupool.names``)."""
    missing = [f for f in _REQUIRED if not data.get(f, "").strip()]
    if missing:
        raise InvalidSecret(f"missing field(s): {', '.join(missing)}")
    try:
        blocks = frozenset(normalize_blocks(b for b in data["blocks"].split(",") if b.strip()))
    except ValueError:
        raise InvalidSecret("field 'blocks' names an unknown block") from None
    return KeyRecord(
        namespace=namespace,
        secret_name=secret_name,
        key_hash=hash_key(data["apiKey"].strip()),
        key_id=data["keyId"].strip(),
        pool=data["pool"].strip(),
        subscription=data.get("subscription", "").strip(),
        blocks=blocks,
        limits=Limits(rpm=_positive_int(data, "rpm"), tpm=_positive_int(data, "tpm"),
                      concurrency=_positive_int(data, "concurrency")),
        upstream=data["upstream"].strip().rstrip("/"),
        upstream_key_secret=data["upstreamKeySecret"].strip(),
        subscription_phase=data["subscriptionPhase"].strip(),
        pool_phase=data["poolPhase"].strip(),
        served_model_name=data.get("servedModelName", "").strip(),
        customer_id=data.get("customerId", "").strip(),
    )


def upstream_key_record(namespace: str, secret_name: str, data: Mapping[str, str]) -> UpstreamKey:
    key = data.get("apiKey", "").strip()
    if not key:
        raise InvalidSecret("missing field(s): apiKey")
    return UpstreamKey(namespace=namespace, secret_name=secret_name, api_key=key)


SecretRecord = KeyRecord | UpstreamKey


def secret_record(namespace: str, secret_name: str, labels: Mapping[str, str] | None,
                  data_b64: Mapping[str, str] | None) -> SecretRecord:
    """Read a Secret (as the API returns it: base64 ``data``) by its ``gpupool.dev/kind``."""
    kind = (labels or {}).get(names.LABEL_KIND)
    data = decode_data(data_b64)
    if kind == names.KIND_API_KEY:
        return api_key_record(namespace, secret_name, data)
    if kind == names.KIND_UPSTREAM_KEY:
        return upstream_key_record(namespace, secret_name, data)
    raise InvalidSecret(f"label {names.LABEL_KIND} is {kind!r}")


class KeyStore:
    """Key records by digest, upstream keys by (namespace, Secret name); changed in place.

    All methods are synchronous, so on one event loop every change is atomic with respect to the
    request handlers.
    """

    def __init__(self) -> None:
        self._by_hash: dict[bytes, KeyRecord] = {}
        self._secrets: dict[tuple[str, str], SecretRecord] = {}
        self._upstream: dict[tuple[str, str], str] = {}
        self._synced = False
        self._synced_event: asyncio.Event | None = None

    # -- reads (hot path) ---------------------------------------------------------------------
    def lookup(self, api_key: str) -> KeyRecord | None:
        digest = hash_key(api_key)
        record = self._by_hash.get(digest)
        if record is None or not hmac.compare_digest(record.key_hash, digest):
            return None
        return record

    def upstream_key(self, namespace: str, secret_name: str) -> str | None:
        return self._upstream.get((namespace, secret_name))

    def records(self) -> list[KeyRecord]:
        return list(self._by_hash.values())

    def __len__(self) -> int:
        return len(self._by_hash)

    @property
    def synced(self) -> bool:
        return self._synced

    async def wait_synced(self) -> None:
        if self._synced:
            return
        if self._synced_event is None:
            self._synced_event = asyncio.Event()
        await self._synced_event.wait()

    # -- writes ---------------------------------------------------------------------------------
    def mark_synced(self) -> None:
        if not self._synced:
            self._synced = True
            log.info("key list loaded: %d api key(s), %d upstream key(s)", len(self._by_hash),
                     len(self._upstream))
        if self._synced_event is not None:
            self._synced_event.set()

    def put(self, record: SecretRecord) -> None:
        ref = (record.namespace, record.secret_name)
        self._drop(ref)
        self._secrets[ref] = record
        if isinstance(record, KeyRecord):
            self._by_hash[record.key_hash] = record
        else:
            self._upstream[ref] = record.api_key

    def delete(self, namespace: str, secret_name: str) -> None:
        self._drop((namespace, secret_name))

    def replace(self, namespace: str | None, records: Iterable[SecretRecord]) -> None:
        """Make the content for ``namespace`` (None: every namespace) exactly ``records``."""
        fresh = list(records)
        keep = {(r.namespace, r.secret_name) for r in fresh}
        for ref in [r for r in self._secrets if namespace is None or r[0] == namespace]:
            if ref not in keep:
                self._drop(ref)
        for r in fresh:
            self.put(r)

    def _drop(self, ref: tuple[str, str]) -> None:
        old = self._secrets.pop(ref, None)
        if isinstance(old, KeyRecord):
            if self._by_hash.get(old.key_hash) is old:
                del self._by_hash[old.key_hash]
        elif old is not None:
            self._upstream.pop(ref, None)


class KeySource(Protocol):
    """Fills a :class:`KeyStore` and keeps it current.

    ``run`` loads the current records, calls ``store.mark_synced()``, then applies changes until
    it is cancelled.
    """

    async def run(self, store: KeyStore) -> None: ...


class StaticKeySource:
    """Records handed over directly; ``put``/``delete`` change them while the gateway runs."""

    def __init__(self, records: Iterable[SecretRecord] = ()) -> None:
        self._initial = list(records)
        self._store: KeyStore | None = None

    async def run(self, store: KeyStore) -> None:
        self._store = store
        store.replace(None, self._initial)
        store.mark_synced()
        await asyncio.Event().wait()

    def put(self, record: SecretRecord) -> None:
        if self._store is None:
            self._initial = [r for r in self._initial
                             if (r.namespace, r.secret_name) != (record.namespace,
                                                                 record.secret_name)]
            self._initial.append(record)
        else:
            self._store.put(record)

    def delete(self, namespace: str, secret_name: str) -> None:
        if self._store is None:
            self._initial = [r for r in self._initial
                             if (r.namespace, r.secret_name) != (namespace, secret_name)]
        else:
            self._store.delete(namespace, secret_name)
