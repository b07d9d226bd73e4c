"""The OpenAPI document of ``gpupool api``: complete (every route, every answer), loadable, and
agreeing with the seeds' examples."""

from __future__ import annotations

import json
import subprocess
import sys

import schemathesis
from starlette.routing import Route

from gpupool.api.app import Api
from gpupool.api.openapi import document

PUBLIC = {"/openapi.json", "/healthz", "/readyz"}


def test_every_route_is_documented_with_its_method() -> None:
    app = Api(backend=None).app()  # type: ignore[arg-type]
    routes = {(r.path, m.lower()) for r in app.routes if isinstance(r, Route)
              for m in (r.methods or ()) if m != "HEAD" and r.path not in PUBLIC}
    doc = document()
    documented = {(p, m) for p, item in doc["paths"].items() for m in item}
    assert routes == documented


def test_every_operation_documents_401_and_json_answers() -> None:
    doc = document()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert "401" in op["responses"], (method, path)
            assert any(code.startswith("2") for code in op["responses"]), (method, path)
            for code, resp in op["responses"].items():
                assert "application/json" in resp["content"], (method, path, code)
    assert doc["security"] == [{"managementKey": []}]
    assert doc["components"]["securitySchemes"]["managementKey"]["scheme"] == "bearer"


def test_schemathesis_loads_it() -> None:
    schema = schemathesis.openapi.from_dict(document())
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) == 9


def test_the_cli_prints_it() -> None:
    out = subprocess.run([sys.executable, "-m", "gpupool", "api", "openapi"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    assert json.loads(out) == json.loads(json.dumps(document()))


def test_money_and_statuses_as_the_seeds() -> None:
    schemas = document()["components"]["schemas"]
    assert schemas["Subscription"]["properties"]["status"]["enum"] == [
        "pending", "pledged", "pending_key", "active", "past_due", "canceled"]
    assert schemas["PoolSummary"]["properties"]["status"]["enum"] == [
        "funding", "activating", "active", "paused"]
    assert schemas["PoolSummary"]["properties"]["minPricePerDay"]["pattern"] == \
        r"^[0-9]+\.[0-9]{2}$"
    assert schemas["SubscribeBody"]["properties"]["blocks"]["items"]["enum"] == [
        "asia", "europe", "americas", "night"]
    assert schemas["SubscribeBody"]["properties"]["quantity"]["maximum"] == 20
