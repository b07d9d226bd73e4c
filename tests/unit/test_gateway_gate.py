"""Gate decisions, error shapes, key Secrets and the key store."""

from __future__ import annotations

import base64
import json
import secrets
from datetime import UTC, datetime

import pytest

from gpupool import names
from gpupool.blocks import Block
from gpupool.gateway import gate
from gpupool.gateway.app import extract_key
from gpupool.gateway.errors import error_body, stream_error_event
from gpupool.gateway.keys import (
    InvalidSecret,
    KeyRecord,
    KeyStore,
    UpstreamKey,
    hash_key,
    secret_record,
)
from gpupool.gateway.testing import key_record


def at(h: int, m: int = 0, s: int = 0, us: int = 0, day: int = 23) -> datetime:
    return datetime(2026, 11, day, h, m, s, us, tzinfo=UTC)


def rec(**kw: object) -> KeyRecord:
    return key_record("sk_pool_x", upstream="http://u", **kw)  # type: ignore[arg-type]


# -- gate -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("blocks", "now", "open_"), [
    (("europe",), at(8), True),
    (("europe",), at(15, 59, 59, 999999), True),
    (("europe",), at(16), False),
    (("europe",), at(7, 59, 59, 999999), False),
    (("night",), at(0), True),
    (("asia", "americas"), at(23, 59, 59), True),
    (("asia", "americas"), at(12), False),
])
def test_block_gate(blocks: tuple[str, ...], now: datetime, open_: bool) -> None:
    assert (gate.check(rec(blocks=blocks), now) is None) is open_


def test_outside_blocks_names_the_next_opening() -> None:
    r = gate.check(rec(blocks=("europe",)), at(16, 0, 0))
    assert r is not None
    assert (r.status, r.code) == (403, "outside_blocks")
    assert r.extra == {"next_open_at": "2026-11-24T08:00:00Z"}
    assert r.retry_after == 16 * 3600
    assert "europe 08:00-15:59 UTC" in r.message
    r = gate.check(rec(blocks=("asia", "europe")), at(20))
    assert r is not None
    assert r.extra == {"next_open_at": "2026-11-24T00:00:00Z"}


def test_a_key_with_no_block_never_opens() -> None:
    r = gate.check(rec(blocks=()), at(12))
    assert r is not None
    assert r.code == "outside_blocks"
    assert r.retry_after is None


@pytest.mark.parametrize(("sub", "pool", "status", "code"), [
    ("past_due", "active", 402, "subscription_past_due"),
    ("past_due", "paused", 402, "subscription_past_due"),  # the subscription is told first
    ("canceled", "active", 403, "subscription_canceled"),
    ("pending_key", "active", 403, "key_not_active"),
    ("pledged", "funding", 403, "key_not_active"),
    ("pending", "draft", 403, "key_not_active"),
    ("", "active", 403, "key_not_active"),
    ("active", "paused", 503, "pool_not_active"),
    ("active", "funding", 503, "pool_not_active"),
])
def test_phase_refusals(sub: str, pool: str, status: int, code: str) -> None:
    # outside its block too: the phase answer comes first
    r = gate.check(rec(subscription_phase=sub, pool_phase=pool, blocks=("asia",)), at(12))
    assert r is not None
    assert (r.status, r.code) == (status, code)


def test_closes_at() -> None:
    assert gate.closes_at(rec(blocks=("europe",)), at(9)) == at(16)
    assert gate.closes_at(rec(blocks=("europe", "americas")), at(9)) == at(0, day=24)
    assert gate.closes_at(rec(), at(9)) is None


# -- error shapes ---------------------------------------------------------------------------------
def test_openai_error_shape() -> None:
    body = json.loads(error_body("openai", 429, "rate_limit_exceeded", "slow down",
                                 {"limit": "rpm"}))
    assert body == {"error": {"message": "slow down", "type": "rate_limit_error", "param": None,
                              "code": "rate_limit_exceeded", "limit": "rpm"}}


def test_anthropic_error_shape() -> None:
    body = json.loads(error_body("anthropic", 402, "subscription_past_due", "pay"))
    assert body == {"type": "error", "error": {"type": "billing_error", "message": "pay",
                                               "code": "subscription_past_due"}}


def test_stream_error_events() -> None:
    o = stream_error_event("openai", 403, "block_ended", "bye").decode()
    assert o.endswith("data: [DONE]\n\n")
    assert json.loads(o.split("\n")[0][6:])["error"]["code"] == "block_ended"
    a = stream_error_event("anthropic", 403, "block_ended", "bye").decode()
    assert a.startswith("event: error\ndata: ")
    assert json.loads(a.split("data: ")[1])["error"]["type"] == "permission_error"


# -- auth header parsing --------------------------------------------------------------------------
def test_extract_key() -> None:
    h = [(b"authorization", b"Bearer abc"), (b"x-api-key", b"xyz")]
    assert extract_key(h, "openai") == "abc"
    assert extract_key(h, "anthropic") == "xyz"
    assert extract_key([(b"authorization", b"bearer  abc ")], "openai") == "abc"
    assert extract_key([(b"authorization", b"Basic abc")], "openai") is None
    assert extract_key([(b"x-api-key", b"xyz")], "openai") is None
    assert extract_key([(b"authorization", b"Bearer abc")], "anthropic") == "abc"


# -- Secrets --------------------------------------------------------------------------------------
def b64(d: dict[str, str]) -> dict[str, str]:
    return {k: base64.b64encode(v.encode()).decode() for k, v in d.items()}


def secret_data(key: str, **over: str) -> dict[str, str]:
    d = {"apiKey": key, "keyId": "key_1", "pool": "p", "subscription": "s", "customerId": "c",
         "blocks": "night,europe", "rpm": "60", "tpm": "1000", "concurrency": "2",
         "upstream": "http://p-vllm.ns.svc:8000/", "upstreamKeySecret": "p-upstream-key",
         "servedModelName": "m", "subscriptionPhase": "active", "poolPhase": "active"}
    d.update(over)
    return d


API = {names.LABEL_KIND: names.KIND_API_KEY}
UP = {names.LABEL_KIND: names.KIND_UPSTREAM_KEY}


def test_api_key_secret_becomes_a_hashed_record() -> None:
    key = "sk_pool_" + secrets.token_urlsafe(32)
    r = secret_record("ns", "s-key", API, b64(secret_data(key)))
    assert isinstance(r, KeyRecord)
    assert r.key_hash == hash_key(key)
    assert r.blocks == frozenset({Block.ASIA, Block.EUROPE})
    assert (r.limits.rpm, r.limits.tpm, r.limits.concurrency) == (60, 1000, 2)
    assert r.upstream == "http://p-vllm.ns.svc:8000"
    shown = repr(r) + str(r)
    leaked = key in shown or r.key_hash.hex() in shown
    assert not leaked, "a record's repr must not show the key or its hash"


def test_upstream_key_secret() -> None:
    r = secret_record("ns", "p-upstream-key", UP, b64({"apiKey": "internal"}))
    assert isinstance(r, UpstreamKey)
    hidden = "internal" not in repr(r)
    assert hidden


@pytest.mark.parametrize(("over", "why"), [
    ({"rpm": "x"}, "'rpm' is not an integer"),
    ({"tpm": "0"}, "'tpm' must be at least 1"),
    ({"blocks": "mars"}, "unknown block"),
    ({"keyId": ""}, "missing field(s): keyId"),
])
def test_bad_secrets_are_refused_without_showing_the_key(over: dict[str, str], why: str) -> None:
    key = "sk_pool_" + secrets.token_urlsafe(32)
    with pytest.raises(InvalidSecret) as info:
        secret_record("ns", "s-key", API, b64(secret_data(key, **over)))
    assert why in str(info.value)
    leaked = key in str(info.value)
    assert not leaked


def test_not_base64_is_refused() -> None:
    with pytest.raises(InvalidSecret, match="base64"):
        secret_record("ns", "s", API, {"apiKey": "!!!"})


def test_store_lookup_replace_and_rotation() -> None:
    store = KeyStore()
    k1, k2, k3 = ("sk_pool_" + secrets.token_urlsafe(32) for _ in range(3))
    r1 = key_record(k1, upstream="http://u", key_id="a", namespace="n1", secret_name="a")
    r2 = key_record(k2, upstream="http://u", key_id="b", namespace="n2", secret_name="b")
    store.replace(None, [r1, r2, UpstreamKey("n1", "up", "internal")])
    assert store.lookup(k1) is r1
    assert store.lookup(k2) is r2
    assert store.lookup(k3) is None
    assert store.upstream_key("n1", "up") == "internal"
    # rotation: same Secret, new key
    r1b = key_record(k3, upstream="http://u", key_id="a", namespace="n1", secret_name="a")
    store.put(r1b)
    assert store.lookup(k1) is None
    assert store.lookup(k3) is r1b
    # a re-list of n1 that no longer has the upstream key leaves n2 alone
    store.replace("n1", [r1b])
    assert store.upstream_key("n1", "up") is None
    assert store.lookup(k2) is r2
    store.delete("n2", "b")
    assert store.lookup(k2) is None
    assert len(store) == 1
