"""The CRD schemas in ``crds/`` and the pydantic spec models are one contract (issue 2): the same
property names at every level, the same required fields, enums, bounds and patterns, the same
defaults where both declare one, and a description on every CRD property so ``kubectl explain``
teaches. Adding a field to one side only fails here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, Field, create_model

from gpupool.models import PoolSpec, Runtime, SubscriptionSpec

ROOT = Path(__file__).resolve().parents[2]
CRDS: dict[str, tuple[Path, type[BaseModel]]] = {
    "pools": (ROOT / "crds" / "pools.gpupool.dev.yaml", PoolSpec),
    "subscriptions": (ROOT / "crds" / "subscriptions.gpupool.dev.yaml", SubscriptionSpec),
}
# Validation keywords both sides can express; each must be present on both sides or neither.
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
          "pattern", "minItems", "maxItems", "minProperties", "maxProperties")
Schema = dict[str, Any]


def load_crd(path: Path) -> Schema:
    with path.open() as f:
        crd = yaml.safe_load(f)
    versions = crd["spec"]["versions"]
    assert [v["name"] for v in versions] == ["v1alpha1"]
    schema: Schema = versions[0]["schema"]["openAPIV3Schema"]
    return schema


def crd_schema(kind: str) -> Schema:
    return load_crd(CRDS[kind][0])


class ModelSchema:
    """A pydantic JSON schema with ``$ref`` and ``Optional`` (anyOf with null) resolved."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.root = model.model_json_schema(by_alias=True, mode="validation")
        self.defs: dict[str, Schema] = self.root.get("$defs", {})

    def resolve(self, node: Schema) -> Schema:
        node = dict(node)
        if "$ref" in node:
            target = self.defs[node.pop("$ref").rsplit("/", 1)[-1]]
            node = {**target, **node}
        if "anyOf" in node:
            options = [o for o in node["anyOf"] if o.get("type") != "null"]
            assert len(options) == 1, f"unsupported union: {node}"
            node = {**self.resolve(options[0]),
                    **{k: v for k, v in node.items() if k != "anyOf"}}
        if "const" in node and "enum" not in node:
            node["enum"] = [node["const"]]
        return node


def compare(crd: Schema, model: Schema, ms: ModelSchema, path: str, errors: list[str]) -> None:
    model = ms.resolve(model)

    crd_type, model_type = crd.get("type"), model.get("type")
    if crd_type != model_type:
        errors.append(f"{path}: CRD type {crd_type!r}, model type {model_type!r}")
        return

    if "default" in crd and "default" in model and crd["default"] != model["default"]:
        errors.append(f"{path}: CRD default {crd['default']!r}, model default "
                      f"{model['default']!r}")

    crd_enum, model_enum = crd.get("enum"), model.get("enum")
    if (crd_enum is None) != (model_enum is None) or (
            crd_enum is not None and sorted(crd_enum) != sorted(model_enum or [])):
        errors.append(f"{path}: CRD enum {crd_enum}, model enum {model_enum}")

    for key in BOUNDS:
        if crd.get(key) != model.get(key):
            errors.append(f"{path}: CRD {key} {crd.get(key)!r}, model {key} {model.get(key)!r}")

    if crd_type == "array":
        compare(crd.get("items", {}), model.get("items", {}), ms, f"{path}[]", errors)
        return
    if crd_type != "object":
        return

    if crd.get("x-kubernetes-preserve-unknown-fields"):
        # Free-form (core/v1 types the operator passes through): dict[str, Any] in the model.
        if model.get("additionalProperties") is not True or model.get("properties"):
            errors.append(f"{path}: free-form in the CRD but not dict[str, Any] in the model")
        return

    crd_props: Schema = crd.get("properties") or {}
    model_props: Schema = model.get("properties") or {}
    if crd_props or model_props:
        only_crd = sorted(set(crd_props) - set(model_props))
        only_model = sorted(set(model_props) - set(crd_props))
        if only_crd:
            errors.append(f"{path}: only in the CRD: {', '.join(only_crd)}")
        if only_model:
            errors.append(f"{path}: only in the model: {', '.join(only_model)}")
        crd_req, model_req = sorted(crd.get("required", [])), sorted(model.get("required", []))
        if crd_req != model_req:
            errors.append(f"{path}: CRD requires {crd_req}, model requires {model_req}")
        if model.get("additionalProperties") is not False:
            errors.append(f"{path}: the model does not refuse unknown fields")
        for name in sorted(set(crd_props) & set(model_props)):
            compare(crd_props[name], model_props[name], ms, f"{path}.{name}", errors)
        return

    # A map (additionalProperties) or an empty object.
    crd_values, model_values = crd.get("additionalProperties"), model.get("additionalProperties")
    if isinstance(crd_values, dict) and isinstance(model_values, dict):
        compare(crd_values, model_values, ms, f"{path}.*", errors)
    elif crd_values != model_values:
        errors.append(f"{path}: CRD additionalProperties {crd_values!r}, model "
                      f"{model_values!r}")


def differences(crd_spec: Schema, model: type[BaseModel]) -> list[str]:
    ms = ModelSchema(model)
    errors: list[str] = []
    compare(crd_spec, ms.root, ms, "spec", errors)
    return errors


def undescribed(node: Schema, path: str) -> list[str]:
    """CRD properties (at any depth, also inside items and maps) without a description."""
    out: list[str] = []
    for name, child in (node.get("properties") or {}).items():
        where = f"{path}.{name}"
        if name != "metadata" and not str(child.get("description", "")).strip():
            out.append(where)
        out.extend(undescribed(child, where))
    if isinstance(node.get("items"), dict):
        out.extend(undescribed(node["items"], f"{path}[]"))
    if isinstance(node.get("additionalProperties"), dict):
        out.extend(undescribed(node["additionalProperties"], f"{path}.*"))
    return out


# -- the real contract --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_crd_spec_and_model_agree(kind: str) -> None:
    _, model = CRDS[kind]
    assert differences(crd_schema(kind)["properties"]["spec"], model) == []


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_every_crd_property_is_described(kind: str) -> None:
    schema = crd_schema(kind)
    assert str(schema.get("description", "")).strip()
    assert undescribed(schema, kind) == []


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_crd_objects_are_structural(kind: str) -> None:
    """Every object in the CRD says what it holds: properties, a map type, or free-form."""
    def walk(node: Schema, path: str) -> list[str]:
        out = []
        if node.get("type") is None and not node.get("x-kubernetes-preserve-unknown-fields"):
            out.append(f"{path}: no type")
        for name, child in (node.get("properties") or {}).items():
            out.extend(walk(child, f"{path}.{name}"))
        if isinstance(node.get("items"), dict):
            out.extend(walk(node["items"], f"{path}[]"))
        if isinstance(node.get("additionalProperties"), dict):
            out.extend(walk(node["additionalProperties"], f"{path}.*"))
        return out

    spec = crd_schema(kind)["properties"]["spec"]
    assert walk(spec, "spec") == []


# -- the checker itself catches drift -----------------------------------------------------------


def test_a_field_only_in_the_crd_is_caught() -> None:
    spec = copy.deepcopy(crd_schema("pools")["properties"]["spec"])
    spec["properties"]["runtime"]["properties"]["newKnob"] = {
        "type": "integer", "description": "A knob the model does not know."}
    assert differences(spec, PoolSpec) == ["spec.runtime: only in the CRD: newKnob"]


def test_a_field_only_in_the_model_is_caught() -> None:
    runtime2 = create_model("Runtime", __base__=Runtime, new_knob=(int, 0))
    pool2 = create_model("PoolSpec", __base__=PoolSpec,
                         runtime=(runtime2, Field(default_factory=runtime2)))
    spec = crd_schema("pools")["properties"]["spec"]
    assert differences(spec, pool2) == ["spec.runtime: only in the model: newKnob"]


def test_a_changed_bound_enum_requirement_or_default_is_caught() -> None:
    spec = copy.deepcopy(crd_schema("subscriptions")["properties"]["spec"])
    props = spec["properties"]
    props["quantity"]["maximum"] = 50
    props["billingCycle"]["enum"] = ["month", "year", "week"]
    props["quantity"]["default"] = 2
    props["customer"]["required"] = []
    del props["poolRef"]["properties"]["name"]["minLength"]
    got = differences(spec, SubscriptionSpec)
    assert sorted(got) == sorted([
        "spec.billingCycle: CRD enum ['month', 'year', 'week'], model enum ['month', 'year']",
        "spec.customer: CRD requires [], model requires ['id']",
        "spec.poolRef.name: CRD minLength None, model minLength 1",
        "spec.quantity: CRD default 2, model default 1",
        "spec.quantity: CRD maximum 50, model maximum 20",
    ])


def test_a_missing_description_is_caught() -> None:
    schema = copy.deepcopy(crd_schema("pools"))
    del schema["properties"]["spec"]["properties"]["runtime"]["properties"]["port"][
        "description"]
    schema["properties"]["status"]["properties"]["seats"]["additionalProperties"][
        "properties"]["price"]["description"] = " "
    del schema["properties"]["spec"]["properties"]["blocks"]["properties"]["europe"][
        "description"]
    assert undescribed(schema, "pools") == ["pools.spec.blocks.europe",
                                            "pools.spec.runtime.port",
                                            "pools.status.seats.*.price"]


def test_a_free_form_field_typed_in_the_model_is_caught() -> None:
    spec = copy.deepcopy(crd_schema("pools")["properties"]["spec"])
    spec["properties"]["runtime"]["properties"]["nodeSelector"] = {
        "type": "object", "description": "x", "x-kubernetes-preserve-unknown-fields": True}
    assert differences(spec, PoolSpec) == [
        "spec.runtime.nodeSelector: free-form in the CRD but not dict[str, Any] in the model"]


def test_the_yaml_anchors_give_every_block_the_same_offer() -> None:
    blocks = crd_schema("pools")["properties"]["spec"]["properties"]["blocks"]["properties"]
    assert sorted(blocks) == ["americas", "asia", "europe"]
    shapes = [{k: v for k, v in offer.items() if k != "description"}
              for offer in blocks.values()]
    assert shapes[0] == shapes[1] == shapes[2]
    assert shapes[0]["required"] == ["price"]
