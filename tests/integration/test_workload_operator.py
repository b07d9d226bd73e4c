"""A Pool's vLLM workload on the real control plane, driven by the real operator: activation as
pledges reach the threshold and the stand-in kubelet marks pods Ready, unschedulable pods, pause
and resume, spec roll-outs and refused args, garbage collection, and block-aware scaling across
a UTC boundary under faketime."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpupool import names
from gpupool.blocks import block_at
from gpupool.devcluster import FAKE_NODE_LABEL, FakeKubelet
from gpupool.workload import SPEC_HASH_ANNOTATION, selector_labels
from support.clock import ShiftedClock
from support.kube import raw, wait_for_default_service_account
from support.objects import GROUP, VERSION, Objects, condition, pool_body, sub_body
from support.operator import OperatorProcess
from support.waiting import assert_stays, wait_for

pytestmark = pytest.mark.integration

Obj = dict[str, Any]
ALL_DAY = ["asia", "europe", "americas"]


# --- reading what the operator made ---------------------------------------------------------


def _read(objs: Objects, path: str) -> Obj | None:
    try:
        result: Obj = raw(objs.api.api_client).get(path)
        return result
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _deployment(objs: Objects, pool: str) -> Obj | None:
    return _read(objs, f"/apis/apps/v1/namespaces/{objs.ns}/deployments/"
                       f"{names.deployment_name(pool)}")


def _replicas(objs: Objects, pool: str) -> int | None:
    dep = _deployment(objs, pool)
    return None if dep is None else int(dep["spec"].get("replicas", 0))


def _container(dep: Obj) -> Obj:
    containers: list[Obj] = dep["spec"]["template"]["spec"]["containers"]
    return containers[0]


def _pods(objs: Objects, pool: str) -> list[Obj]:
    selector = ",".join(f"{k}={v}" for k, v in selector_labels(pool).items())
    items: list[Obj] = raw(objs.api.api_client).get(
        f"/api/v1/namespaces/{objs.ns}/pods", labelSelector=selector)["items"]
    return items


def _status(objs: Objects, pool: str) -> Obj:
    status: Obj = objs.pool(pool).get("status") or {}
    return status


def _cond(objs: Objects, pool: str, type_: str) -> Obj:
    return condition(objs.pool(pool), type_) or {}


def _gate(objs: Objects, sub: str) -> str | None:
    return (objs.sub(sub).get("status") or {}).get("gate")


def _describe(objs: Objects, pool: str) -> str:
    status = _status(objs, pool)
    dep = _deployment(objs, pool) or {}
    return (f"pool {pool}: phase {status.get('phase')}, replicas {status.get('replicas')}, "
            f"conditions {status.get('conditions')}; deployment spec.replicas "
            f"{(dep.get('spec') or {}).get('replicas')}, status {dep.get('status')}")


def _serving(objs: Objects, pool: str, replicas: int = 1) -> bool:
    """Active, Available, with ``replicas`` ready and the Deployment asking for as many."""
    status = _status(objs, pool)
    return (status.get("phase") == "active"
            and status.get("replicas") == {"desired": replicas, "ready": replicas}
            and _cond(objs, pool, "Available").get("status") == "True"
            and _replicas(objs, pool) == replicas)


def _wait_serving(objs: Objects, pool: str, replicas: int = 1, timeout: float = 60) -> None:
    wait_for(lambda: _serving(objs, pool, replicas), timeout=timeout,
             message=lambda: _describe(objs, pool))


# --- on the shared operator -----------------------------------------------------------------


def test_funding_activating_active_as_pledges_reach_the_threshold(
        objs: Objects, kubelet: FakeKubelet) -> None:
    held = kubelet.hold(namespace=objs.ns)  # the pods "pull the image" until released
    objs.create(pool_body("fund", seats=4, activationThreshold=2))
    objs.create(sub_body("first", "fund", ["europe"]))
    objs.wait_phase("subscriptions", "first", "pledged")
    wait_for(lambda: _status(objs, "fund").get("pledgedSlots") == 1, timeout=30)
    status = _status(objs, "fund")
    assert status["phase"] == "funding"
    assert status["replicas"] == {"desired": 0, "ready": 0}
    assert _cond(objs, "fund", "Funded")["status"] == "False"
    assert _replicas(objs, "fund") in (None, 0), "a funding pool runs no GPUs"

    objs.create(sub_body("second", "fund", ["americas"]))
    objs.wait_phase("pools", "fund", "activating")
    wait_for(lambda: len(_pods(objs, "fund")) == 1 and _replicas(objs, "fund") == 1,
             timeout=30, message=lambda: _describe(objs, "fund"))
    wait_for(lambda: _status(objs, "fund").get("replicas") == {"desired": 1, "ready": 0},
             timeout=30, message=lambda: _describe(objs, "fund"))
    available = _cond(objs, "fund", "Available")
    assert available["status"] == "False", available
    assert available["reason"] == "WaitingForReplicas", available
    assert _cond(objs, "fund", "Progressing")["status"] == "True"
    assert _cond(objs, "fund", "Funded")["status"] == "True"
    assert objs.pool("fund")["status"]["pledgedSlots"] == 2
    # The pool is not serving yet: its pledges stay pledges (the second one's own status follows
    # the ledger that admitted it a moment later).
    objs.wait_phase("subscriptions", "second", "pledged")
    assert objs.phase("subscriptions", "first") == "pledged"
    assert objs.phase("pools", "fund") == "activating"

    held.release()
    _wait_serving(objs, "fund")
    status = _status(objs, "fund")
    assert status["activatedAt"]
    assert _cond(objs, "fund", "Available")["reason"] == "MinimumReplicasAvailable"
    progressing = _cond(objs, "fund", "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "ReplicasReady")
    for name in ("first", "second"):
        sub = objs.wait_phase("subscriptions", name, "active", timeout=30)
        assert objs.secret_data(sub["status"]["keySecretName"]) is not None
    assert "Activated" in {e.reason for e in objs.events("fund")}


def test_more_gpus_than_any_node_has_stays_activating_unschedulable(objs: Objects) -> None:
    objs.create(pool_body("huge", runtime={"gpusPerReplica": 16}))

    def unschedulable() -> Obj | None:
        cond = _cond(objs, "huge", "Available")
        return cond if cond.get("reason") == "Unschedulable" else None
    available = wait_for(unschedulable, timeout=30, message=lambda: _describe(objs, "huge"))
    assert available["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in available["message"], available
    progressing = _cond(objs, "huge", "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "Unschedulable")
    assert progressing["message"] == available["message"]
    dep = _deployment(objs, "huge")
    assert dep is not None and dep["spec"]["replicas"] == 1
    assert _container(dep)["resources"]["limits"]["nvidia.com/gpu"] == "16"
    assert_stays(lambda: objs.phase("pools", "huge") == "activating", duration=1.0,
                 interval=0.25)
    assert _status(objs, "huge")["replicas"] == {"desired": 1, "ready": 0}

    # Asking for what a node has rolls out, and the pool activates.
    objs.patch("pools", "huge", {"spec": {"runtime": {"gpusPerReplica": 2}}})
    _wait_serving(objs, "huge")
    assert _cond(objs, "huge", "Available")["reason"] == "MinimumReplicasAvailable"
    dep = _deployment(objs, "huge")
    assert dep is not None
    assert _container(dep)["resources"]["limits"]["nvidia.com/gpu"] == "2"
    args = _container(dep)["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"


def test_pause_scales_to_zero_and_closes_keys_resume_restores(objs: Objects) -> None:
    objs.create(pool_body("pausy", seats=2))
    objs.create(sub_body("allday", "pausy", ALL_DAY))
    objs.wait_phase("subscriptions", "allday", "active", timeout=60)
    _wait_serving(objs, "pausy")
    wait_for(lambda: _gate(objs, "allday") == "open", timeout=15)

    objs.patch("pools", "pausy", {"spec": {"paused": True}})

    def paused() -> bool:
        status = _status(objs, "pausy")
        return (status.get("phase") == "paused" and _replicas(objs, "pausy") == 0
                and status.get("replicas") == {"desired": 0, "ready": 0}
                and _gate(objs, "allday") == "closed")
    wait_for(paused, timeout=30, message=lambda: _describe(objs, "pausy"))
    assert _cond(objs, "pausy", "Paused")["status"] == "True"
    assert _cond(objs, "pausy", "Available")["status"] == "False"
    wait_for(lambda: not _pods(objs, "pausy"), timeout=30, message="paused pool's pods gone")
    assert objs.phase("subscriptions", "allday") == "active"  # paused, not canceled

    objs.patch("pools", "pausy", {"spec": {"paused": False}})
    _wait_serving(objs, "pausy")
    assert _cond(objs, "pausy", "Paused")["status"] == "False"
    wait_for(lambda: _gate(objs, "allday") == "open", timeout=15)


def test_spec_change_rolls_out_and_owned_args_are_refused(objs: Objects) -> None:
    placement = {"nodeSelector": {FAKE_NODE_LABEL: "true"},
                 "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                  "effect": "NoSchedule"}]}
    objs.create(pool_body("rolling", runtime={"extraArgs": ["--max-model-len", "4096"],
                                              **placement}))
    _wait_serving(objs, "rolling")
    before = _deployment(objs, "rolling")
    assert before is not None
    assert _container(before)["args"][-2:] == ["--max-model-len", "4096"]
    assert before["spec"]["template"]["spec"]["nodeSelector"] == placement["nodeSelector"]
    assert before["spec"]["template"]["spec"]["tolerations"] == placement["tolerations"]
    old_pods = {p["metadata"]["uid"] for p in _pods(objs, "rolling")}
    assert len(old_pods) == 1

    new_args = ["--max-model-len", "8192", "--enable-prefix-caching"]
    new_image = "vllm/vllm-openai:v0.11.1"
    # New args and image; the node selector and tolerations are taken out of the spec.
    pool = objs.patch("pools", "rolling",
                      {"spec": {"runtime": {"extraArgs": new_args, "image": new_image,
                                            "nodeSelector": None, "tolerations": None}}})

    def rolled_out() -> Obj | None:
        dep = _deployment(objs, "rolling")
        if dep is None:
            return None
        st = dep.get("status") or {}
        pods = _pods(objs, "rolling")
        done = (_container(dep)["args"][-3:] == new_args and _container(dep)["image"] == new_image
                and st.get("observedGeneration") == dep["metadata"]["generation"]
                and st.get("updatedReplicas") == 1 and st.get("readyReplicas") == 1
                and len(pods) == 1 and pods[0]["metadata"]["uid"] not in old_pods
                and pods[0]["spec"]["containers"][0]["image"] == new_image)
        return dep if done else None
    dep = wait_for(rolled_out, timeout=60, message=lambda: _describe(objs, "rolling"))
    assert dep["metadata"]["generation"] > before["metadata"]["generation"]
    template = dep["spec"]["template"]
    assert "nodeSelector" not in template["spec"], "a removed nodeSelector stays on the pods"
    assert "tolerations" not in template["spec"], "removed tolerations stay on the pods"
    pod_hash = template["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    assert pod_hash != before["spec"]["template"]["metadata"]["annotations"][
        SPEC_HASH_ANNOTATION]
    # The Deployment's own copy of the hash says which spec it runs.
    assert dep["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == pod_hash
    wait_for(lambda: _serving(objs, "rolling")
             and _status(objs, "rolling").get("observedGeneration")
             == pool["metadata"]["generation"], timeout=30,
             message=lambda: _describe(objs, "rolling"))
    assert _cond(objs, "rolling", "Ready")["status"] == "True"

    # An arg the operator owns: the spec is refused and the workload keeps running as it was.
    pool = objs.patch("pools", "rolling",
                      {"spec": {"runtime": {"extraArgs": ["--port", "9000"]}}})

    def refused() -> Obj | None:
        cond = _cond(objs, "rolling", "Ready")
        return cond if (cond.get("reason") == "OwnedArgs" and cond.get("observedGeneration")
                        == pool["metadata"]["generation"]) else None
    ready = wait_for(refused, timeout=30, message=lambda: _describe(objs, "rolling"))
    assert ready["status"] == "False"
    assert "spec.runtime.extraArgs" in ready["message"] and "--port" in ready["message"]
    after = _deployment(objs, "rolling")
    assert after is not None
    assert after["metadata"]["generation"] == dep["metadata"]["generation"]
    assert _container(after)["args"] == _container(dep)["args"]
    assert "9000" not in _container(after)["args"]
    assert _serving(objs, "rolling"), _describe(objs, "rolling")

    # A refused spec freezes the pod template, not the replicas: pausing still frees the GPUs.
    objs.patch("pools", "rolling", {"spec": {"paused": True}})
    wait_for(lambda: objs.phase("pools", "rolling") == "paused"
             and _replicas(objs, "rolling") == 0 and not _pods(objs, "rolling"), timeout=30,
             message=lambda: _describe(objs, "rolling"))
    paused = _deployment(objs, "rolling")
    assert paused is not None and _container(paused)["args"] == _container(dep)["args"]
    assert _status(objs, "rolling")["replicas"] == {"desired": 0, "ready": 0}


# --- block-aware scaling, on an operator of its own with a shifted clock -------------------

WARMUP = 8  # seconds; long enough to tell "WARMUP before the boundary" from "at it"
SETUP_BUDGET = 10  # seconds the operator and the objects get to come up before that


def test_block_aware_scaling_across_a_boundary(
        cluster: Any, kube: client.ApiClient, own_namespace: str) -> None:
    wait_for_default_service_account(kube, own_namespace)
    # The shifted clock starts WARMUP + SETUP_BUDGET seconds before a boundary. The block that
    # ends there is "current"; the one starting there is "next"; the block after is unsold.
    clock = ShiftedClock(lead=WARMUP + SETUP_BUDGET)
    current = block_at(clock.shifted_now())
    upcoming = block_at(clock.boundary)
    assert current != upcoming
    op = OperatorProcess(cluster.kubeconfig, name="operator-scaling", faketime=clock.faketime,
                         namespaces=[own_namespace]).start()
    objs = Objects(kube, own_namespace)
    try:
        runtime = {"seatsPerReplica": 1, "warmupSeconds": WARMUP}
        # "rising": 1 seat now, 2 in the next block -> 1 replica, 2 from WARMUP before it.
        objs.create(sub_body("now-one", "rising", [current.value]))
        objs.create(sub_body("next-two", "rising", [upcoming.value], quantity=2))
        # "ending": 1 seat now, nothing next -> 1 replica, 0 at the boundary.
        objs.create(sub_body("now-only", "ending", [current.value]))
        objs.create(pool_body("rising", seats=4, runtime=runtime))
        objs.create(pool_body("ending", seats=4, runtime=runtime))
        for name in ("now-one", "next-two", "now-only"):
            objs.wait_phase("subscriptions", name, "active", timeout=30)
        _wait_serving(objs, "rising", 1, timeout=30)
        _wait_serving(objs, "ending", 1, timeout=30)
        lead = clock.seconds_to_boundary()
        assert lead > WARMUP + 1, f"setup took too long: only {lead:.1f}s left to the boundary"

        def scaled_up() -> float | None:
            if _replicas(objs, "rising") == 2:
                return clock.seconds_to_boundary()
            return None
        at = wait_for(scaled_up, timeout=lead - WARMUP + 5, interval=0.1,
                      message=lambda: _describe(objs, "rising"))
        assert abs(at - WARMUP) <= 2.0, (
            f"scaled up {at:.2f}s before the boundary; expected about {WARMUP}s")
        assert _replicas(objs, "ending") == 1, "the ending block still has its replica"
        _wait_serving(objs, "rising", 2, timeout=15)

        def scaled_down() -> float | None:
            if _replicas(objs, "ending") == 0:
                return clock.seconds_to_boundary()
            return None
        at = wait_for(scaled_down, timeout=clock.seconds_to_boundary() + 5, interval=0.1,
                      message=lambda: _describe(objs, "ending"))
        assert -2.0 <= at <= 0.05, f"scaled to 0 {-at:.2f}s after the boundary"
        wait_for(lambda: _status(objs, "ending").get("replicas") == {"desired": 0, "ready": 0}
                 and not _pods(objs, "ending"), timeout=15,
                 message=lambda: _describe(objs, "ending"))
        assert objs.phase("pools", "ending") == "active", "an unsold block is not a pause"
        assert _replicas(objs, "rising") == 2, "the next block's demand holds after it starts"
        assert _status(objs, "rising")["phase"] == "active"
    finally:
        op.stop()


# Last in the file: on a control plane started moments ago the garbage collector may not watch
# Pools yet (it rediscovers resources every 30 s), which delays the collection, not its outcome.
def test_deleting_the_pool_removes_its_children(objs: Objects) -> None:
    objs.create(pool_body("doomed", seats=2))
    objs.create(sub_body("holder", "doomed", ALL_DAY))
    objs.wait_phase("subscriptions", "holder", "active", timeout=60)
    _wait_serving(objs, "doomed")
    uid = objs.pool("doomed")["metadata"]["uid"]
    ns = objs.ns
    children = {
        "deployment": f"/apis/apps/v1/namespaces/{ns}/deployments/"
                      f"{names.deployment_name('doomed')}",
        "service": f"/api/v1/namespaces/{ns}/services/{names.service_name('doomed')}",
        "upstream-key secret": f"/api/v1/namespaces/{ns}/secrets/"
                               f"{names.upstream_key_secret_name('doomed')}",
        "open-keys secret": f"/api/v1/namespaces/{ns}/secrets/"
                            f"{names.open_keys_secret_name('doomed')}",
    }
    for what, path in children.items():
        obj = wait_for(lambda p=path: _read(objs, p), timeout=15, message=f"{what} exists")
        owners = {(o["kind"], o["uid"]) for o in obj["metadata"].get("ownerReferences") or []}
        assert ("Pool", uid) in owners, f"{what} is not owned by the pool: {owners}"

    objs.delete("pools", "doomed")

    def remaining() -> list[str]:
        left = [what for what, path in children.items() if _read(objs, path) is not None]
        return left + [f"pod {p['metadata']['name']}" for p in _pods(objs, "doomed")]
    wait_for(lambda: objs.get("pools", "doomed") is None and not remaining(), timeout=60,
             message=lambda: f"children of the deleted pool gone (left: {remaining()})")


def test_a_deployment_of_the_same_name_that_is_not_the_pools_is_left_alone(
        objs: Objects) -> None:
    """A Deployment already named ``<pool>-vllm`` (someone's own vLLM, say) is not taken over:
    the pool says so (Ready=False, NameTaken) and waits; once it is gone the pool makes its own."""
    name = names.deployment_name("taken")
    labels = {"app": "someone-elses"}
    foreign: Obj = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}}}
    apps = client.AppsV1Api(objs.api.api_client)
    apps.create_namespaced_deployment(objs.ns, foreign)
    objs.create(pool_body("taken", seats=1))

    ready = wait_for(lambda: (c := _cond(objs, "taken", "Ready")).get("reason") == "NameTaken"
                     and c, timeout=30, message=lambda: _describe(objs, "taken"))
    assert ready["status"] == "False" and name in ready["message"]
    assert _status(objs, "taken")["phase"] != "active"
    dep = _deployment(objs, "taken") or {}
    assert dep["metadata"].get("ownerReferences") is None
    assert dep["metadata"]["labels"] == labels and dep["spec"]["replicas"] == 0
    assert _container(dep)["image"] == "example/app:1"

    apps.delete_namespaced_deployment(name, objs.ns)
    _wait_serving(objs, "taken", timeout=90)
    assert _cond(objs, "taken", "Ready")["reason"] == "SpecValid"
    owners = {o["kind"] for o in (_deployment(objs, "taken") or {})["metadata"]["ownerReferences"]}
    assert owners == {"Pool"}


def test_a_pool_deleted_with_cascade_orphan_and_applied_again_adopts_its_workload(
        objs: Objects) -> None:
    """``kubectl delete pool --cascade=orphan`` keeps the Deployment (without owner); the Pool
    applied again takes that same Deployment over instead of refusing it or making another."""
    objs.create(pool_body("again", seats=1))
    _wait_serving(objs, "again")
    before = _deployment(objs, "again") or {}
    client.CustomObjectsApi(objs.api.api_client).delete_namespaced_custom_object(
        GROUP, VERSION, objs.ns, "pools", "again", propagation_policy="Orphan")
    wait_for(lambda: objs.get("pools", "again") is None
             and not (_deployment(objs, "again") or {}).get("metadata", {}).get(
                 "ownerReferences"), timeout=30, message="pool gone, its Deployment orphaned")

    objs.create(pool_body("again", seats=1))
    _wait_serving(objs, "again")
    after = _deployment(objs, "again") or {}
    assert after["metadata"]["uid"] == before["metadata"]["uid"], "adopted, not made anew"
    owners = {(o["kind"], o["uid"]) for o in after["metadata"]["ownerReferences"]}
    assert owners == {("Pool", objs.pool("again")["metadata"]["uid"])}
    assert _cond(objs, "again", "Ready")["reason"] == "SpecValid"
