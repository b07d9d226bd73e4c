"""The spec models: camelCase on the wire, unknown fields refused, the issue-2 validation cases,
and errors that name the field as ``spec.x.y``."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from gpupool.blocks import Block
from gpupool.models import (
    PoolSpec,
    SubscriptionSpec,
    describe_validation_error,
    parse_pool_spec,
    parse_subscription_spec,
)

ROOT = Path(__file__).resolve().parents[2]


def pool(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"id": "Qwen/Qwen3-8B", "displayName": "Qwen3 8B",
                  "infraSpec": "1x L4 - 30 tok/s guaranteed"},
        "seats": 4,
        "blocks": {"asia": {"price": "27.00"}, "europe": {"price": "39.00"},
                   "americas": {"price": "39.00", "seats": 6}},
        "annualDiscount": "0.15",
        "activationThreshold": 6,
        "manualProvisioning": True,
        "published": True,
        "runtime": {"gpusPerReplica": 2, "extraArgs": ["--max-model-len=8192"],
                    "hfTokenSecretRef": {"name": "hf"}, "modelCache": {"claimName": "cache"},
                    "nodeSelector": {"gpu": "l4"}, "startupTimeoutSeconds": 900},
    }
    spec.update(overrides)
    return spec


def sub(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"poolRef": {"name": "qwen3-8b"}, "customer": {"id": "cus_acme"},
                            "blocks": ["americas"]}
    spec.update(overrides)
    return spec


def error_of(parse: Any, spec: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as err:
        parse(spec)
    return describe_validation_error(err.value)


# -- camelCase ----------------------------------------------------------------------------------


def test_pool_spec_reads_camel_case() -> None:
    p = parse_pool_spec(pool())
    assert p.model.display_name == "Qwen3 8B"
    assert p.model.infra_spec == "1x L4 - 30 tok/s guaranteed"
    assert p.annual_discount == "0.15"
    assert p.annual_discount_decimal == Decimal("0.15")
    assert p.activation_threshold == 6
    assert p.manual_provisioning is True
    assert p.runtime.gpus_per_replica == 2
    assert p.runtime.extra_args == ["--max-model-len=8192"]
    assert p.runtime.hf_token_secret_ref is not None
    assert p.runtime.hf_token_secret_ref.key == "token"
    assert p.runtime.model_cache is not None
    assert p.runtime.model_cache.claim_name == "cache"
    assert p.runtime.node_selector == {"gpu": "l4"}
    assert p.runtime.startup_timeout_seconds == 900


def test_dump_by_alias_is_camel_case() -> None:
    dumped = parse_pool_spec(pool()).model_dump(by_alias=True, exclude_none=True)
    assert {"annualDiscount", "reservationFee", "activationThreshold", "manualProvisioning"} \
        <= set(dumped)
    assert "gpusPerReplica" in dumped["runtime"]
    assert "startupTimeoutSeconds" in dumped["runtime"]
    assert not any("_" in k for k in dumped)
    assert not any("_" in k for k in dumped["runtime"])
    s = parse_subscription_spec(sub(billingCycle="year", cancelAtPeriodEnd=True))
    assert s.model_dump(by_alias=True) == {
        "poolRef": {"name": "qwen3-8b", "namespace": None},
        "customer": {"id": "cus_acme", "email": None},
        "blocks": ["americas"], "quantity": 1, "billingCycle": "year",
        "cancelAtPeriodEnd": True}


def test_defaults_follow_the_seeds() -> None:
    p = parse_pool_spec({"model": {"id": "m"}, "seats": 1,
                         "blocks": {"europe": {"price": "39.00"}}})
    assert p.reservation_fee == "1.00"  # "A $1 non-refundable reservation fee"
    assert p.annual_discount == "0"
    assert p.currency == "usd"
    assert (p.limits.rpm, p.limits.tpm) == (60, 100000)  # the seeds' rpmLimit / tpmLimit
    assert p.activation_threshold == 0
    assert p.published is False and p.paused is False and p.manual_provisioning is False
    s = parse_subscription_spec(sub())
    assert s.quantity == 1  # "quantity ... default 1"
    assert s.billing_cycle == "month"  # "billingCycle ... month (default)"
    assert s.cancel_at_period_end is False


def test_models_are_frozen() -> None:
    s = parse_subscription_spec(sub())
    with pytest.raises(ValidationError):
        setattr(s, "quantity", 2)  # noqa: B010


# -- capacity and prices ------------------------------------------------------------------------


def test_capacity_uses_the_block_override_else_the_pool_default() -> None:
    p = parse_pool_spec(pool())
    assert p.capacity() == {Block.ASIA: 4, Block.EUROPE: 4, Block.AMERICAS: 6}
    p0 = parse_pool_spec(pool(blocks={"asia": {"price": "1.00", "seats": 0},
                                      "americas": {"price": "2.00"}}))
    assert p0.capacity() == {Block.ASIA: 0, Block.AMERICAS: 4}  # 0 is an override, not "unset"
    assert Block.EUROPE not in p0.prices()


def test_prices_are_decimals() -> None:
    p = parse_pool_spec(pool())
    assert p.prices() == {Block.ASIA: Decimal("27.00"), Block.EUROPE: Decimal("39.00"),
                          Block.AMERICAS: Decimal("39.00")}
    assert all(isinstance(v, Decimal) for v in p.prices().values())


def test_the_examples_parse() -> None:
    with (ROOT / "examples" / "pool.yaml").open() as f:
        pools = [d for d in yaml.safe_load_all(f) if d]
    with (ROOT / "examples" / "subscriptions.yaml").open() as f:
        subs = [d for d in yaml.safe_load_all(f) if d]
    assert pools and subs
    for doc in pools:
        assert isinstance(parse_pool_spec(doc["spec"]), PoolSpec)
    for doc in subs:
        assert isinstance(parse_subscription_spec(doc["spec"]), SubscriptionSpec)


# -- subscription validation --------------------------------------------------------------------


def test_night_is_accepted_and_normalized() -> None:
    s = parse_subscription_spec(sub(blocks=["night", "europe", "americas"], quantity=2))
    assert s.blocks == ["night", "europe", "americas"]  # the spec is kept as written
    assert s.normalized_blocks() == (Block.ASIA, Block.EUROPE, Block.AMERICAS)
    s2 = parse_subscription_spec(sub(blocks=["americas", "asia", "night"]))
    assert s2.normalized_blocks() == (Block.ASIA, Block.AMERICAS)


@pytest.mark.parametrize("quantity", [1, 20])
def test_quantity_bounds_accepted(quantity: int) -> None:
    assert parse_subscription_spec(sub(quantity=quantity)).quantity == quantity


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"quantity": 0}, "spec.quantity"),
        ({"quantity": 21}, "spec.quantity"),
        ({"blocks": ["mars"]}, "spec.blocks"),
        ({"blocks": []}, "spec.blocks"),
        ({"billingCycle": "week"}, "spec.billingCycle"),
        ({"poolRef": {"name": ""}}, "spec.poolRef.name"),
        ({"poolRef": {"name": "p", "kind": "Pool"}}, "spec.poolRef.kind"),
        ({"customer": {}}, "spec.customer.id"),
        ({"seats": 3}, "spec.seats"),  # unknown field
        ({"cancel_at_period_end": "soon"}, "spec.cancel_at_period_end"),
    ],
)
def test_invalid_subscriptions_name_the_field(overrides: dict[str, Any], field: str) -> None:
    message = error_of(parse_subscription_spec, sub(**overrides))
    assert message.startswith(field + ":") or f"; {field}:" in message \
        or message.startswith(field + "."), message


def test_missing_pool_ref_names_the_field() -> None:
    spec = sub()
    del spec["poolRef"]
    message = error_of(parse_subscription_spec, spec)
    assert message.startswith("spec.poolRef:")
    assert "required" in message.lower()


def test_several_errors_are_all_named() -> None:
    message = error_of(parse_subscription_spec, sub(quantity=21, billingCycle="week", x=1))
    parts = message.split("; ")
    assert [p.split(":", 1)[0] for p in parts] == ["spec.quantity", "spec.billingCycle",
                                                     "spec.x"]


# -- pool validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"blocks": {"asia": {"price": "12.345"}}}, "spec.blocks.asia.price"),
        ({"blocks": {"asia": {"price": "-1.00"}}}, "spec.blocks.asia.price"),
        ({"blocks": {"asia": {"price": "012.00"}}}, "spec.blocks.asia.price"),
        ({"blocks": {"asia": {"price": 39.0}}}, "spec.blocks.asia.price"),  # floats: no
        ({"blocks": {"asia": {"price": "1.00", "seats": -1}}}, "spec.blocks.asia.seats"),
        ({"blocks": {"mars": {"price": "1.00"}}}, "spec.blocks.mars"),
        ({"blocks": {}}, "spec.blocks"),
        ({"blocks": {"asia": {}}}, "spec.blocks.asia.price"),
        ({"annualDiscount": "1"}, "spec.annualDiscount"),
        ({"annualDiscount": "0.15000"}, "spec.annualDiscount"),
        ({"annualDiscount": 0.15}, "spec.annualDiscount"),
        ({"reservationFee": "1.001"}, "spec.reservationFee"),
        ({"currency": "eur"}, "spec.currency"),
        ({"seats": 10001}, "spec.seats"),
        ({"activationThreshold": -1}, "spec.activationThreshold"),
        ({"limits": {"rpm": 0}}, "spec.limits.rpm"),
        ({"runtime": {"gpusPerReplica": 0}}, "spec.runtime.gpusPerReplica"),
        ({"runtime": {"replicas": 101}}, "spec.runtime.replicas"),
        ({"runtime": {"startupTimeoutSeconds": 59}}, "spec.runtime.startupTimeoutSeconds"),
        ({"runtime": {"unknown": 1}}, "spec.runtime.unknown"),
        ({"runtime": {"modelCache": {}}}, "spec.runtime.modelCache.claimName"),
        ({"model": {"id": ""}}, "spec.model.id"),
        ({"model": {"id": "m", "name": "x"}}, "spec.model.name"),
        ({"extra": True}, "spec.extra"),
    ],
)
def test_invalid_pools_name_the_field(overrides: dict[str, Any], field: str) -> None:
    message = error_of(parse_pool_spec, pool(**overrides))
    assert message.split(": ", 1)[0] == field, message


@pytest.mark.parametrize("price", ["0", "0.5", "27", "27.00", "9999999.99", "39.9"])
def test_prices_exact_to_the_cent_are_accepted(price: str) -> None:
    p = parse_pool_spec(pool(blocks={"asia": {"price": price}}))
    assert p.prices()[Block.ASIA] == Decimal(price)


@pytest.mark.parametrize("discount", ["0", "0.15", "0.9999", "0.5"])
def test_annual_discounts_accepted(discount: str) -> None:
    assert parse_pool_spec(pool(annualDiscount=discount)).annual_discount_decimal == \
        Decimal(discount)


def test_free_form_runtime_fields_pass_through() -> None:
    env = [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    affinity: dict[str, Any] = {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}}
    p = parse_pool_spec(pool(runtime={"env": env, "tolerations": tolerations,
                                      "affinity": affinity,
                                      "resources": {"limits": {"memory": "64Gi"}}}))
    assert p.runtime.env == env
    assert p.runtime.tolerations == tolerations
    assert p.runtime.affinity == affinity
    assert p.runtime.resources == {"limits": {"memory": "64Gi"}}


def test_describe_validation_error_of_other_exceptions_is_their_message() -> None:
    assert describe_validation_error(ValueError("unknown block 'mars'")) == \
        "unknown block 'mars'"
