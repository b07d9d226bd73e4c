"""The local control plane itself: API server, controllers, scheduler, GPU nodes, fake kubelet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiException

from gpupool.devcluster import (
    FAKE_NODE_LABEL,
    FakeKubelet,
    LocalCluster,
    label_selector_predicate,
    pid_alive,
    read_pids,
)
from support.cluster_fixtures import require_control_plane
from support.kube import pod_is_ready, raw, service_account_token
from support.waiting import assert_stays, wait_for

GPU = "nvidia.com/gpu"


def pod_body(name: str, labels: dict[str, str] | None = None, gpus: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {"app": name}},
        "spec": {"containers": [{"name": "main", "image": "vllm/vllm-openai:v0",
                                 "resources": {"limits": {GPU: str(gpus)}}}]},
    }


def deployment_body(name: str, replicas: int, gpus: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "main", "image": "vllm/vllm-openai:v0",
                                         "resources": {"limits": {GPU: str(gpus)}}}]},
            },
        },
    }


def read_pod(kube: Any, namespace: str, name: str) -> dict[str, Any]:
    pod: dict[str, Any] = raw(kube).get(f"/api/v1/namespaces/{namespace}/pods/{name}")
    return pod


def create_pod(kube: Any, namespace: str, body: dict[str, Any]) -> Any:
    return raw(kube).request("POST", f"/api/v1/namespaces/{namespace}/pods", body=body)


def gone(fn: Any) -> bool:
    try:
        fn()
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


# ------------------------------------------------------------------------------------------
# no cluster needed


@pytest.mark.parametrize(("selector", "labels", "expected"), [
    ("app=a", {"app": "a"}, True),
    ("app==a,tier!=x", {"app": "a", "tier": "y"}, True),
    ("app=a,tier!=x", {"app": "a", "tier": "x"}, False),
    ("app in (a, b),!canary", {"app": "b"}, True),
    ("app in (a, b),!canary", {"app": "b", "canary": ""}, False),
    ("app notin (a),tier", {"app": "c", "tier": "1"}, True),
    ("app notin (a),tier", {"app": "c"}, False),
    ({"app": "a"}, {"app": "a", "x": "y"}, True),
])
def test_label_selector(selector: Any, labels: dict[str, str], expected: bool) -> None:
    assert label_selector_predicate(selector)(labels) is expected


# ------------------------------------------------------------------------------------------
# the session cluster


@pytest.mark.integration
def test_api_server_ready_with_gpu_nodes(cluster: LocalCluster, kube: Any) -> None:
    assert cluster.apiserver_ready()
    assert raw(kube).get("/version")["gitVersion"].startswith("v1.20.")
    assert cluster.server == f"https://127.0.0.1:{cluster.apiserver_port}"
    assert cluster.ca.is_file() and cluster.token

    nodes = raw(kube).get("/api/v1/nodes", labelSelector=f"{FAKE_NODE_LABEL}=true")["items"]
    assert len(nodes) == 2
    for node in nodes:
        assert node["status"]["allocatable"][GPU] == "8"
        assert node["status"]["capacity"][GPU] == "8"
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"
        assert not node["spec"].get("taints")

    # The kubeconfig on disk works on its own (the demo and kubectl use it).
    from kubernetes import config

    with config.new_client_from_config(str(cluster.kubeconfig)) as other:
        names = {ns["metadata"]["name"] for ns in raw(other).get("/api/v1/namespaces")["items"]}
    assert {"default", "kube-system"} <= names


@pytest.mark.integration
def test_deployment_pods_get_scheduled_and_ready(kube: Any, fresh_namespace: str) -> None:
    namespace = fresh_namespace
    api = raw(kube)
    ns_apps = f"/apis/apps/v1/namespaces/{namespace}"
    api.request("POST", f"{ns_apps}/deployments", body=deployment_body("web", replicas=2))

    def replica_set() -> Any:
        items = api.get(f"{ns_apps}/replicasets", labelSelector="app=web")["items"]
        owned = [rs for rs in items
                 if any(o["kind"] == "Deployment" and o["name"] == "web"
                        for o in rs["metadata"].get("ownerReferences") or [])]
        return owned[0] if owned else None

    rs = wait_for(replica_set, 30, message="ReplicaSet owned by the Deployment")

    def ready_pods() -> list[Any]:
        pods = api.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector="app=web")["items"]
        ready = [p for p in pods if pod_is_ready(p) and p["spec"].get("nodeName")
                 and p["status"].get("podIP")]
        return ready if len(ready) == 2 else []

    pods = wait_for(ready_pods, 60, message="two Running, Ready pods")
    for pod in pods:
        assert pod["metadata"]["ownerReferences"][0]["uid"] == rs["metadata"]["uid"]
        assert pod["spec"]["nodeName"].startswith("gpu-node-")
        assert pod["status"]["podIP"].startswith("10.244.")
        assert all(cs["ready"] for cs in pod["status"]["containerStatuses"])
    assert len({p["status"]["podIP"] for p in pods}) == 2

    wait_for(lambda: api.get(f"{ns_apps}/deployments/web")["status"].get("availableReplicas")
             == 2, 30, message="Deployment available")


@pytest.mark.integration
def test_pod_wanting_more_gpus_than_any_node_stays_pending(kube: Any,
                                                           fresh_namespace: str) -> None:
    namespace = fresh_namespace
    create_pod(kube, namespace, pod_body("huge", gpus=9))

    def unschedulable() -> Any:
        pod = read_pod(kube, namespace, "huge")
        for cond in pod["status"].get("conditions") or []:
            if cond["type"] == "PodScheduled" and cond.get("reason") == "Unschedulable":
                return cond
        return None

    cond = wait_for(unschedulable, 60, message="PodScheduled=False/Unschedulable")
    assert cond["status"] == "False"
    assert f"Insufficient {GPU}" in cond.get("message", "")
    pod = read_pod(kube, namespace, "huge")
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


@pytest.mark.integration
def test_garbage_collection_deletes_owned_objects(kube: Any, fresh_namespace: str) -> None:
    namespace = fresh_namespace
    api = raw(kube)
    ns_core, ns_apps = f"/api/v1/namespaces/{namespace}", f"/apis/apps/v1/namespaces/{namespace}"
    owner = api.request("POST", f"{ns_core}/configmaps",
                        body={"metadata": {"name": "owner"}, "data": {"a": "b"}})
    api.request("POST", f"{ns_core}/secrets", body={
        "metadata": {"name": "owned", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner["metadata"]["uid"]}]},
        "stringData": {"k": "v"}})
    api.request("DELETE", f"{ns_core}/configmaps/owner")
    wait_for(lambda: gone(lambda: api.get(f"{ns_core}/secrets/owned")), 60,
             message="owned Secret garbage-collected")

    # A Deployment's ReplicaSet and pods go too (the fake kubelet finishes the pod deletions).
    api.request("POST", f"{ns_apps}/deployments", body=deployment_body("gc", replicas=1))
    wait_for(lambda: [p for p in api.get(f"{ns_core}/pods", labelSelector="app=gc")["items"]
                      if pod_is_ready(p)], 60, message="gc pod ready")
    api.request("DELETE", f"{ns_apps}/deployments/gc",
                body={"apiVersion": "v1", "kind": "DeleteOptions",
                      "propagationPolicy": "Background"})
    wait_for(lambda: not api.get(f"{ns_apps}/replicasets")["items"]
             and not api.get(f"{ns_core}/pods", labelSelector="app=gc")["items"],
             60, message="ReplicaSet and pods deleted")


@pytest.mark.integration
def test_held_pods_stay_not_ready_until_released(kube: Any, fresh_namespace: str,
                                                 kubelet: FakeKubelet) -> None:
    namespace = fresh_namespace
    rule = kubelet.hold(selector="app=held", namespace=namespace)
    create_pod(kube, namespace, pod_body("held"))
    create_pod(kube, namespace, pod_body("control"))

    def held_by_kubelet() -> bool:
        pod = read_pod(kube, namespace, "held")
        states = [cs["state"] for cs in pod["status"].get("containerStatuses") or []]
        return bool(pod["spec"].get("nodeName")) and bool(states) and all(
            s.get("waiting", {}).get("reason") == "ContainerCreating" for s in states)

    wait_for(held_by_kubelet, 60, message="held pod bound and waiting in ContainerCreating")
    wait_for(lambda: pod_is_ready(read_pod(kube, namespace, "control")), 60,
             message="control pod ready")
    assert_stays(lambda: not pod_is_ready(read_pod(kube, namespace, "held")), 1.0,
                 message="held pod not ready")
    assert read_pod(kube, namespace, "held")["status"]["phase"] == "Pending"

    rule.release()
    wait_for(lambda: pod_is_ready(read_pod(kube, namespace, "held")), 30,
             message="held pod ready after release")


@pytest.mark.integration
def test_failed_and_unready_pods(kube: Any, fresh_namespace: str,
                                 kubelet: FakeKubelet) -> None:
    namespace = fresh_namespace
    kubelet.fail(name_prefix="crash-", namespace=namespace, reason="OOMKilled")
    create_pod(kube, namespace, pod_body("crash-1"))
    wait_for(lambda: read_pod(kube, namespace, "crash-1")["status"]["phase"] == "Failed", 60,
             message="pod Failed")
    pod = read_pod(kube, namespace, "crash-1")
    assert pod["status"]["reason"] == "OOMKilled"
    assert not pod_is_ready(pod)

    # A running pod that starts crash-looping, then recovers.
    create_pod(kube, namespace, pod_body("flaky", labels={"app": "flaky"}))
    wait_for(lambda: pod_is_ready(read_pod(kube, namespace, "flaky")), 60, message="flaky ready")
    rule = kubelet.fail(selector={"app": "flaky"}, namespace=namespace, mode="unready")
    pod = read_pod(kube, namespace, "flaky")  # fail() applies the rule before returning
    assert pod["status"]["phase"] == "Running" and not pod_is_ready(pod)
    assert pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == \
        "CrashLoopBackOff"
    rule.release()
    wait_for(lambda: pod_is_ready(read_pod(kube, namespace, "flaky")), 30,
             message="flaky ready again")


@pytest.mark.integration
def test_service_account_token_logs_in(cluster: LocalCluster, kube: Any,
                                       fresh_namespace: str) -> None:
    namespace = fresh_namespace
    api = raw(kube)
    api.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts",
                body={"metadata": {"name": "robot"}})
    token = service_account_token(kube, namespace, "robot")
    with cluster.api_client(token=token) as robot:
        with pytest.raises(ApiException) as denied:
            raw(robot).get(f"/api/v1/namespaces/{namespace}/configmaps")
        assert denied.value.status == 403  # authenticated, but RBAC says no
        assert f"system:serviceaccount:{namespace}:robot" in (denied.value.body or "")

        rbac = "/apis/rbac.authorization.k8s.io/v1"
        api.request("POST", f"{rbac}/namespaces/{namespace}/roles", body={
            "metadata": {"name": "read-cm"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                       "verbs": ["get", "list"]}]})
        api.request("POST", f"{rbac}/namespaces/{namespace}/rolebindings", body={
            "metadata": {"name": "read-cm"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": "read-cm"},
            "subjects": [{"kind": "ServiceAccount", "name": "robot",
                          "namespace": namespace}]})
        wait_for(lambda: raw(robot).get(f"/api/v1/namespaces/{namespace}/configmaps"), 30,
                 message="robot may list configmaps", ignore=(ApiException,))


# ------------------------------------------------------------------------------------------
# clusters of their own (start/stop behaviour)


@pytest.mark.integration
def test_apiserver_restart_keeps_state_and_kubelet_reconnects(tmp_path: Path) -> None:
    require_control_plane()
    with LocalCluster(tmp_path / "c", gpu_nodes=1, gpus_per_node=1, kubelet=True) as c, \
            c.api_client() as api_client:
        api = raw(api_client)
        api.request("POST", "/api/v1/namespaces/default/configmaps",
                    body={"metadata": {"name": "survivor"}, "data": {"x": "1"}})
        port = c.apiserver_port
        c.stop_apiserver()
        assert not c.apiserver_ready()
        c.start_apiserver()
        assert c.apiserver_port == port and c.apiserver_ready()
        assert api.get("/api/v1/namespaces/default/configmaps/survivor")["data"] == {"x": "1"}
        # The kubelet's watch broke with the API server; it must pick up new pods again.
        wait_for(lambda: api.get("/api/v1/namespaces/default/serviceaccounts/default")
                 .get("secrets"), 30, message="default SA token", ignore=(ApiException,))
        api.request("POST", "/api/v1/namespaces/default/pods", body=pod_body("after-restart"))
        wait_for(lambda: pod_is_ready(read_pod(api_client, "default", "after-restart")), 60,
                 message="pod ready after the API server restart")
        assert c.kubelet is not None and c.kubelet.running


@pytest.mark.integration
def test_stop_kills_every_pid_and_start_kills_stale_ones(tmp_path: Path) -> None:
    require_control_plane()
    workdir = tmp_path / "c"
    crashed = LocalCluster(workdir)
    second = LocalCluster(workdir)
    try:
        crashed.start()
        first_pids = read_pids(crashed.pids_file)
        assert {r.name for r in first_pids} == {"etcd", "kube-apiserver",
                                                 "kube-controller-manager", "kube-scheduler"}
        assert all(r.alive() for r in first_pids)

        # As if the first run had crashed without stop(): a new start() on the same workdir
        # kills what the pids file lists.
        second.start()
        assert not any(r.alive() for r in first_pids)
        second_pids = read_pids(second.pids_file)
        assert second_pids and {r.pid for r in second_pids}.isdisjoint(
            {r.pid for r in first_pids})
        assert all(r.alive() for r in second_pids)

        second.stop()
        assert not any(pid_alive(r.pid) for r in read_pids(workdir / "pids"))
        assert not any(pid_alive(pid) for pid in second.pids())
    finally:
        second.stop()
        crashed.stop()  # reaps its (already killed) children
