"""``gpupool.api.mgmt_keys``: management keys, their Secrets and the Authorization header."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from gpupool import names
from gpupool.api import mgmt_keys


def test_minted_keys_are_unique_and_shaped() -> None:
    minted = {mgmt_keys.mint() for _ in range(200)}
    assert len(minted) == 200
    for key in minted:
        assert mgmt_keys.SHAPE.match(key) and len(key) == 3 + 43


def test_secret_holds_the_digest_not_the_key() -> None:
    key = mgmt_keys.mint()
    body = mgmt_keys.build_secret(key, namespace="shop", customer_id="cus_1", email="a@b.c")
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert body["metadata"]["name"] == f"gpupool-mk-{digest[:20]}" == mgmt_keys.secret_name(key)
    assert body["metadata"]["labels"][names.LABEL_KIND] == "management-key"
    data = {k: base64.b64decode(v).decode() for k, v in body["data"].items()}
    assert data["sha256"] == digest and data["customerId"] == "cus_1"
    assert data["keyId"] == f"mkid_{digest[:16]}" and data["email"] == "a@b.c"
    text = json.dumps(body)
    assert key not in text and key[3:] not in text
    assert base64.b64encode(key.encode()).decode() not in text


def test_customer_of() -> None:
    key = mgmt_keys.mint()
    secret = mgmt_keys.build_secret(key, namespace="shop", customer_id="cus_1")
    customer = mgmt_keys.customer_of(secret, key)
    assert customer == mgmt_keys.Customer(id="cus_1", key_id=mgmt_keys.key_id_of_digest(
        mgmt_keys.digest(key)), email=None)
    assert mgmt_keys.customer_of(secret, mgmt_keys.mint()) is None  # another key's record
    assert mgmt_keys.customer_of(None, key) is None
    unlabelled = {**secret, "metadata": {**secret["metadata"], "labels": {}}}
    assert mgmt_keys.customer_of(unlabelled, key) is None
    nobody = mgmt_keys.build_secret(key, namespace="shop", customer_id=" ")
    assert mgmt_keys.customer_of(nobody, key) is None


@pytest.mark.parametrize("header", [
    "Basic dXNlcjpwYXNz", "Bearer", "Bearer sk_pool_" + "a" * 43, "Bearer mk_short",
    "Bearer mk_" + "!" * 43, "Token mk_" + "a" * 43, "mk_" + "a" * 43,
    "Bearer mk_" + "a" * 43 + " extra"])
def test_malformed_headers(header: str) -> None:
    with pytest.raises(mgmt_keys.Malformed):
        mgmt_keys.bearer(header)


def test_bearer() -> None:
    key = mgmt_keys.mint()
    assert mgmt_keys.bearer(f"Bearer {key}") == key
    assert mgmt_keys.bearer(f"bearer  {key} ") == key
    with pytest.raises(mgmt_keys.Malformed, match="missing"):
        mgmt_keys.bearer(None)
