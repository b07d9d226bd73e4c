"""Which existing objects the operator treats as a parent's child (``gpupool.ownership``)."""

from __future__ import annotations

from typing import Any

import pytest

from gpupool import names
from gpupool.keys import owner_reference
from gpupool.ownership import NotOurs, Owner, is_child

OURS = {**names.MANAGED_BY, names.LABEL_POOL: "qwen"}


def obj(labels: dict[str, str] | None = None, owners: list[dict[str, Any]] | None = None
        ) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "qwen-vllm", "labels": labels or {}}
    if owners is not None:
        meta["ownerReferences"] = owners
    return {"metadata": meta}


@pytest.mark.parametrize(("case", "body", "child"), [
    ("owned by the pool", obj(OURS, [owner_reference("Pool", "qwen", "u1")]), True),
    ("owned by an earlier pool of that name", obj({}, [owner_reference("Pool", "qwen", "u0")]),
     True),
    ("owned by another pool", obj(OURS, [owner_reference("Pool", "other", "u2")]), False),
    ("orphan with gpupool's labels", obj(OURS), True),
    ("orphan with gpupool's labels for another pool",
     obj({**OURS, names.LABEL_POOL: "other"}), False),
    ("orphan without the managed-by label", obj({names.LABEL_POOL: "qwen"}), False),
    ("someone's own, unlabelled", obj({"app": "vllm"}), False),
    ("gpupool's labels but another controller",
     obj(OURS, [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x", "uid": "u",
                 "controller": True}]), False),
    ("gpupool's labels and a non-controller owner",
     obj(OURS, [{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u"}]), True),
])
def test_is_child(case: str, body: dict[str, Any], child: bool) -> None:
    assert is_child(body, Owner.pool("qwen")) is child, case


def test_a_subscription_key_secret_orphan_is_matched_by_the_subscription_label() -> None:
    labels = {**names.MANAGED_BY, names.LABEL_SUBSCRIPTION: "acme", names.LABEL_POOL: "qwen"}
    assert is_child(obj(labels), Owner.subscription("acme"))
    assert not is_child(obj(labels), Owner.subscription("other"))


def test_not_ours_names_the_object_and_what_to_do() -> None:
    message = str(NotOurs("Deployment", "ns", "qwen-vllm", Owner.pool("qwen")))
    assert message == ("Deployment ns/qwen-vllm exists and was not made for this Pool; "
                       "rename or delete it")
