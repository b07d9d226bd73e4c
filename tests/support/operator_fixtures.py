"""Fixtures for tests that run the real operator: CRDs installed once, one shared operator
process, and a fresh namespace per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from support.kube import create_namespace, raw, unique_name
from support.objects import Objects, kubectl, pool_body
from support.operator import OperatorProcess
from support.waiting import WaitTimeout, wait_for

CRDS = Path(__file__).resolve().parents[2] / "crds"


@pytest.fixture(scope="session")
def crds(cluster: Any) -> Path:
    kc = str(cluster.kubeconfig)
    kubectl(kc, "apply", "-f", str(CRDS), check=True)
    kubectl(kc, "wait", "--for", "condition=established", "--timeout=60s",
            "crd/pools.gpupool.dev", "crd/subscriptions.gpupool.dev", check=True)
    return CRDS


@pytest.fixture(scope="session")
def operator(cluster: Any, kube: client.ApiClient, crds: Path) -> Iterator[OperatorProcess]:
    # Tests that run an operator of their own use namespaces named x-*; the shared one stays out.
    op = OperatorProcess(cluster.kubeconfig, name="operator-shared", namespaces=["!x-*"]).start()
    _probe_namespace_watch(kube)
    yield op
    op.stop()


def _probe_namespace_watch(kube: client.ApiClient) -> None:
    """Return once the shared operator serves namespaces created from now on.

    With a namespace glob, kopf (1.45) lists namespaces and then watches them, ignoring the
    watch's own initial listing, so a namespace created between the two (right after the
    operator reports healthy) is not served until it changes. A probe namespace is served
    either way: if it fell into that window, relabelling it (a MODIFIED event) gets it noticed.
    """
    ns = create_namespace(kube, unique_name("probe-ns-watch"), wait_ready=False)
    try:
        objs = Objects(kube, ns)
        objs.create(pool_body("probe", published=False))

        def served() -> bool:
            return objs.phase("pools", "probe") == "draft"
        try:
            wait_for(served, timeout=5)
        except WaitTimeout:
            raw(kube).request("PATCH", f"/api/v1/namespaces/{ns}",
                              body={"metadata": {"labels": {"gpupool.dev/probe": "seen"}}},
                              content_type="application/merge-patch+json")
            wait_for(served, timeout=30, message="the shared operator serves a new namespace")
    finally:
        raw(kube).request("DELETE", f"/api/v1/namespaces/{ns}")


def make_namespace(api_client: client.ApiClient, prefix: str = "t") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(api_client).create_namespace({"metadata": {"name": name}})
    return name


def _ignored_namespace(kube: client.ApiClient) -> Iterator[str]:
    """A namespace the shared operator ignores (its name starts with ``x-``), deleted after."""
    name = make_namespace(kube, "x")
    yield name
    client.CoreV1Api(kube).delete_namespace(name)


@pytest.fixture
def own_namespace(kube: client.ApiClient, crds: Path) -> Iterator[str]:
    """A namespace the shared operator ignores, for a test that runs an operator of its own."""
    yield from _ignored_namespace(kube)


@pytest.fixture
def second_namespace(kube: client.ApiClient, crds: Path) -> Iterator[str]:
    """Another namespace the shared operator ignores (an undisturbed twin, a foreign pool)."""
    yield from _ignored_namespace(kube)


@pytest.fixture
def objs(kube: client.ApiClient, namespace: str, operator: OperatorProcess) -> Objects:
    """Pools and subscriptions in a fresh namespace served by the shared operator."""
    return Objects(kube, namespace)


@pytest.fixture
def namespace(fresh_namespace: str) -> str:
    """A fresh namespace served by the shared operator."""
    return fresh_namespace
