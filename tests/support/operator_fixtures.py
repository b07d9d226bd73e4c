"""Fixtures for tests that run the real operator: CRDs installed once, one shared operator
process, and a fresh namespace per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from support.objects import Objects, kubectl
from support.operator import OperatorProcess

CRDS = Path(__file__).resolve().parents[2] / "crds"


@pytest.fixture(scope="session")
def crds(cluster: Any) -> Path:
    kc = str(cluster.kubeconfig)
    kubectl(kc, "apply", "-f", str(CRDS), check=True)
    kubectl(kc, "wait", "--for", "condition=established", "--timeout=60s",
            "crd/pools.gpupool.dev", "crd/subscriptions.gpupool.dev", check=True)
    return CRDS


@pytest.fixture(scope="session")
def operator(cluster: Any, crds: Path) -> Iterator[OperatorProcess]:
    # Tests that run an operator of their own use namespaces named x-*; the shared one stays out.
    op = OperatorProcess(cluster.kubeconfig, name="operator-shared", namespaces=["!x-*"]).start()
    yield op
    op.stop()


def make_namespace(api_client: client.ApiClient, prefix: str = "t") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(api_client).create_namespace({"metadata": {"name": name}})
    return name


@pytest.fixture
def own_namespace(kube: client.ApiClient, crds: Path) -> Iterator[str]:
    """A namespace the shared operator ignores, for a test that runs an operator of its own."""
    name = make_namespace(kube, "x")
    yield name
    client.CoreV1Api(kube).delete_namespace(name)


@pytest.fixture
def objs(kube: client.ApiClient, namespace: str, operator: OperatorProcess) -> Objects:
    """Pools and subscriptions in a fresh namespace served by the shared operator."""
    return Objects(kube, namespace)


@pytest.fixture
def namespace(fresh_namespace: str) -> str:
    """A fresh namespace served by the shared operator."""
    return fresh_namespace
