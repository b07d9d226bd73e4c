"""Deterministic names of everything gpupool creates: valid Kubernetes names (at most 63
characters), long names shortened with a stable hash, and no two kinds of Secret colliding."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gpupool import names

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
BUILDERS = (names.deployment_name, names.service_name, names.upstream_key_secret_name,
            names.open_keys_secret_name, names.key_secret_name)
SECRET_NAMES_OF_POOL = (names.upstream_key_secret_name, names.open_keys_secret_name)

# Kubernetes object names (DNS-1123 subdomains) of up to 253 characters; pools and
# subscriptions are named by people and by a backend, so long ones happen.
object_names = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,251}[a-z0-9])?\Z")


def test_short_names() -> None:
    assert names.deployment_name("qwen3-8b") == "qwen3-8b-vllm"
    assert names.service_name("qwen3-8b") == "qwen3-8b-vllm"
    assert names.upstream_key_secret_name("qwen3-8b").startswith("qwen3-8b-")
    assert names.open_keys_secret_name("qwen3-8b") == "qwen3-8b-open-keys"
    assert names.upstream_url("qwen3-8b", "models", 8000) == \
        "http://qwen3-8b-vllm.models.svc:8000"


def test_key_secret_name() -> None:
    # examples/subscriptions.yaml: each subscription gets a key Secret "<name>-key".
    assert names.key_secret_name("acme-americas") == "acme-americas-key"


def test_the_secrets_of_one_pool_have_distinct_names() -> None:
    got = {build("qwen3-8b") for build in SECRET_NAMES_OF_POOL}
    assert len(got) == len(SECRET_NAMES_OF_POOL)


@pytest.mark.parametrize("build", BUILDERS)
@settings(deadline=None)
@given(name=object_names)
def test_names_are_valid_deterministic_and_at_most_63(build: object, name: str) -> None:
    assert callable(build)
    got = build(name)
    assert got == build(name)
    assert len(got) <= 63
    assert SUBDOMAIN.match(got), got
    if name.replace(".", "") == name:
        assert DNS_LABEL.match(got), got


def test_long_names_are_hashed_and_keep_their_suffix() -> None:
    long = "a" * 60
    got = names.deployment_name(long)
    assert len(got) <= 63
    assert got.endswith("-vllm")
    assert got.startswith("a" * 20)
    assert got != f"{long}-vllm"[:63]


def test_long_names_that_share_a_prefix_stay_distinct() -> None:
    base = "customer-with-a-really-long-subscription-name-for-the-europe-block"
    a, b = names.key_secret_name(base + "-1"), names.key_secret_name(base + "-2")
    assert a != b
    assert len(a) <= 63 and len(b) <= 63


def test_exactly_at_the_limit_is_not_hashed() -> None:
    name = "p" * (63 - len("-vllm"))
    assert names.deployment_name(name) == f"{name}-vllm"
    assert names.deployment_name(name + "p") != f"{name}p-vllm"
    assert len(names.deployment_name(name + "p")) <= 63


def test_truncation_does_not_leave_a_dash_or_dot_before_the_hash() -> None:
    for filler in ("-", "."):
        name = "x" * 40 + filler * 30 + "y"
        got = names.key_secret_name(name)
        assert len(got) <= 63
        assert "--" not in got and ".-" not in got, got


def test_a_subscription_key_secret_never_takes_a_pools_secret_name() -> None:
    # A Subscription named "<pool>-upstream" must not get the pool's upstream-key Secret (the
    # internal vLLM key) as its key Secret, nor anything else the pool owns.
    pool = "qwen3-8b"
    for sub in (f"{pool}-upstream", f"{pool}-open", f"{pool}-open-keys", pool):
        assert names.key_secret_name(sub) not in {
            names.upstream_key_secret_name(pool), names.open_keys_secret_name(pool)}


@settings(deadline=None)
@given(pool=object_names, sub=object_names)
@example(pool="p", sub="p-upstream")
@example(pool="p", sub="p-open")
@example(pool="p" * 70, sub="p" * 70 + "-upstream")
def test_key_secret_names_never_collide_with_pool_secrets(pool: str, sub: str) -> None:
    key = names.key_secret_name(sub)
    for build in SECRET_NAMES_OF_POOL:
        assert key != build(pool)


@settings(deadline=None)
@given(a=object_names, b=object_names)
def test_distinct_subscriptions_get_distinct_key_secrets(a: str, b: str) -> None:
    if a != b:
        assert names.key_secret_name(a) != names.key_secret_name(b)


def test_labels() -> None:
    assert names.pool_labels("qwen3-8b") == {"app.kubernetes.io/managed-by": "gpupool",
                                             "gpupool.dev/pool": "qwen3-8b"}
    labels = names.pool_labels("p")
    labels["x"] = "y"
    assert "x" not in names.pool_labels("p")  # a fresh dict each time
    assert names.LABEL_KIND == "gpupool.dev/kind"
    assert names.FINALIZER.startswith("gpupool.dev/")
    assert names.ANNOTATION_APPROVED.startswith("gpupool.dev/")
    assert names.ANNOTATION_ROTATE.startswith("gpupool.dev/")
