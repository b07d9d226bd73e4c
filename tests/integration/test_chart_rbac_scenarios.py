"""The operator, run on the chart's own ServiceAccount token, does its whole job and nothing more.

``helm install`` puts the chart into the real local control plane watching one ``x-…``
namespace (the shared test operator leaves those alone). The operator ServiceAccount's token
(1.20 auto-creates its Secret) goes into a kubeconfig, and the real operator runs as a local
process with it: a Pool funds, pledges reach its threshold, the vLLM Deployment comes up and is
Available (the fake kubelet marks pods Ready), the pool goes active, subscriptions go active with
key Secrets, the pool's open-keys Secret lists the open keys, deleting a Subscription frees its
seats through the finalizer, the pool's Service exists and Events are posted -- with not one
``403``/``Forbidden`` in the operator's log. That runs with the chart's Roles
(``watchNamespaces``) and with its ClusterRoles (the default), and once more on a control plane
of its own that enforces owner-reference permissions (OwnerReferencesPermissionEnforcement, as
OpenShift does), where the chart's ``pools/finalizers`` rule is shown to be what makes it work.
The same token is then shown to be no broader than the chart's README says: no Secrets outside
the watched namespace, no CRD deletion, no RBAC. The gateway's key source, on the gateway
ServiceAccount's token (list and watch, no get), lists a key Secret and sees the next one arrive.

The customer's side (creating Pools and Subscriptions, reading key Secrets to check them) uses the
admin client, as the platform's backend would use its own rights.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from test_chart import (
    CRDS,
    OPERATOR_CLUSTER,
    OPERATOR_NAMESPACED,
    Release,
    _helm_path,
    api_status,
    crd_path,
    exists,
    rules_review,
)

from gpupool import keys, names
from gpupool.devcluster import FakeKubelet, LocalCluster, RawApi, service_account_token
from gpupool.gateway.keys import KeyStore
from gpupool.gateway.kube import KubernetesKeySource
from support.cluster_fixtures import require_control_plane
from support.kube import create_namespace, unique_name, wait_for_default_service_account
from support.objects import Objects, condition, pool_body, sub_body
from support.operator import OperatorProcess
from support.waiting import wait_for

pytestmark = pytest.mark.integration

Obj = dict[str, Any]
ALL_DAY = ["asia", "europe", "americas"]
RBAC = "/apis/rbac.authorization.k8s.io/v1"

# A refused request, however the operator or kopf words it: "(403)", "status=403", "403 Forbidden",
# "... is forbidden: User ... cannot ...", and kopf's "Not enough permissions to list namespaces"
# (it falls back and carries on, naming no status). Neither a log timestamp's milliseconds
# (",403") nor a "403" inside a name, uid or key id counts.
DENIED = re.compile(r"(?<![\w,.-])403(?!\w)|forbidden|not enough (rbac )?permissions",
                    re.IGNORECASE)


@pytest.fixture
def helm_bin() -> Path:
    path = _helm_path()
    if not path.is_file():
        pytest.fail(f"helm not found at {path}: run `bash scripts/get-helm.sh`", pytrace=False)
    return path


@pytest.fixture
def admin(cluster: LocalCluster) -> Iterator[RawApi]:
    api_client = cluster.api_client()
    try:
        yield RawApi(api_client)
    finally:
        api_client.close()


@dataclass
class Installed:
    release: Release
    watched: str
    token: str = field(repr=False)  # never printed, not even in a failure's locals
    mode: str = "roles"

    @property
    def operator_sa(self) -> str:
        return f"{self.release.fullname}-operator"


@pytest.fixture
def installed(request: pytest.FixtureRequest, helm_bin: Path, cluster: LocalCluster,
              kube: client.ApiClient, admin: RawApi, own_namespace: str,
              tmp_path: Path) -> Iterator[Installed]:
    """The chart installed watching ``own_namespace``, and its operator's token.

    Indirect parameter ``"roles"`` (the default): ``watchNamespaces: [own_namespace]``, a Role
    there. ``"cluster"``: the chart's default values, ClusterRoles for every namespace.
    """
    mode = getattr(request, "param", "roles")
    rel = Release(helm_bin, cluster, admin)
    try:
        # Pods in the namespace need its default ServiceAccount's token Secret first (1.20).
        wait_for_default_service_account(kube, own_namespace)
        if mode == "roles":
            rel.install("-f", rel.values(tmp_path, {"watchNamespaces": [own_namespace]}))
        else:
            rel.install()
        token = service_account_token(kube, rel.namespace, f"{rel.fullname}-operator")
        yield Installed(rel, own_namespace, token, mode)
    finally:
        rel.cleanup()


def _read(api: RawApi, path: str) -> Obj | None:
    try:
        result: Obj = api.get(path)
        return result
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _status(objs: Objects, name: str, plural: str = "pools") -> Obj:
    obj = objs.get(plural, name) or {}
    status: Obj = obj.get("status") or {}
    return status


def _describe(objs: Objects, api: RawApi, pool: str) -> str:
    status = _status(objs, pool)
    dep = _read(api, f"/apis/apps/v1/namespaces/{objs.ns}/deployments/"
                     f"{names.deployment_name(pool)}") or {}
    subs = {s["metadata"]["name"]: (s.get("status") or {}).get("phase")
            for s in objs.list_subs()}
    return (f"pool {pool}: phase {status.get('phase')}, pledgedSlots "
            f"{status.get('pledgedSlots')}, replicas {status.get('replicas')}, conditions "
            f"{status.get('conditions')}; deployment status {dep.get('status')}; subs {subs}")


def _denied_lines(op: OperatorProcess) -> list[str]:
    return [line[:300] for line in op.log_text().splitlines() if DENIED.search(line)]


def _run_scenarios(objs: Objects, admin: RawApi, pool: str, op: OperatorProcess,
                   describe: Callable[[], str]) -> None:
    """The ledger/workload/keys scenarios, as the operator at ``op`` serves ``objs.ns``."""
    ns = objs.ns
    # Funding: seats 2 per block; 2 all-day seats (6 seat-blocks) start the workload.
    objs.create(pool_body(pool, seats=2, activationThreshold=6))
    objs.wait_phase("pools", pool, "funding", timeout=30)
    objs.create(sub_body("first", pool, ALL_DAY))
    objs.wait_phase("subscriptions", "first", "pledged", timeout=30)
    wait_for(lambda: _status(objs, pool).get("pledgedSlots") == 3, timeout=30,
             message=describe)
    assert _status(objs, pool)["phase"] == "funding"
    dep_path = f"/apis/apps/v1/namespaces/{ns}/deployments/{names.deployment_name(pool)}"
    funding = _read(admin, dep_path)
    assert funding is None or funding["spec"]["replicas"] == 0, "a funding pool runs no GPUs"

    # The pledges reach the threshold: the vLLM Deployment is made and becomes Available.
    objs.create(sub_body("second", pool, ALL_DAY))

    def available() -> Obj | None:
        dep = _read(admin, dep_path)
        conds = {c["type"]: c["status"] for c in ((dep or {}).get("status") or {})
                 .get("conditions") or []}
        return dep if conds.get("Available") == "True" and (
            (dep or {}).get("status") or {}).get("readyReplicas") == 1 else None
    dep = wait_for(available, timeout=60, message=describe)
    assert dep is not None and dep["spec"]["replicas"] == 1
    pool_obj = objs.wait_phase("pools", pool, "active", timeout=60)
    assert pool_obj["status"]["pledgedSlots"] == 6
    assert pool_obj["status"]["activatedAt"]
    assert (condition(pool_obj, "Available") or {}).get("status") == "True"
    uid = pool_obj["metadata"]["uid"]

    # The pool's Service, and the upstream-key Secret vLLM is started with, owned by the pool.
    for what, path in (("service", f"/api/v1/namespaces/{ns}/services/"
                                    f"{names.service_name(pool)}"),
                       ("upstream-key secret", f"/api/v1/namespaces/{ns}/secrets/"
                                               f"{names.upstream_key_secret_name(pool)}"),
                       ("deployment", dep_path)):
        def made(path: str = path) -> Obj | None:
            return _read(admin, path)
        obj = wait_for(made, timeout=15, message=f"{what} exists")
        assert obj is not None
        owners = {(o["kind"], o["uid"]) for o in obj["metadata"].get("ownerReferences") or []}
        assert ("Pool", uid) in owners, f"{what} is not owned by the pool"

    # Subscriptions go active with key Secrets; all-day keys are open now.
    key_ids = {}
    for name in ("first", "second"):
        sub = objs.wait_phase("subscriptions", name, "active", timeout=30)
        data = objs.secret_data(sub["status"]["keySecretName"])
        assert data is not None, f"{name}'s key Secret"
        assert data["apiKey"].startswith("sk_pool_")  # checked, never printed
        assert data["keyId"] == sub["status"]["keyId"]
        labels = objs.secret_labels(sub["status"]["keySecretName"]) or {}
        assert labels.get(names.LABEL_KIND) == names.KIND_API_KEY
        key_ids[name] = sub["status"]["keyId"]
    wait_for(lambda: {_status(objs, n, "subscriptions").get("gate") for n in key_ids}
             == {"open"}, timeout=30, message=describe)

    open_keys = names.open_keys_secret_name(pool)
    wait_for(lambda: set(objs.secret_data(open_keys) or {}) == set(key_ids.values()),
             timeout=30, message=lambda: f"open-keys Secret lists {sorted(key_ids)}")
    assert (objs.secret_labels(open_keys) or {}).get(names.LABEL_KIND) == (
        names.KIND_OPEN_KEYS)

    # The pool is full; a third subscription waits for seats ...
    objs.create(sub_body("waiter", pool, ALL_DAY))
    wait_for(lambda: (condition(objs.sub("waiter"), "SeatsHeld") or {}).get("reason")
             == "PoolFull", timeout=30, message=describe)

    # ... until a Subscription is deleted: the finalizer frees its seats and revokes its key.
    second = objs.sub("second")
    assert names.SUBSCRIPTION_FINALIZER in second["metadata"]["finalizers"]
    objs.delete("subscriptions", "second")
    wait_for(lambda: objs.get("subscriptions", "second") is None, timeout=30,
             message=describe)
    wait_for(lambda: objs.secret_data(second["status"]["keySecretName"]) is None,
             timeout=30, message="the deleted subscription's key Secret goes")
    waiter = objs.wait_phase("subscriptions", "waiter", "active", timeout=30)
    key_ids.pop("second")
    key_ids["waiter"] = waiter["status"]["keyId"]
    wait_for(lambda: set(objs.secret_data(open_keys) or {}) == set(key_ids.values()),
             timeout=30, message="open-keys Secret follows the deletion")
    ledger = _status(objs, pool).get("ledger") or {}
    assert set(ledger) == {"first", "waiter"}, ledger

    # Events, posted with the operator's token (core v1 Events).
    def reasons(name: str) -> set[str]:
        return {e.reason for e in objs.events(name)
                if (e.source and e.source.component) == "gpupool-operator"
                or e.reporting_component == "gpupool-operator"}
    wait_for(lambda: {"Activated", "PhaseChanged"} <= reasons(pool), timeout=15,
             message=lambda: f"pool events {reasons(pool)}")
    # One Event per pass says everything the pass did: the key issued, the phase and the gate.
    def said(name: str) -> str:
        return " | ".join(f"{e.reason}: {e.message}" for e in objs.events(name))
    wait_for(lambda: "KeyIssued" in reasons("first") and "API key opened" in said("first"),
             timeout=15, message=lambda: f"subscription events {said('first')}")

    # Deleting the pool (and its subscriptions) goes through the operator too, and leaves
    # the namespace free to go.
    for name in ("first", "waiter"):
        objs.delete("subscriptions", name)
    wait_for(lambda: not objs.list_subs(), timeout=30, message=describe)
    objs.delete("pools", pool)
    wait_for(lambda: objs.get("pools", pool) is None, timeout=30, message=describe)
    assert op.healthy()


def _operate(cluster: LocalCluster, kube: client.ApiClient, admin: RawApi, ns: str, token: str,
             user: str, tmp_path: Path, pattern: str | None = None) -> None:
    """Run the operator on ``token`` through the scenarios in ``ns``; fail on any refusal."""
    kubeconfig = cluster.write_kubeconfig(tmp_path / "operator.kubeconfig", token=token,
                                          user=user)
    op = OperatorProcess(kubeconfig, name=f"operator-chart-rbac-{ns}",
                         namespaces=[pattern or ns]).start()
    objs, pool = Objects(kube, ns), "charted"

    def describe() -> str:
        return _describe(objs, admin, pool)
    try:
        _run_scenarios(objs, admin, pool, op, describe)
    except AssertionError as exc:
        denied = _denied_lines(op)
        if denied:  # the likely cause of whatever did not happen
            raise AssertionError(f"{exc}\n\nthe operator was refused:\n"
                                 + "\n".join(denied[:20])) from exc
        raise
    finally:
        op.stop()
    # Not one request of the operator (kopf's watches and patches, the work queues, the Events)
    # was refused.
    assert "not posted" not in op.log_text(), "an Event was refused"
    denied = _denied_lines(op)
    assert not denied, "the operator was refused:\n" + "\n".join(denied[:20])


@pytest.mark.parametrize("installed", ["roles", "cluster"], indirect=True)
def test_operator_on_the_chart_token_runs_the_scenarios(
        installed: Installed, cluster: LocalCluster, kube: client.ApiClient, admin: RawApi,
        kubelet: FakeKubelet, tmp_path: Path) -> None:
    ns = installed.watched
    # kopf lists and watches Namespaces (the chart's cluster rule) either way. With ClusterRoles
    # the operator gets a namespace pattern, as a cluster-wide install is used with
    # `--namespace 'team-*'`; it matches only ns, so the other tests' namespaces stay out.
    _operate(cluster, kube, admin, ns, installed.token, installed.operator_sa, tmp_path,
             pattern=ns if installed.mode == "roles" else f"{ns}*")


# kube-apiserver 1.20's default plugins (as the dev cluster names them) plus the one that makes
# setting ownerReferences[].blockOwnerDeletion need update on the owner's finalizers subresource.
# OpenShift runs it by default; so do some hardened clusters.
ENFORCING_ADMISSION = ("--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,"
                       "MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota,"
                       "OwnerReferencesPermissionEnforcement")


@pytest.fixture(scope="module")
def enforcing_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A control plane of its own, with OwnerReferencesPermissionEnforcement."""
    require_control_plane()
    local = LocalCluster(tmp_path_factory.mktemp("enforcing-cluster"), gpu_nodes=1,
                         gpus_per_node=8, kubelet=True,
                         extra_apiserver_args=[ENFORCING_ADMISSION])
    local.start()
    try:
        yield local
    finally:
        local.stop()


def _owned_secret(name: str, pool: str, uid: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": name, "ownerReferences": [{
            "apiVersion": "gpupool.dev/v1alpha1", "kind": "Pool", "name": pool, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}]}}


def test_the_chart_token_suffices_where_owner_references_are_enforced(
        enforcing_cluster: LocalCluster, helm_bin: Path, tmp_path: Path) -> None:
    cluster = enforcing_cluster
    with cluster.api_client() as kube:
        admin = RawApi(kube)
        ns = create_namespace(kube, unique_name("x-owners", 20))
        rel = Release(helm_bin, cluster, admin)
        try:
            rel.install("-f", rel.values(tmp_path, {"watchNamespaces": [ns]}))
            # helm waits for the CRDs from crds/; the API server serves them a moment later.
            wait_for(lambda: api_status(admin, "GET", f"/apis/gpupool.dev/v1alpha1/namespaces/"
                                                      f"{ns}/pools") == 200, timeout=30,
                     message="the chart's CRDs served")
            sa = f"{rel.fullname}-operator"
            token = service_account_token(kube, rel.namespace, sa)

            # Why the chart grants update on pools/finalizers: the same Role without that rule
            # is refused the operator's first write, a child owned by a Pool.
            chart_rules = admin.get(f"{RBAC}/namespaces/{ns}/roles/{sa}")["rules"]
            trimmed = [r for r in chart_rules
                       if not any(res.endswith("/finalizers") for res in r["resources"])]
            assert len(trimmed) == len(chart_rules) - 1
            admin.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", body={
                "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "trimmed"}})
            admin.request("POST", f"{RBAC}/namespaces/{ns}/roles", body={
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "trimmed"}, "rules": trimmed})
            admin.request("POST", f"{RBAC}/namespaces/{ns}/rolebindings", body={
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "trimmed"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                            "name": "trimmed"},
                "subjects": [{"kind": "ServiceAccount", "name": "trimmed", "namespace": ns}]})
            probe_uid = "00000000-0000-0000-0000-000000000001"
            with cluster.api_client(service_account_token(kube, ns, "trimmed")) as trimmed_client:
                without = RawApi(trimmed_client)
                wait_for(lambda: api_status(without, "GET",
                                            f"/api/v1/namespaces/{ns}/secrets") == 200,
                         timeout=30, message="the trimmed Role applies")
                with pytest.raises(ApiException) as refused:
                    without.request("POST", f"/api/v1/namespaces/{ns}/secrets",
                                    body=_owned_secret("probe-without", "probe", probe_uid))
                assert refused.value.status == 403, refused.value.status
                assert "blockOwnerDeletion" in str(refused.value.body), refused.value.body
            with cluster.api_client(token) as chart_client:
                assert api_status(RawApi(chart_client), "POST",
                                  f"/api/v1/namespaces/{ns}/secrets",
                                  body=_owned_secret("probe-with", "probe", probe_uid)) == 200
            api_status(admin, "DELETE", f"/api/v1/namespaces/{ns}/secrets/probe-with")

            # The whole job, on the chart's token, on this cluster.
            _operate(cluster, kube, admin, ns, token, sa, tmp_path)
        finally:
            rel.cleanup()


def test_the_chart_token_is_no_broader_than_needed(installed: Installed, cluster: LocalCluster,
                                                   admin: RawApi) -> None:
    rel, watched = installed.release, installed.watched
    other = rel.namespace_for("other")
    admin.request("POST", f"/api/v1/namespaces/{other}/secrets", body={
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "customer-data"},
        "stringData": {"apiKey": "not-for-you"}})
    op_client = cluster.api_client(installed.token)
    try:
        op = RawApi(op_client)
        wait_for(lambda: api_status(op, "GET", f"/api/v1/namespaces/{watched}/secrets") == 200,
                 timeout=30, message="the operator's Role applies")

        # Secrets: only in the watched namespace -- not in another, not cluster-wide, and not
        # in the release namespace, where the ServiceAccount token Secrets live.
        assert api_status(op, "GET", f"/api/v1/namespaces/{other}/secrets/customer-data") == 403
        assert api_status(op, "GET", f"/api/v1/namespaces/{other}/secrets") == 403
        assert api_status(op, "GET", "/api/v1/secrets") == 403
        assert api_status(op, "GET", f"/api/v1/namespaces/{rel.namespace}/secrets") == 403
        assert api_status(op, "POST", f"/api/v1/namespaces/{other}/secrets", body={
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "planted"}}) == 403
        assert api_status(op, "GET",
                          f"/apis/apps/v1/namespaces/{other}/deployments") == 403

        # CRDs: list and watch only (kopf's), not even a read by name.
        assert api_status(op, "GET", CRDS) == 200
        assert api_status(op, "GET", crd_path("pools.gpupool.dev")) == 403
        assert api_status(op, "DELETE", crd_path("pools.gpupool.dev")) == 403
        assert api_status(op, "DELETE", crd_path("subscriptions.gpupool.dev")) == 403
        assert api_status(op, "PATCH", crd_path("pools.gpupool.dev"), body={},
                          content_type="application/merge-patch+json") == 403
        assert exists(admin, crd_path("pools.gpupool.dev"))

        # RBAC: no ClusterRoles, bindings or Roles -- it cannot grant itself more.
        assert api_status(op, "POST", f"{RBAC}/clusterroles", body={
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": f"{rel.name}-escalate"},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]}) == 403
        assert not exists(admin, f"{RBAC}/clusterroles/{rel.name}-escalate")
        assert api_status(op, "POST", f"{RBAC}/clusterrolebindings", body={
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": f"{rel.name}-escalate"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": installed.operator_sa,
                          "namespace": rel.namespace}]}) == 403
        assert api_status(op, "PATCH", f"{RBAC}/namespaces/{watched}/roles/{rel.fullname}"
                                       "-operator", body={"rules": []},
                          content_type="application/merge-patch+json") == 403

        # The API server's own account of the token's rights is the chart's README table.
        assert rules_review(op, watched) == OPERATOR_NAMESPACED | OPERATOR_CLUSTER
        assert rules_review(op, other) == OPERATOR_CLUSTER
        assert rules_review(op, rel.namespace) == OPERATOR_CLUSTER
    finally:
        op_client.close()
    secret = admin.get(f"/api/v1/namespaces/{other}/secrets/customer-data")
    assert secret["data"]["apiKey"]  # still there, untouched


def test_the_gateway_on_the_chart_token_lists_and_watches_key_secrets(
        installed: Installed, cluster: LocalCluster, kube: client.ApiClient, admin: RawApi,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The gateway's Secret source (gpupool.gateway.kube) on the chart's gateway token: list and
    watch are all it needs (the Role grants no get)."""
    rel, ns = installed.release, installed.watched
    sa = f"{rel.fullname}-gateway"

    def upstream_secret(pool: str, key: str) -> None:
        body = keys.build_upstream_key_secret(namespace=ns, pool=pool, pool_uid="none",
                                              api_key=key)
        meta = body["metadata"]
        assert isinstance(meta, dict)
        del meta["ownerReferences"]  # no owner: the garbage collector leaves it alone
        admin.request("POST", f"/api/v1/namespaces/{ns}/secrets", body=body)

    upstream_secret("listed", "upstream-listed")
    kubeconfig = cluster.write_kubeconfig(
        tmp_path / "gateway.kubeconfig", token=service_account_token(kube, rel.namespace, sa),
        user=sa)
    source = KubernetesKeySource([ns], kubeconfig=str(kubeconfig), watch_timeout=5)
    store = KeyStore()

    async def run() -> None:
        task = asyncio.create_task(source.run(store))
        try:
            await asyncio.wait_for(store.wait_synced(), timeout=30)
            listed = names.upstream_key_secret_name("listed")
            assert store.upstream_key(ns, listed) == "upstream-listed"
            await asyncio.to_thread(upstream_secret, "watched", "upstream-watched")
            watched = names.upstream_key_secret_name("watched")
            for _ in range(300):
                if store.upstream_key(ns, watched) is not None:
                    break
                await asyncio.sleep(0.1)
            assert store.upstream_key(ns, watched) == "upstream-watched", "no watch event"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level("INFO", logger="gpupool.gateway"):
        asyncio.run(run())
    refused = [r.getMessage() for r in caplog.records if "API error" in r.getMessage()
               or DENIED.search(r.getMessage())]
    assert not refused, refused
