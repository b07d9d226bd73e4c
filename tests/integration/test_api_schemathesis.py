"""schemathesis against the OpenAPI document ``gpupool api`` serves (``/openapi.json``), on a live
stack (real API server, the shared operator): for every operation, generated requests (valid and
invalid bodies, odd ids) get no server error, and every answer conforms to the document (status
codes, content type, response schemas) -- schemathesis' default checks.

Per operation, valid (positive) and invalid (negative) requests; for the pool paths both with any id
at all and with the id pinned to a real, active pool (so subscribe, my-subscriptions, my-pledge,
my-keys, my-key and pledge run their real logic on generated bodies). Runtime is bounded by
``MAX_EXAMPLES`` per test. Failure reports are redacted: no
key or management key reaches the test output (schemathesis also filters Authorization).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from kubernetes import client
from schemathesis import GenerationMode

from gpupool.api.openapi import document
from gpupool.devcluster import LocalCluster
from support.api import ApiProcess, create_management_key, redact, scoped_kubeconfig
from support.objects import Objects, pool_body
from support.waiting import wait_for

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 25
POOL = "minimax-m3"


class Served:
    def __init__(self, api: ApiProcess, key: str) -> None:
        self.api = api
        self.key = key

    def __repr__(self) -> str:
        return f"Served({self.api.url})"


@pytest.fixture(scope="module")
def served(cluster: LocalCluster, kube: client.ApiClient, operator: Any,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One namespace for the whole module: an active pool, a funding pool, a manual one; the API
    with the chart's rules; one customer's management key."""
    from support.kube import create_namespace, raw, unique_name

    ns = create_namespace(kube, unique_name("api-schemathesis", 30))
    objs = Objects(kube, ns)
    objs.create(pool_body(POOL, seats=20))
    objs.create(pool_body("funding-pool", seats=5, activationThreshold=1000))
    objs.create(pool_body("manual-pool", seats=5, manualProvisioning=True))
    for name, phase in ((POOL, "active"), ("funding-pool", "funding"), ("manual-pool", "active")):
        objs.wait_phase("pools", name, phase, timeout=60)
    tmp = tmp_path_factory.mktemp("api-schemathesis")
    api = ApiProcess(scoped_kubeconfig(cluster, kube, ns, tmp / "api.kubeconfig"), ns,
                     "schemathesis", decision_timeout=15).start()
    key = create_management_key(cluster.kubeconfig, ns, "cus_schemathesis")
    # Something to find on every path: a subscription with a key asked for.
    wait_for(lambda: _subscribe(api, key), timeout=30, message="a first subscription")
    try:
        yield Served(api, key)
    finally:
        api.stop()
        raw(kube).request("DELETE", f"/api/v1/namespaces/{ns}")


def _subscribe(api: ApiProcess, key: str) -> bool:
    import httpx

    auth = {"Authorization": f"Bearer {key}"}
    r = httpx.post(f"{api.url}/api/pools/{POOL}/subscribe", json={"blocks": ["europe"]},
                   headers=auth, timeout=30)
    if r.status_code != 201:
        return False
    return httpx.post(f"{api.url}/api/keys/subscription", headers=auth,
                      timeout=30).status_code in (200, 201)


# schemathesis' pytest loader (``from_fixture``/``parametrize``) does not run under pytest 9
# (it reads ``request.node._nodeid``), so each operation gets its own hypothesis test here, built
# from schemathesis' strategies: one per operation, generation mode and pool id.
OPERATIONS = [(method.upper(), path) for path, item in document()["paths"].items()
              for method in item]
CASES = [(method, path, mode, pinned) for method, path in OPERATIONS
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         for pinned in ((False, True) if "{id}" in path else (False,))]


@pytest.fixture(scope="module")
def api_schema(served: Served) -> Any:
    return schemathesis.openapi.from_url(f"{served.api.url}/openapi.json")


@pytest.mark.parametrize(("method", "path", "mode", "pinned"), CASES,
                         ids=[f"{m} {p} {g.value}{' pool' if i else ''}"
                              for m, p, g, i in CASES])
def test_openapi_document_holds(api_schema: Any, served: Served, method: str, path: str,
                                mode: GenerationMode, pinned: bool) -> None:
    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=mode,
                                     path_parameters={"id": POOL} if pinned else None)
    auth = {"Authorization": f"Bearer {served.key}"}

    @given(case=strategy)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def holds(case: Any) -> None:
        case.call_and_validate(headers=auth, timeout=60)

    try:
        holds()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # schemathesis' report (a FailureGroup), without any key in it
        report = "".join(traceback.format_exception(exc))
        raise AssertionError(redact(report)) from None


def test_document_is_served_without_a_key(served: Served) -> None:
    import httpx

    doc = httpx.get(f"{served.api.url}/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {
        "/api/pools", "/api/pools/{id}", "/api/pools/{id}/subscribe",
        "/api/pools/{id}/my-subscriptions", "/api/pools/{id}/my-pledge",
        "/api/pools/{id}/my-keys", "/api/pools/{id}/my-key", "/api/pools/{id}/pledge",
        "/api/keys/subscription"}
