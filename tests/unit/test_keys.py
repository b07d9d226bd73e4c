"""API keys and their Secrets (DESIGN.md "Keys and the gate", issue 5, ``gpupool.names``)."""

from __future__ import annotations

import base64
import json
import re

import pytest

from gpupool import names
from gpupool.blocks import Block
from gpupool.keys import (
    build_key_secret,
    build_open_keys_secret,
    build_upstream_key_secret,
    decode,
    encode,
    key_id,
    key_secret_data,
    mint_key,
    owned_by_subscription,
    owner_reference,
)
from gpupool.models import KeyLimits

URLSAFE = re.compile(r"^[A-Za-z0-9_-]+$")
SUB_UID = "0b7e6a52-1111-4000-8000-00000000abcd"
POOL_UID = "0b7e6a52-2222-4000-8000-00000000abcd"


def raw_bytes(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


# -- minting ------------------------------------------------------------------------------------


def test_mint_key_format() -> None:
    for _ in range(20):
        key = mint_key()
        assert key.startswith("sk_pool_")
        body = key[len("sk_pool_"):]
        assert URLSAFE.match(body), key
        assert len(raw_bytes(body)) >= 32


def test_mint_key_is_random() -> None:
    minted = {mint_key() for _ in range(200)}
    assert len(minted) == 200
    # No shared prefix beyond "sk_pool_": the body is not a counter or a timestamp.
    bodies = [k[len("sk_pool_"):] for k in minted]
    assert len({b[:4] for b in bodies}) > 100


# -- key ids ------------------------------------------------------------------------------------


def test_key_id_is_stable_per_subscription_and_rotation() -> None:
    assert key_id(SUB_UID) == key_id(SUB_UID, 0)
    assert key_id(SUB_UID, 1) == key_id(SUB_UID, 1)
    assert key_id(SUB_UID, 0) != key_id(SUB_UID, 1)
    assert key_id(SUB_UID) != key_id(POOL_UID)
    assert key_id(SUB_UID).startswith("key_")


def test_key_id_reveals_nothing_of_the_key() -> None:
    key = mint_key()
    kid = key_id(SUB_UID)
    body = key[len("sk_pool_"):]
    assert key not in kid
    assert body not in kid
    # not even an 8-character window of the key's body
    assert not any(body[i:i + 8] in kid for i in range(len(body) - 7))
    assert not kid.startswith("sk_")


# -- encode / decode ----------------------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    data = {"apiKey": "sk_pool_x-y_z", "blocks": "asia,europe", "empty": "", "email": "zoë@ex"}
    encoded = encode(data)
    assert set(encoded) == set(data)
    assert encoded["blocks"] == base64.b64encode(b"asia,europe").decode()
    assert all(isinstance(v, str) for v in encoded.values())
    assert decode(encoded) == data
    assert decode(None) == {}
    assert decode({}) == {}


# -- Secrets ------------------------------------------------------------------------------------

LIMITS = KeyLimits(rpm=60, tpm=100000, concurrency=4)


def key_data(api_key: str) -> dict[str, str]:
    return key_secret_data(
        api_key=api_key, kid=key_id(SUB_UID), pool="qwen3-8b", subscription="acme",
        customer_id="cus_acme", blocks=(Block.ASIA, Block.AMERICAS), limits=LIMITS,
        upstream="http://qwen3-8b-vllm.models.svc:8000", served_model_name="Qwen/Qwen3-8B",
        sub_phase="active", pool_phase="active")


def test_key_secret_data_fields() -> None:
    key = mint_key()
    data = key_data(key)
    # The fields gpupool.names documents for the key Secret.
    assert data == {
        "apiKey": key,
        "keyId": key_id(SUB_UID),
        "pool": "qwen3-8b",
        "subscription": "acme",
        "customerId": "cus_acme",
        "blocks": "asia,americas",
        "rpm": "60",
        "tpm": "100000",
        "concurrency": "4",
        "upstream": "http://qwen3-8b-vllm.models.svc:8000",
        "upstreamKeySecret": names.upstream_key_secret_name("qwen3-8b"),
        "servedModelName": "Qwen/Qwen3-8B",
        "subscriptionPhase": "active",
        "poolPhase": "active",
    }


def test_owner_reference() -> None:
    assert owner_reference("Subscription", "acme", SUB_UID) == {
        "apiVersion": "gpupool.dev/v1alpha1", "kind": "Subscription", "name": "acme",
        "uid": SUB_UID, "controller": True, "blockOwnerDeletion": True}


@pytest.mark.parametrize("gate", ["open", "closed"])
def test_key_secret(gate: str) -> None:
    key = mint_key()
    data = key_data(key)
    secret = build_key_secret(namespace="team-a", subscription="acme", subscription_uid=SUB_UID,
                              pool="qwen3-8b", gate=gate, data=data)
    assert secret["apiVersion"] == "v1"
    assert secret["kind"] == "Secret"
    assert secret["type"] == "Opaque"
    meta = secret["metadata"]
    assert isinstance(meta, dict)
    assert meta["name"] == names.key_secret_name("acme")
    assert meta["namespace"] == "team-a"
    assert meta["labels"] == {
        "app.kubernetes.io/managed-by": "gpupool",
        "gpupool.dev/pool": "qwen3-8b",
        "gpupool.dev/kind": "api-key",
        "gpupool.dev/subscription": "acme",
        "gpupool.dev/gate": gate,
    }
    assert meta["ownerReferences"] == [{
        "apiVersion": "gpupool.dev/v1alpha1", "kind": "Subscription", "name": "acme",
        "uid": SUB_UID, "controller": True, "blockOwnerDeletion": True}]
    assert decode(secret["data"]) == data  # type: ignore[arg-type]
    # The key lives only in the (base64) data, never in clear anywhere in the object.
    assert key not in json.dumps(meta)
    assert key not in json.dumps(secret)


def test_upstream_key_secret() -> None:
    key = mint_key()
    secret = build_upstream_key_secret(namespace="models", pool="qwen3-8b", pool_uid=POOL_UID,
                                       api_key=key)
    meta = secret["metadata"]
    assert isinstance(meta, dict)
    assert meta["name"] == names.upstream_key_secret_name("qwen3-8b")
    assert meta["namespace"] == "models"
    assert meta["labels"] == {"app.kubernetes.io/managed-by": "gpupool",
                              "gpupool.dev/pool": "qwen3-8b",
                              "gpupool.dev/kind": "upstream-key"}
    assert meta["ownerReferences"] == [owner_reference("Pool", "qwen3-8b", POOL_UID)]
    assert decode(secret["data"]) == {"apiKey": key}  # type: ignore[arg-type]
    assert key not in json.dumps(secret)


def test_open_keys_secret_lists_client_ids_to_keys() -> None:
    k1, k2 = mint_key(), mint_key()
    open_keys = {key_id("uid-1"): k1, key_id("uid-2"): k2}
    secret = build_open_keys_secret(namespace="models", pool="qwen3-8b", pool_uid=POOL_UID,
                                    open_keys=open_keys)
    meta = secret["metadata"]
    assert isinstance(meta, dict)
    assert meta["name"] == names.open_keys_secret_name("qwen3-8b")
    assert meta["labels"] == {"app.kubernetes.io/managed-by": "gpupool",
                              "gpupool.dev/pool": "qwen3-8b",
                              "gpupool.dev/kind": "open-keys"}
    assert meta["ownerReferences"] == [owner_reference("Pool", "qwen3-8b", POOL_UID)]
    assert decode(secret["data"]) == open_keys  # type: ignore[arg-type]
    assert k1 not in json.dumps(secret) and k2 not in json.dumps(secret)

    empty = build_open_keys_secret(namespace="models", pool="qwen3-8b", pool_uid=POOL_UID,
                                   open_keys={})
    assert empty["data"] == {}


def test_the_three_secrets_of_a_pool_have_distinct_names() -> None:
    built = [
        build_key_secret(namespace="ns", subscription="acme", subscription_uid=SUB_UID,
                         pool="p", gate="open", data={}),
        build_upstream_key_secret(namespace="ns", pool="p", pool_uid=POOL_UID, api_key="k"),
        build_open_keys_secret(namespace="ns", pool="p", pool_uid=POOL_UID, open_keys={}),
    ]
    got = [s["metadata"]["name"] for s in built]  # type: ignore[index]
    assert len(set(got)) == 3


def test_owned_by_subscription_reads_the_owner_reference_not_the_labels() -> None:
    secret = build_key_secret(namespace="ns", subscription="acme", subscription_uid=SUB_UID,
                              pool="qwen3-8b", gate="open", data=key_data(mint_key()))
    assert owned_by_subscription(secret) == "acme"
    labelled_only = {"metadata": {**secret["metadata"], "ownerReferences": []}}  # type: ignore[dict-item]
    assert owned_by_subscription(labelled_only) is None
    other_owner = {"metadata": {"ownerReferences": [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "acme", "uid": "u"},
        {"apiVersion": "example.com/v1", "kind": "Subscription", "name": "acme", "uid": "u"}]}}
    assert owned_by_subscription(other_owner) is None
