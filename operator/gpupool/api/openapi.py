"""The OpenAPI 3.1 document of ``gpupool api`` (served at ``/openapi.json``)."""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from gpupool import __version__
from gpupool.api import schemas

Obj = dict[str, Any]
REF = "#/components/schemas/{model}"

ERRORS = {
    400: "Bad request (the message says what is wrong)",
    401: "Missing, malformed or unknown management key",
    402: "Payment failed",
    404: "Not found (or not yours)",
    409: "Conflict with the pool's or subscription's state (e.g. the pool is full)",
}


def _ref(name: str) -> Obj:
    return {"$ref": REF.format(model=name)}


def _json(schema: Obj, description: str) -> Obj:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _op(op_id: str, summary: str, description: str, ok: dict[int, tuple[str, str]],
        errors: tuple[int, ...], body: Obj | None = None, pool_param: bool = True) -> Obj:
    responses: Obj = {str(code): _json(_ref(schema), text) for code, (schema, text) in ok.items()}
    for code in (*errors, 401):
        responses[str(code)] = _json(_ref("Error"), ERRORS[code])
    op: Obj = {"operationId": op_id, "summary": summary, "description": description,
               "responses": dict(sorted(responses.items())), "tags": ["pools" if pool_param
                                                                      else "keys"]}
    if pool_param:
        op["parameters"] = [{"name": "id", "in": "path", "required": True,
                             "description": "The pool's id (UUID) or slug",
                             "schema": {"type": "string", "minLength": 1},
                             "examples": {"slug": {"value": "minimax-m3"}}}]
    if body is not None:
        op["requestBody"] = body
    return op


@cache
def _document() -> Obj:
    _, defs = models_json_schema([(m, "validation") for m in schemas.MODELS],
                                 ref_template=REF)
    components: Obj = dict(defs.get("$defs", {}))
    for name, schema in (
        schemas.envelope("PoolList", {"type": "array", "items": _ref("PoolSummary")},
                         "Pools that are not drafts"),
        schemas.envelope("PoolResult", _ref("PoolDetail"), "One pool with its hour slots"),
        schemas.envelope("SubscriptionResult", _ref("Subscription"), "One subscription"),
        schemas.envelope("SubscriptionList", {"type": "array", "items": _ref("Subscription")},
                         "Your subscriptions on the pool, newest first"),
        schemas.envelope("KeyResult", _ref("Key"), "One API key"),
        schemas.envelope("KeyList", {"type": "array", "items": _ref("Key")},
                         "Your API keys on the pool"),
        schemas.envelope("NewKeyResult", _ref("KeyWithPool"), "The subscription's API key"),
        schemas.envelope("CancelResult", _ref("Canceled"), "Canceled"),
    ):
        components[name] = schema

    subscribe_body = {"required": True, "content": {"application/json": {
        "schema": _ref("SubscribeBody"),
        "examples": {
            "one block": {"value": {"blocks": ["americas"]}},
            "all blocks, 2 seats, yearly": {"value": {"blocks": ["night", "europe", "americas"],
                                                      "quantity": 2, "billingCycle": "year"}}}}}}
    key_body = {"required": False, "content": {"application/json": {
        "schema": _ref("KeyBody"), "examples": {"newest": {"value": {}}}}}}

    paths: Obj = {
        "/api/pools": {"get": _op(
            "listPools", "List pools", "Every pool that is not a draft.",
            {200: ("PoolList", "The pools")}, (), pool_param=False)},
        "/api/pools/{id}": {"get": _op(
            "getPool", "Get a pool", "Full pool info including every hour slot; :id is the "
            "UUID or the slug.", {200: ("PoolResult", "The pool")}, (404,))},
        "/api/pools/{id}/subscribe": {"post": _op(
            "subscribe", "Subscribe to blocks",
            "Reserve quantity seats in each block. Waits for the operator's decision: "
            "pledged (pool funding; the reservation fee is charged), active (charged; with the "
            "key on funded pools, key null on pools that open active: create it with POST "
            "/api/keys/subscription), pending_key (manual provisioning). 202 with status "
            "pending when the operator has not decided in time (see my-subscriptions).",
            {201: ("SubscriptionResult", "Subscribed"),
             202: ("SubscriptionResult", "Accepted; the operator has not decided yet")},
            (400, 402, 404, 409), body=subscribe_body)},
        "/api/pools/{id}/my-subscriptions": {"get": _op(
            "mySubscriptions", "Your subscriptions on a pool", "Newest first.",
            {200: ("SubscriptionList", "Your subscriptions")}, (404,))},
        "/api/pools/{id}/my-pledge": {"get": _op(
            "myPledge", "Your current subscription on a pool",
            "The newest one that is not canceled (else the newest).",
            {200: ("SubscriptionResult", "Your pledge")}, (404,))},
        "/api/pools/{id}/my-keys": {"get": _op(
            "myKeys", "Your API keys on a pool", "One per subscription with a key.",
            {200: ("KeyList", "Your keys")}, (404,))},
        "/api/pools/{id}/my-key": {"get": _op(
            "myKey", "Your API key on a pool", "The key of your current subscription.",
            {200: ("KeyResult", "Your key")}, (404,))},
        "/api/pools/{id}/pledge": {"delete": _op(
            "cancelPledge", "Cancel your newest subscription on a pool",
            "A pledge (or a subscription not yet decided) is canceled at once and its seats "
            "freed; an active one is canceled at the end of the paid period (the key works "
            "until currentPeriodEnd). No refund.",
            {200: ("CancelResult", "Canceled")}, (404,))},
        "/api/keys/subscription": {"post": _op(
            "createSubscriptionKey", "Create your API key",
            "Reveals the API key of an active subscription (your newest active one, or "
            "subscriptionId). Calling it again returns the same key.",
            {200: ("NewKeyResult", "The key (created earlier)"),
             201: ("NewKeyResult", "The key (created now)")},
            (400, 402, 404, 409), body=key_body, pool_param=False)},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "gpupool API", "version": __version__,
                 "description": "Seats on shared GPU model pools by UTC block: asia (alias "
                                "night) 00:00-07:59, europe 08:00-15:59, americas 16:00-23:59. "
                                "Every answer is {\"success\": true, \"data\": ...} or "
                                "{\"success\": false, \"error\": \"...\"}; money is a "
                                "two-decimal string (USD)."},
        "paths": paths,
        "components": {"schemas": dict(sorted(components.items())),
                       "securitySchemes": {"managementKey": {
                           "type": "http", "scheme": "bearer", "bearerFormat": "mk_...",
                           "description": "A management key (gpupool api create-key)"}}},
        "security": [{"managementKey": []}],
    }


def document() -> Obj:
    """A fresh copy of the document (callers may change theirs)."""
    return copy.deepcopy(_document())
