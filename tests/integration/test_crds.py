"""The CRDs on a real API server: schema validation, printer columns, explain, first phases."""

from __future__ import annotations

import json
from typing import Any

import pytest

from support.objects import Objects, condition, kubectl, pool_body, sub_body

pytestmark = pytest.mark.integration


def _apply(cluster: Any, namespace: str, body: dict[str, Any],
           *flags: str) -> tuple[int, str]:
    result = kubectl(str(cluster.kubeconfig), "apply", "-n", namespace, *flags, "-f", "-",
                     input=json.dumps(body))
    return result.returncode, result.stdout + result.stderr


def _sub_with(**spec: Any) -> dict[str, Any]:
    body = sub_body("bad", "some-pool")
    body["spec"].update(spec)
    return body


@pytest.mark.parametrize(("body", "field"), [
    (_sub_with(quantity=0), "spec.quantity"),
    (_sub_with(quantity=21), "spec.quantity"),
    (_sub_with(blocks=["mars"]), "spec.blocks"),
    (_sub_with(billingCycle="week"), "spec.billingCycle"),
    (pool_body("bad-price", blocks={"asia": {"price": "12.345"}}), "spec.blocks.asia.price"),
    (pool_body("float-price", blocks={"asia": {"price": 12.5}}), "spec.blocks.asia.price"),
    (pool_body("bad-discount", annualDiscount="1.5"), "spec.annualDiscount"),
    ({**sub_body("no-ref", "p"), "spec": {"customer": {"id": "c"}, "blocks": ["asia"]}},
     "spec.poolRef"),
], ids=["quantity-0", "quantity-21", "block-mars", "cycle-week", "price-3-decimals",
        "price-float", "discount-1.5", "missing-poolRef"])
def test_invalid_objects_are_rejected_naming_the_field(cluster: Any, crds: Any, namespace: str,
                                                       body: dict[str, Any], field: str) -> None:
    # The API server's own answer (what any client gets) names the full path...
    code, output = _apply(cluster, namespace, body, "--validate=false")
    assert code != 0, f"accepted: {output}"
    assert field in output, output
    # ...and kubectl's default apply refuses it too, naming the field.
    code, output = _apply(cluster, namespace, body)
    assert code != 0, f"accepted: {output}"
    assert field.rsplit(".", 1)[-1] in output, output


def test_unknown_field_is_rejected_naming_it(cluster: Any, crds: Any, namespace: str) -> None:
    """kubectl validates against the published schema and refuses the typo by name. (A 1.20 API
    server itself prunes unknown fields from other clients; the README says so.)"""
    body = sub_body("typo", "some-pool")
    body["spec"]["quantitty"] = 2
    code, output = _apply(cluster, namespace, body)
    assert code != 0, output
    assert 'unknown field "quantitty"' in output, output


def test_valid_objects_are_accepted_and_night_is_allowed(cluster: Any, crds: Any,
                                                         namespace: str) -> None:
    code, output = _apply(cluster, namespace, pool_body("ok-pool", published=False))
    assert code == 0, output
    code, output = _apply(cluster, namespace, sub_body("ok-sub", "ok-pool", ["night", "europe"],
                                                       quantity=20))
    assert code == 0, output


def test_printer_columns_and_category(cluster: Any, objs: Objects, namespace: str) -> None:
    objs.create(pool_body("cols", activationThreshold=100))
    objs.create(sub_body("cols-sub", "cols", ["americas"], quantity=2))
    objs.wait_phase("subscriptions", "cols-sub", "pledged")
    out = kubectl(str(cluster.kubeconfig), "get", "pools,subscriptions", "-n", namespace,
                  check=True).stdout
    lines = out.splitlines()
    pool_header = next(line for line in lines if line.startswith("NAME") and "PLEDGED" in line)
    assert pool_header.split() == ["NAME", "PHASE", "PLEDGED", "TOTAL", "FROM", "READY", "AGE"]
    sub_header = next(line for line in lines if line.startswith("NAME") and "GATE" in line)
    assert sub_header.split() == ["NAME", "POOL", "BLOCKS", "QTY", "PHASE", "GATE", "AGE"]
    pool_row = next(line for line in lines if line.startswith("pool.gpupool.dev/cols "))
    assert pool_row.split()[1:5] == ["funding", "2", "30", "27.00"]
    by_category = kubectl(str(cluster.kubeconfig), "get", "gpupool", "-n", namespace,
                          check=True).stdout
    assert "pool.gpupool.dev/cols" in by_category
    assert "subscription.gpupool.dev/cols-sub" in by_category


def test_explain_teaches_the_fields(cluster: Any, crds: Any) -> None:
    from support.waiting import wait_for

    def explained() -> str | None:
        out = kubectl(str(cluster.kubeconfig), "explain", "subscription.spec.blocks")
        return out.stdout if out.returncode == 0 else None

    text = wait_for(explained, timeout=30, interval=0.5)
    assert "night" in text and "americas" in text and "Fixed once seats are held" in text


def test_published_pool_reaches_funding_with_conditions(objs: Objects) -> None:
    objs.create(pool_body("fund-me", activationThreshold=5))
    pool = objs.wait_phase("pools", "fund-me", "funding")
    status = pool["status"]
    assert status["observedGeneration"] == pool["metadata"]["generation"]
    funded = condition(pool, "Funded")
    assert funded is not None and funded["status"] == "False"
    assert funded["observedGeneration"] == pool["metadata"]["generation"]
    assert funded["lastTransitionTime"].endswith("Z")
    assert condition(pool, "Paused")["status"] == "False"  # type: ignore[index]
    assert status["totalSlots"] == 30 and status["pledgedSlots"] == 0
    assert status["minPricePerDay"] == "27.00"


def test_unpublished_pool_is_draft_and_paused_pool_is_paused(objs: Objects) -> None:
    objs.create(pool_body("drafty", published=False))
    objs.wait_phase("pools", "drafty", "draft")
    objs.patch("pools", "drafty", {"spec": {"published": True, "paused": True,
                                            "activationThreshold": 3}})
    pool = objs.wait_phase("pools", "drafty", "paused")
    assert condition(pool, "Paused")["status"] == "True"  # type: ignore[index]
    objs.patch("pools", "drafty", {"spec": {"paused": False}})
    pool = objs.wait_phase("pools", "drafty", "funding")
    assert pool["status"]["observedGeneration"] == pool["metadata"]["generation"]
