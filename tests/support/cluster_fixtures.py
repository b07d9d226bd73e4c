"""Fixtures for the real local control plane (``gpupool.devcluster``).

- ``cluster`` (session): etcd + kube-apiserver + kube-controller-manager + kube-scheduler, two
  GPU nodes with 8 ``nvidia.com/gpu`` each, and the fake kubelet. Its work directory (logs,
  kubeconfig, pids) is kept under pytest's basetemp for a look after a failure.
- ``kube`` (session): a sync ``kubernetes.client.ApiClient`` with the admin token.
- ``kubelet``: the cluster's ``FakeKubelet``; hold/fail rules are released after each test.
- ``fresh_namespace``: a new namespace per test, deleted afterwards; returned only once its
  default ServiceAccount has its token Secret, so pods can be created in it straight away (until
  then 1.20's ServiceAccount admission rejects them).

Without the control-plane binaries (``scripts/build-control-plane.sh``) the fixtures skip, unless
``GPUPOOL_REQUIRE_CLUSTER=1``, where they fail.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

from gpupool.devcluster import FakeKubelet, LocalCluster, binaries_available
from support.kube import create_namespace, raw, unique_name

GPU_NODES = 2
GPUS_PER_NODE = 8


def require_control_plane() -> None:
    if binaries_available():
        return
    msg = ("control plane binaries missing (kube-apiserver etc. in $GPUPOOL_CACHE/k8s/bin, etcd "
           "and openssl on PATH): run scripts/build-control-plane.sh")
    if os.environ.get("GPUPOOL_REQUIRE_CLUSTER") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    require_control_plane()
    workdir = tmp_path_factory.mktemp("cluster")
    local = LocalCluster(workdir, gpu_nodes=GPU_NODES, gpus_per_node=GPUS_PER_NODE, kubelet=True)
    local.start()
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
def kube(cluster: LocalCluster) -> Iterator[Any]:
    with cluster.api_client() as api_client:
        yield api_client


@pytest.fixture
def kubelet(cluster: LocalCluster) -> Iterator[FakeKubelet]:
    fake = cluster.kubelet
    assert fake is not None, "the session cluster runs a fake kubelet"
    try:
        yield fake
    finally:
        fake.release()


@pytest.fixture
def fresh_namespace(kube: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    name = create_namespace(kube, unique_name(request.node.name, 30))
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            raw(kube).request("DELETE", f"/api/v1/namespaces/{name}")
