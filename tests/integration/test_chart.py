"""The Helm chart, the plain manifests generated from it, and the chart's least-privilege RBAC.

Offline: ``helm lint``/``helm template`` for the default and the fully loaded values, the values
schema refusing bad values with a message naming the value, the committed manifests equal to a
fresh render. Against the real local control plane (the ``cluster`` fixture): ``helm install``,
``helm upgrade`` and ``helm uninstall`` doing what the chart's README says, the plain manifests
passing the API server's validation, and the operator's and gateway's ServiceAccount tokens
allowed exactly what the chart documents.

helm comes from ``scripts/get-helm.sh`` (run by ``scripts/setup.sh``) into
``$GPUPOOL_CACHE/bin/helm``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from gpupool.devcluster import LocalCluster, RawApi, cache_dir, service_account_token

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "gpupool"
VALUES_FULL = CHART / "values-full.yaml"
MANIFESTS = ROOT / "manifests"

Obj = dict[str, Any]
T = TypeVar("T")

# The operator's rights, as (apiGroup, resource, verb); see charts/gpupool/README.md. Each verb is
# one the code sends: gpupool.kube (GET, POST, PATCH, DELETE; PUT only to replace the open-keys
# Secret), gpupool.events (POST core v1 Events) and kopf (list+watch of what it handles, merge
# patches of finalizers and annotations, list+watch of CRDs and namespaces). Nothing deletes a
# Deployment or Service (the garbage collector does, with the Pool), PUTs a Pool, Subscription,
# status, Deployment or Service, reads a status subresource or one Pod, CRD or Namespace by name,
# watches Services, or patches an Event; so none of those is granted
# (test_chart_rbac_scenarios.py runs the operator on exactly these and finds no 403).
OPERATOR_NAMESPACED = frozenset(
    {("gpupool.dev", r, v) for r in ("pools", "subscriptions")
     for v in ("get", "list", "watch", "patch")}
    | {("gpupool.dev", r, "patch") for r in ("pools/status", "subscriptions/status")}
    # Children carry ownerReferences with blockOwnerDeletion: true; where the
    # OwnerReferencesPermissionEnforcement admission plugin runs (OpenShift), setting that needs
    # update on the owner's finalizers (test_chart_rbac_scenarios.py shows the 403 without it).
    | {("gpupool.dev", r, "update") for r in ("pools/finalizers", "subscriptions/finalizers")}
    # update: the open-keys Secret is replaced whole (PUT with its resourceVersion).
    | {("", "secrets", v)
       for v in ("get", "list", "watch", "create", "patch", "update", "delete")}
    | {("apps", "deployments", v) for v in ("get", "list", "watch", "create", "patch")}
    | {("", "services", v) for v in ("get", "create", "patch")}
    | {("", "pods", v) for v in ("list", "watch")}
    | {("", "events", "create")}
)
OPERATOR_CLUSTER = frozenset(
    {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
    | {("", "namespaces", v) for v in ("list", "watch")}
)
# The gateway lists key Secrets, then watches them (gpupool.gateway.kube); it never reads one by
# name.
GATEWAY_NAMESPACED = frozenset({("", "secrets", v) for v in ("list", "watch")})
VLLM_LABELS = {"app.kubernetes.io/component": "vllm", "app.kubernetes.io/managed-by": "gpupool"}

# Helm 4 says "- at '/gateway/replicas': ...", Helm 3 "- gateway.replicas: ...".
SCHEMA_REFUSED = "values don't meet the specifications of the schema"


# --------------------------------------------------------------------------------------------
# helpers


def _helm_path() -> Path:
    return cache_dir() / "bin" / "helm"


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    path = _helm_path()
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"helm not found at {path}: run `bash scripts/get-helm.sh` "
                    "(scripts/setup.sh does it)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def kubectl_bin() -> str:
    found = shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found on PATH (see shared/TESTING.md: kubectl and helm)",
                    pytrace=False)
    return found


def run(cmd: list[str | Path], *, env: dict[str, str] | None = None, check: bool = True,
        timeout: float = 180) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def render(helm: Path, *args: str | Path, release: str = "gpupool",
           namespace: str = "gpupool") -> list[Obj]:
    out = run([helm, "template", release, CHART, "--namespace", namespace, *args]).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[Obj], kind: str, name: str | None = None,
         namespace: str | None = None) -> list[Obj]:
    return [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)
            and (namespace is None or d["metadata"].get("namespace") == namespace)]


def one(docs: list[Obj], kind: str, name: str | None = None,
        namespace: str | None = None) -> Obj:
    found = find(docs, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def rule_set(rules: list[Obj]) -> set[tuple[str, str, str]]:
    """Flatten PolicyRules into (apiGroup, resource, verb); resourceNames must not narrow them."""
    out = set()
    for rule in rules:
        assert not rule.get("resourceNames"), rule
        assert not rule.get("nonResourceURLs"), rule
        for group in rule.get("apiGroups") or [""]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


def container(deployment: Obj) -> Obj:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_of(c: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in c.get("env", [])}


def port_of(c: Obj, name: str) -> int:
    return int(next(p["containerPort"] for p in c["ports"] if p["name"] == name))


def service_target(service: Obj, deployment: Obj, port_name: str) -> int:
    """The container port a Service's port ``port_name`` reaches in ``deployment``'s pods."""
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items(), "selects other pods"
    [port] = [p for p in service["spec"]["ports"] if p["name"] == port_name]
    target = port["targetPort"]
    return port_of(container(deployment), target) if isinstance(target, str) else int(target)


def metrics_target(service: Obj, deployment: Obj) -> int:
    return service_target(service, deployment, "metrics")


def poll(what: str, check: Callable[[], T | None], timeout: float = 60.0,
         interval: float = 0.2) -> T:
    """``check()``'s first truthy result; fails with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except AssertionError as exc:
            last = exc
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last})")
        time.sleep(interval)


def suffix() -> str:
    return uuid.uuid4().hex[:6]


def api_status(api: RawApi, method: str, path: str, body: Any = None,
               content_type: str | None = None) -> int:
    """The HTTP status of one request (200 for success)."""
    from kubernetes.client import ApiException

    try:
        api.request(method, path, body=body, content_type=content_type)
    except ApiException as exc:
        return int(exc.status)
    return 200


def exists(api: RawApi, path: str) -> bool:
    status = api_status(api, "GET", path)
    assert status in (200, 404), f"GET {path}: {status}"
    return status == 200


def rules_review(api: RawApi, namespace: str) -> set[tuple[str, str, str]]:
    """What the caller may do in ``namespace`` (SelfSubjectRulesReview), minus the discovery
    and self-review rights every authenticated user has."""
    review = api.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews",
                         body={"apiVersion": "authorization.k8s.io/v1",
                               "kind": "SelfSubjectRulesReview",
                               "spec": {"namespace": namespace}})
    assert not review["status"].get("incomplete"), review["status"]
    everyone = {("authorization.k8s.io", "selfsubjectaccessreviews", "create"),
                ("authorization.k8s.io", "selfsubjectrulesreviews", "create")}
    return {r for r in rule_set(review["status"]["resourceRules"]) if r not in everyone}


# --------------------------------------------------------------------------------------------
# lint and template (no cluster)


@pytest.mark.parametrize("values", [None, VALUES_FULL], ids=["default", "full"])
def test_helm_lint(helm_bin: Path, values: Path | None) -> None:
    args = ["-f", str(values)] if values else []
    out = run([helm_bin, "lint", CHART, "--strict", *args])
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


def test_default_render(helm_bin: Path) -> None:
    docs = render(helm_bin)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ServiceAccount", "ServiceAccount", "ClusterRole", "ClusterRole",
                            "ClusterRoleBinding", "ClusterRoleBinding", "Deployment",
                            "Deployment", "Service", "Service", "NetworkPolicy"])
    for d in docs:
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == "gpupool", d["metadata"]

    op = one(docs, "Deployment", "gpupool-operator")
    assert op["spec"]["replicas"] == 1
    assert op["spec"]["strategy"] == {"type": "Recreate"}
    pod = op["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "gpupool-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    c = container(op)
    assert c["image"] == "gpupool/gpupool:0.1.0"
    assert c["args"] == ["operator", "--liveness", "http://0.0.0.0:8080/healthz"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"] and c["resources"]["limits"]
    probe = c["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert port_of(c, probe["port"]) == 8080
    assert port_of(c, "metrics") == 9090
    env = env_of(c)
    assert env["GPUPOOL_METRICS_PORT"]["value"] == "9090"
    assert not any(k.startswith("GPUPOOL_STRIPE") for k in env), "billing is off by default"
    # The operator is told the webhook port, but serves (and the chart exposes) it only with
    # billing on.
    assert env["GPUPOOL_WEBHOOK_PORT"]["value"] == "8081"
    assert "webhook" not in {p["name"] for p in c["ports"]}
    assert not find(docs, "Service", "gpupool-operator-webhook")

    gw = one(docs, "Deployment", "gpupool-gateway")
    gc = container(gw)
    assert gc["args"] == ["gateway", "--port", "8080", "--metrics-port", "9090"]
    assert port_of(gc, "http") == 8080 and port_of(gc, "metrics") == 9090
    assert gc["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gc["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gw["spec"]["template"]["spec"]["serviceAccountName"] == "gpupool-gateway"
    assert gc["securityContext"]["readOnlyRootFilesystem"] is True
    assert "GPUPOOL_GATEWAY_REDIS_URL" not in env_of(gc)
    svc = one(docs, "Service", "gpupool-gateway")
    assert svc["spec"]["selector"].items() <= gw["spec"]["template"]["metadata"]["labels"].items()
    metrics = one(docs, "Service", "gpupool-operator-metrics")
    assert metrics["spec"]["selector"].items() <= (
        op["spec"]["template"]["metadata"]["labels"].items())
    assert not (metrics["spec"]["selector"].items()
                <= gw["spec"]["template"]["metadata"]["labels"].items())
    assert metrics_target(metrics, op) == int(env["GPUPOOL_METRICS_PORT"]["value"])
    assert metrics_target(svc, gw) == 9090

    # Every namespace watched: the namespaced rights come from ClusterRoles.
    assert rule_set(one(docs, "ClusterRole", "gpupool-operator")["rules"]) == (
        OPERATOR_NAMESPACED | OPERATOR_CLUSTER)
    assert rule_set(one(docs, "ClusterRole", "gpupool-gateway")["rules"]) == GATEWAY_NAMESPACED
    for who in ("operator", "gateway"):
        binding = one(docs, "ClusterRoleBinding", f"gpupool-{who}")
        assert binding["roleRef"]["name"] == f"gpupool-{who}"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"gpupool-{who}",
                                        "namespace": "gpupool"}]

    # vLLM pods accept traffic from this release's gateway pods only.
    np = one(docs, "NetworkPolicy", namespace="gpupool")
    assert np["spec"]["podSelector"] == {"matchLabels": VLLM_LABELS}
    assert np["spec"]["policyTypes"] == ["Ingress"]
    [rule] = np["spec"]["ingress"]
    [peer] = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= (
        gw["spec"]["template"]["metadata"]["labels"].items())
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert peer["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "gpupool"}}


def test_watch_namespaces_render_roles(helm_bin: Path, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"watchNamespaces": ["team-a", "team-b"]}))
    docs = render(helm_bin, "-f", values)

    op = container(one(docs, "Deployment", "gpupool-operator"))
    assert op["args"] == ["operator", "--liveness", "http://0.0.0.0:8080/healthz",
                          "--namespace", "team-a", "--namespace", "team-b"]
    gw = container(one(docs, "Deployment", "gpupool-gateway"))
    assert gw["args"] == ["gateway", "--port", "8080", "--metrics-port", "9090",
                          "--namespace", "team-a", "--namespace", "team-b"]

    # Cluster-wide: only what kopf needs to read CRDs and namespaces; nothing for the gateway.
    [cluster_role] = find(docs, "ClusterRole")
    assert cluster_role["metadata"]["name"] == "gpupool-operator-cluster"
    assert rule_set(cluster_role["rules"]) == OPERATOR_CLUSTER
    [crb] = find(docs, "ClusterRoleBinding")
    assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                              "name": "gpupool-operator-cluster"}
    for ns in ("team-a", "team-b"):
        assert rule_set(one(docs, "Role", "gpupool-operator", ns)["rules"]) == OPERATOR_NAMESPACED
        assert rule_set(one(docs, "Role", "gpupool-gateway", ns)["rules"]) == GATEWAY_NAMESPACED
        for who in ("operator", "gateway"):
            rb = one(docs, "RoleBinding", f"gpupool-{who}", ns)
            assert rb["roleRef"]["kind"] == "Role"
            assert rb["subjects"] == [{"kind": "ServiceAccount", "name": f"gpupool-{who}",
                                       "namespace": "gpupool"}]
        np = one(docs, "NetworkPolicy", namespace=ns)
        assert np["spec"]["podSelector"] == {"matchLabels": VLLM_LABELS}
    assert len(find(docs, "Role")) == 4
    assert len(find(docs, "NetworkPolicy")) == 2


def admission_rule(rules: list[Obj]) -> Obj:
    """The one rule narrowed by resourceNames: the operator's right on the chart's own
    ValidatingWebhookConfiguration (admission.enabled)."""
    [rule] = [r for r in rules if r.get("resourceNames")]
    return rule


def test_admission_render(helm_bin: Path) -> None:
    """admission.enabled: the webhook Service, the configuration (caBundle left to the operator),
    the operator's env and port, and one more cluster rule."""
    name = "gpupool-operator-gpupool.gpupool.dev"
    docs = render(helm_bin, "--set", "admission.enabled=true")
    op = one(docs, "Deployment", "gpupool-operator")
    c = container(op)
    env = env_of(c)
    assert env["GPUPOOL_ADMISSION_PORT"]["value"] == "9443"
    assert env["GPUPOOL_ADMISSION_CONFIGURATION"]["value"] == name
    assert env["GPUPOOL_ADMISSION_SERVICE"]["value"] == "gpupool/gpupool-operator-admission"
    assert "GPUPOOL_ADMISSION_CERT_DIR" not in env, "self-signed by default"
    svc = one(docs, "Service", "gpupool-operator-admission")
    assert svc["spec"]["ports"][0]["port"] == 443
    assert service_target(svc, op, "admission") == 9443
    assert svc["metadata"]["labels"]["gpupool.dev/service"] == "admission"  # never scraped

    vwc = one(docs, "ValidatingWebhookConfiguration", name)
    assert "namespace" not in vwc["metadata"]
    hooks = {h["name"]: h for h in vwc["webhooks"]}
    assert set(hooks) == {"pools.gpupool.dev", "subscriptions.gpupool.dev"}
    for plural in ("pools", "subscriptions"):
        hook = hooks[f"{plural}.gpupool.dev"]
        assert hook["failurePolicy"] == "Ignore"
        assert hook["sideEffects"] == "None"
        assert "namespaceSelector" not in hook
        [rule] = hook["rules"]
        assert rule["resources"] == [plural]
        assert rule["operations"] == ["CREATE", "UPDATE"]
        # The path names the operator's handler; the caBundle is the operator's to write.
        assert hook["clientConfig"] == {"service": {
            "namespace": "gpupool", "name": "gpupool-operator-admission", "port": 443,
            "path": f"/{plural}"}}

    # The operator may read and patch that one configuration, by name: no create, no delete,
    # no other webhook configuration. Everything else is as without admission.
    rules = one(docs, "ClusterRole", "gpupool-operator")["rules"]
    adm = admission_rule(rules)
    assert adm == {"apiGroups": ["admissionregistration.k8s.io"],
                   "resources": ["validatingwebhookconfigurations"],
                   "resourceNames": [name], "verbs": ["get", "patch"]}
    assert rule_set([r for r in rules if r is not adm]) == OPERATOR_NAMESPACED | OPERATOR_CLUSTER

    # watchNamespaces: the rule is cluster-scoped, so it goes to the -cluster ClusterRole.
    docs = render(helm_bin, "--set", "admission.enabled=true", "--set", "watchNamespaces={a}")
    rules = one(docs, "ClusterRole", "gpupool-operator-cluster")["rules"]
    assert admission_rule(rules)["resourceNames"] == [name]
    assert rule_set([r for r in rules if not r.get("resourceNames")]) == OPERATOR_CLUSTER

    # An operator outside the cluster: a URL instead of the Service, and no Service.
    docs = render(helm_bin, "--set", "admission.enabled=true",
                  "--set", "admission.url=https://127.0.0.1:9443/")
    assert not find(docs, "Service", "gpupool-operator-admission")
    hooks = {h["name"]: h for h in one(docs, "ValidatingWebhookConfiguration")["webhooks"]}
    assert hooks["pools.gpupool.dev"]["clientConfig"] == {"url": "https://127.0.0.1:9443/pools"}


def test_gateway_disabled_render(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set", "gateway.enabled=false")
    assert not [d for d in docs if "gateway" in d["metadata"]["name"]]
    # Without the gateway, nothing may reach vLLM unless networkPolicy.extraIngress says so.
    np = one(docs, "NetworkPolicy")
    assert np["spec"]["podSelector"] == {"matchLabels": VLLM_LABELS}
    assert np["spec"]["ingress"] == []


def test_gateway_redis_url_render(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set", "gateway.redis.url=redis://redis:6379/0",
                  "--set", "gateway.replicas=2")
    gc = container(one(docs, "Deployment", "gpupool-gateway"))
    assert env_of(gc)["GPUPOOL_GATEWAY_REDIS_URL"] == {"name": "GPUPOOL_GATEWAY_REDIS_URL",
                                                        "value": "redis://redis:6379/0"}
    assert not any("redis" in arg for arg in gc["args"]), "the URL stays out of the process list"


def test_full_values_render(helm_bin: Path) -> None:
    docs = render(helm_bin, "-f", VALUES_FULL)
    op = one(docs, "Deployment", "gpupool-full-operator")
    c = container(op)
    assert c["image"] == "registry.example.test/gpupool/gpupool:0.1.0-test"
    assert c["args"][-1] == "--verbose"
    assert c["livenessProbe"]["httpGet"]["port"] == "health"
    assert port_of(c, "health") == 8081
    assert "http://0.0.0.0:8081/healthz" in c["args"]
    env = env_of(c)
    assert env["GPUPOOL_METRICS_PORT"]["value"] == "9091"
    # Billing on: the webhook port is declared, passed on, and behind its own Service.
    assert port_of(c, "webhook") == 8443
    assert env["GPUPOOL_WEBHOOK_PORT"]["value"] == "8443"
    webhook = one(docs, "Service", "gpupool-full-operator-webhook")
    assert service_target(webhook, op, "webhook") == 8443
    assert webhook["spec"]["ports"][0]["port"] == 8443
    assert webhook["metadata"]["annotations"] == {"example.test/webhook": "stripe"}
    for name, key in (("GPUPOOL_STRIPE_API_KEY", "apiKey"),
                      ("GPUPOOL_STRIPE_WEBHOOK_SECRET", "webhookSecret"),
                      ("GPUPOOL_STRIPE_API_BASE", "apiBase")):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "gpupool-stripe" and ref["key"] == key
    assert env["GPUPOOL_STRIPE_API_BASE"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "optional" not in env["GPUPOOL_STRIPE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert op["spec"]["template"]["spec"]["serviceAccountName"] == "gpupool-operator-sa"

    gw = one(docs, "Deployment", "gpupool-full-gateway")
    assert gw["spec"]["replicas"] == 3
    gc = container(gw)
    assert env_of(gc)["GPUPOOL_GATEWAY_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "gpupool-redis", "key": "url"}
    assert port_of(gc, "http") == 8443 and port_of(gc, "metrics") == 9443
    assert gc["args"] == ["gateway", "--port", "8443", "--metrics-port", "9443",
                          "--namespace", "team-a", "--namespace", "team-b",
                          "--log-level", "debug"]

    monitors = find(docs, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"gpupool-full-operator",
                                                         "gpupool-full-gateway"}
    services = find(docs, "Service")
    # gateway, operator metrics, operator webhook (Stripe), operator admission webhooks, and the
    # REST API (values-full enables it; its render is checked in test_api_chart.py)
    assert len(services) == 5
    # Where each process serves /metrics: the operator from its env, the gateway from its args.
    serves_metrics = {"gpupool-full-operator": (op, int(env["GPUPOOL_METRICS_PORT"]["value"])),
                      "gpupool-full-gateway": (gw, int(gc["args"][gc["args"].index(
                          "--metrics-port") + 1]))}
    for m in monitors:
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        assert m["metadata"]["labels"]["release"] == "prometheus"
        # Each ServiceMonitor selects exactly one Service (not the operator's webhook Service),
        # whose named port reaches the port the process serves /metrics on.
        selected = [s for s in services if m["spec"]["selector"]["matchLabels"].items()
                    <= s["metadata"]["labels"].items()]
        assert len(selected) == 1, m["metadata"]["name"]
        deployment, port = serves_metrics[m["metadata"]["name"]]
        [endpoint] = m["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        assert service_target(selected[0], deployment, endpoint["port"]) == port

    assert {np["metadata"]["namespace"] for np in find(docs, "NetworkPolicy")} == {
        "team-a", "team-b", "shared-models"}
    assert {r["metadata"]["namespace"] for r in find(docs, "Role")} == {"team-a", "team-b"}

    # Admission webhooks on, with a certificate from a Secret (cert-manager's layout).
    assert port_of(c, "admission") == 9444
    assert env["GPUPOOL_ADMISSION_PORT"]["value"] == "9444"
    assert env["GPUPOOL_ADMISSION_CERT_DIR"]["value"] == "/etc/gpupool/admission"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["admission-cert"] == {"name": "admission-cert", "readOnly": True,
                                        "mountPath": "/etc/gpupool/admission"}
    volumes = {v["name"]: v for v in op["spec"]["template"]["spec"]["volumes"]}
    assert volumes["admission-cert"]["secret"] == {"secretName": "gpupool-admission-tls"}
    admission = one(docs, "Service", "gpupool-full-operator-admission")
    assert service_target(admission, op, "admission") == 9444
    vwc = one(docs, "ValidatingWebhookConfiguration",
              "gpupool-full-operator-gpupool.gpupool.dev")
    for hook in vwc["webhooks"]:
        assert hook["timeoutSeconds"] == 10
        assert hook["namespaceSelector"] == {"matchLabels": {"gpupool.dev/admission": "on"}}
    cluster_rules = one(docs, "ClusterRole", "gpupool-full-operator-cluster")["rules"]
    assert admission_rule(cluster_rules) == {
        "apiGroups": ["admissionregistration.k8s.io"],
        "resources": ["validatingwebhookconfigurations"],
        "resourceNames": ["gpupool-full-operator-gpupool.gpupool.dev"],
        "verbs": ["get", "patch"]}


SCHEMA_CASES = [
    ({"watchNamespcs": []}, "watchNamespcs"),
    ({"watchNamespaces": "default"}, "watchNamespaces"),
    ({"gateway": {"replicas": "two"}}, "gateway.replicas"),
    ({"operator": {"ports": {"metrics": 70000}}}, "operator.ports.metrics"),
    ({"image": {"pullPolicy": "Sometimes"}}, "image.pullPolicy"),
    ({"gateway": {"redis": {"url": "localhost:6379"}}}, "gateway.redis.url"),
    ({"stripe": {"existingSecrets": "billing"}}, "stripe.existingSecrets"),
    ({"admission": {"failurePolicy": "Never"}}, "admission.failurePolicy"),
    ({"admission": {"url": "http://operator:9443"}}, "admission.url"),
]


# Ports the probes, Services and ServiceMonitors use must be the ports the processes listen on.
PORT_CASES = [
    ({"operator": {"ports": {"health": 8088}}}, "operator.ports.health"),
    ({"operator": {"args": ["operator"]}}, "--liveness"),
    ({"operator": {"ports": {"metrics": 8080}}}, "operator.ports.metrics"),
    ({"stripe": {"existingSecret": "billing"}, "operator": {"ports": {"webhook": 9090}}},
     "operator.ports.webhook"),
    ({"admission": {"enabled": True, "port": 9090}}, "admission.port"),
    ({"admission": {"enabled": True, "port": 8081}, "stripe": {"existingSecret": "billing"}},
     "admission.port"),
    ({"gateway": {"ports": {"http": 8000}}}, "gateway.ports.http"),
    ({"gateway": {"ports": {"metrics": 9191}}}, "gateway.ports.metrics"),
    ({"gateway": {"extraArgs": ["--metrics-port=9191"]}}, "gateway.ports.metrics"),
    ({"gateway": {"args": ["gateway", "--port", "9090"], "ports": {"http": 9090}}},
     "gateway.ports.metrics"),
]


@pytest.mark.parametrize(("values", "dotted"), PORT_CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(PORT_CASES)])
def test_render_refuses_mismatched_ports(helm_bin: Path, tmp_path: Path, values: Obj,
                                         dotted: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(values))
    proc = run([helm_bin, "template", "x", CHART, "-f", bad], check=False)
    assert proc.returncode != 0, f"helm template accepted {values}"
    assert dotted in proc.stderr, proc.stderr


def test_render_accepts_ports_that_agree(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set", "operator.ports.health=8181",
                  "--set", "operator.args={operator,--liveness=http://0.0.0.0:8181/healthz}",
                  "--set-string", "gateway.extraArgs={--port,8443,--metrics-port,9443}",
                  "--set", "gateway.ports.http=8443", "--set", "gateway.ports.metrics=9443")
    op = one(docs, "Deployment", "gpupool-operator")
    assert port_of(container(op), "health") == 8181
    gw = one(docs, "Deployment", "gpupool-gateway")
    assert metrics_target(one(docs, "Service", "gpupool-gateway"), gw) == 9443


def names_value(output: str, dotted: str) -> bool:
    """Whether helm's schema message names the value ``dotted`` (e.g. ``gateway.replicas``).

    Helm 4: ``- at '/gateway/replicas': got string, want integer`` and, for an unknown key,
    ``- at '/stripe': additional properties 'existingSecrets' not allowed``; Helm 3 writes
    ``gateway.replicas: Invalid type``.
    """
    parts = dotted.split(".")
    if "/" + "/".join(parts) in output or dotted in output:
        return True
    parent = "/" + "/".join(parts[:-1]) if len(parts) > 1 else ""
    return f"'{parent}'" in output and f"'{parts[-1]}'" in output


@pytest.mark.parametrize(("values", "dotted"), SCHEMA_CASES, ids=[c[1] for c in SCHEMA_CASES])
def test_schema_refuses_bad_values(helm_bin: Path, tmp_path: Path, values: Obj,
                                   dotted: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(values))
    commands: list[list[str | Path]] = [["template", "x", CHART, "-f", bad],
                                        ["lint", CHART, "-f", bad]]
    for cmd in commands:
        proc = run([helm_bin, *cmd], check=False)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"helm {cmd[0]} accepted {values}"
        assert SCHEMA_REFUSED in output, output
        assert names_value(output, dotted), f"helm {cmd[0]}'s message does not name {dotted}:" \
                                            f"\n{output}"


# --------------------------------------------------------------------------------------------
# plain manifests (no cluster)


def test_manifests_match_a_fresh_render(helm_bin: Path) -> None:
    proc = run(["bash", ROOT / "scripts" / "render-manifests.sh", "--check"], check=False,
               env={"HELM": str(helm_bin)})
    assert proc.returncode == 0, (
        "manifests/ or charts/gpupool/crds/ differ from a fresh render; run "
        f"scripts/render-manifests.sh\n{proc.stdout}\n{proc.stderr}")
    for crd in sorted((ROOT / "crds").glob("*.yaml")):
        assert (CHART / "crds" / crd.name).read_bytes() == crd.read_bytes()
        assert (MANIFESTS / "crds" / crd.name).read_bytes() == crd.read_bytes()


def test_manifests_kustomization_builds(kubectl_bin: str) -> None:
    out = run([kubectl_bin, "kustomize", MANIFESTS]).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Namespace", "gpupool") in names
    assert ("CustomResourceDefinition", "pools.gpupool.dev") in names
    assert ("CustomResourceDefinition", "subscriptions.gpupool.dev") in names
    assert ("Deployment", "gpupool-operator") in names
    assert ("Deployment", "gpupool-gateway") in names
    # Everything namespaced lands in the gpupool namespace.
    for d in docs:
        if d["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole",
                             "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == "gpupool", d["metadata"]


# --------------------------------------------------------------------------------------------
# the image (not built here: no Docker engine; checked as text)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_builds_the_package_as_the_chart_runs_it() -> None:
    ins = dockerfile_instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2 and any(" AS " in f.upper() for f in froms), "multi-stage"
    # The install step: `pip install .` from the project's own files (pinned in pyproject.toml).
    runs = [rest for word, rest in ins if word == "RUN"]
    assert any(re.search(r"\bpip install \.(\s|$)", r) for r in runs), runs
    # Every COPY source from the build context exists and survives .dockerignore, and the
    # package's source folder is among them.
    ignore = (ROOT / ".dockerignore").read_text().split()
    copied = []
    for word, rest in ins:
        if word == "COPY" and "--from=" not in rest:
            *sources, _dest = rest.split()
            copied += [src.rstrip("/") for src in sources]
    for src in copied:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which the repository lacks"
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f".dockerignore drops {src}"
    assert {"pyproject.toml", "operator"} <= set(copied)
    # Runs as the non-root uid the chart's securityContext expects, with `gpupool` as entrypoint.
    users = [rest for word, rest in ins if word == "USER"]
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for part in ("operator", "gateway"):
        assert values[part]["podSecurityContext"]["runAsUser"] == int(uid)
    entry = [rest for word, rest in ins if word == "ENTRYPOINT"][-1]
    assert json.loads(entry)[0] in ("gpupool", "/opt/gpupool/bin/gpupool"), entry


# --------------------------------------------------------------------------------------------
# against the real local control plane


@pytest.fixture
def admin(cluster: LocalCluster) -> Iterator[RawApi]:
    client = cluster.api_client()
    try:
        yield RawApi(client)
    finally:
        client.close()


def create_namespace(api: RawApi, name: str) -> None:
    api.request("POST", "/api/v1/namespaces",
                body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})


def delete_namespace(api: RawApi, name: str) -> None:
    api_status(api, "DELETE", f"/api/v1/namespaces/{name}")


class Release:
    """One helm release in the test cluster, uninstalled (with its namespaces) at the end."""

    def __init__(self, helm: Path, cluster: LocalCluster, api: RawApi) -> None:
        self.helm = helm
        self.cluster = cluster
        self.api = api
        self.name = f"t{suffix()}"  # fullname: <name>-gpupool
        self.namespace = f"{self.name}-sys"
        self.fullname = f"{self.name}-gpupool"
        self.namespaces: list[str] = []
        self.installed = False

    def namespace_for(self, label: str) -> str:
        ns = f"{self.name}-{label}"
        create_namespace(self.api, ns)
        self.namespaces.append(ns)
        return ns

    def helm_cmd(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([self.helm, *args, "--namespace", self.namespace,
                    "--kubeconfig", self.cluster.kubeconfig], check=check)

    def install(self, *args: str | Path, chart: Path = CHART) -> str:
        create_namespace(self.api, self.namespace)
        self.namespaces.append(self.namespace)
        self.installed = True  # a failed install may leave objects: uninstall at the end
        return self.helm_cmd("install", self.name, chart, *args).stdout

    def upgrade(self, *args: str | Path, chart: Path = CHART,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.helm_cmd("upgrade", self.name, chart, *args, check=check)

    def history(self) -> list[Obj]:
        out = self.helm_cmd("history", self.name, "--output", "json").stdout
        return list(json.loads(out))

    def values(self, tmp_path: Path, values: Obj) -> Path:
        path = tmp_path / f"values-{suffix()}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    def cleanup(self) -> None:
        if self.installed:
            self.helm_cmd("uninstall", self.name, check=False)
        for ns in self.namespaces:
            delete_namespace(self.api, ns)


@pytest.fixture
def release(helm_bin: Path, cluster: LocalCluster, admin: RawApi) -> Iterator[Release]:
    rel = Release(helm_bin, cluster, admin)
    try:
        yield rel
    finally:
        rel.cleanup()


CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def crd_path(name: str) -> str:
    return f"{CRDS}/{name}"


def pool_body(name: str) -> Obj:
    return {"apiVersion": "gpupool.dev/v1alpha1", "kind": "Pool", "metadata": {"name": name},
            "spec": {"model": {"id": "tiny/model"}, "seats": 1,
                     "blocks": {"europe": {"price": "39.00"}}, "published": False}}


@pytest.mark.integration
def test_install_upgrade_uninstall(release: Release, admin: RawApi, tmp_path: Path) -> None:
    api, full = admin, release.fullname
    team = release.namespace_for("team")

    # install: every namespace watched, so ClusterRoles; CRDs come from crds/.
    notes = release.install()
    assert "kubectl apply --server-side -f crds/" in notes  # NOTES.txt says how to upgrade CRDs
    ns = release.namespace
    for path in (crd_path("pools.gpupool.dev"), crd_path("subscriptions.gpupool.dev"),
                 f"/apis/apps/v1/namespaces/{ns}/deployments/{full}-operator",
                 f"/apis/apps/v1/namespaces/{ns}/deployments/{full}-gateway",
                 f"/api/v1/namespaces/{ns}/services/{full}-gateway",
                 f"/api/v1/namespaces/{ns}/serviceaccounts/{full}-operator",
                 f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{full}-operator",
                 f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{full}-gateway",
                 f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies/"
                 f"{full}-vllm-ingress"):
        assert exists(api, path), path
    # The API server accepted the operator Deployment as rendered (and the controllers act on it).
    poll("the operator's ReplicaSet", lambda: [
        rs for rs in api.get(f"/apis/apps/v1/namespaces/{ns}/replicasets")["items"]
        if rs["metadata"]["name"].startswith(f"{full}-operator-")])
    api.request("POST", f"/apis/gpupool.dev/v1alpha1/namespaces/{team}/pools",
                body=pool_body("survivor"))

    # upgrade: Helm never upgrades crds/ -- a changed CRD in the chart is not applied.
    chart_copy = tmp_path / "gpupool"
    shutil.copytree(CHART, chart_copy)
    crd_file = chart_copy / "crds" / "pools.gpupool.dev.yaml"
    crd = yaml.safe_load(crd_file.read_text())
    crd["metadata"].setdefault("labels", {})["gpupool.dev/test-marker"] = release.name
    crd_file.write_text(yaml.safe_dump(crd))
    values = release.values(tmp_path, {"watchNamespaces": [team],
                                       "image": {"tag": "0.1.0-upgraded"},
                                       "stripe": {"existingSecret": "billing"}})
    release.upgrade("-f", values, chart=chart_copy)
    live_crd = api.get(crd_path("pools.gpupool.dev"))
    assert "gpupool.dev/test-marker" not in (live_crd["metadata"].get("labels") or {})
    # ... while everything else follows the new values: ClusterRole swapped for Roles.
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    poll("the all-namespaces ClusterRole to go",
         lambda: not exists(api, f"{rbac}/clusterroles/{full}-operator"))
    assert rule_set(api.get(f"{rbac}/clusterroles/{full}-operator-cluster")["rules"]) == (
        OPERATOR_CLUSTER)
    assert rule_set(api.get(f"{rbac}/namespaces/{team}/roles/{full}-operator")["rules"]) == (
        OPERATOR_NAMESPACED)
    assert exists(api, f"{rbac}/namespaces/{team}/rolebindings/{full}-gateway")
    op = api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{full}-operator")
    c = container(op)
    assert c["image"] == "gpupool/gpupool:0.1.0-upgraded"
    assert c["args"][-2:] == ["--namespace", team]
    assert op["spec"]["strategy"]["type"] == "Recreate"

    # Billing on: the operator's Services reach its pod on the ports it serves (the endpoints
    # controller resolves the named target ports against the running pod).
    def endpoint_ports(service: str) -> set[tuple[str, int]]:
        ep = api.get(f"/api/v1/namespaces/{ns}/endpoints/{service}")
        return {(p["name"], p["port"]) for sub in ep.get("subsets") or []
                if sub.get("addresses") for p in sub["ports"]}
    poll("the operator's webhook and metrics endpoints", lambda: (
        endpoint_ports(f"{full}-operator-webhook") == {("webhook", 8081)}
        and endpoint_ports(f"{full}-operator-metrics") == {("metrics", 9090)}))

    # A values file the schema refuses leaves the release as it was.
    bad = release.values(tmp_path, {"gateway": {"replicas": "many"}})
    proc = release.upgrade("-f", bad, "--reuse-values", check=False)
    assert proc.returncode != 0 and SCHEMA_REFUSED in proc.stderr, proc.stderr
    history = release.history()
    assert [h["revision"] for h in history] == [1, 2]
    assert history[-1]["status"] == "deployed"

    # uninstall: the release's objects go; CRDs and Pools stay (README: Uninstalling).
    release.helm_cmd("uninstall", release.name, "--wait")
    release.installed = False
    gone = [f"/apis/apps/v1/namespaces/{ns}/deployments/{full}-operator",
            f"/apis/apps/v1/namespaces/{ns}/deployments/{full}-gateway",
            f"/api/v1/namespaces/{ns}/services/{full}-gateway",
            f"/api/v1/namespaces/{ns}/services/{full}-operator-metrics",
            f"/api/v1/namespaces/{ns}/services/{full}-operator-webhook",
            f"/api/v1/namespaces/{ns}/serviceaccounts/{full}-operator",
            f"/api/v1/namespaces/{ns}/serviceaccounts/{full}-gateway",
            f"{rbac}/clusterroles/{full}-operator-cluster",
            f"{rbac}/clusterrolebindings/{full}-operator-cluster",
            f"{rbac}/namespaces/{team}/roles/{full}-operator",
            f"{rbac}/namespaces/{team}/rolebindings/{full}-operator",
            f"{rbac}/namespaces/{team}/roles/{full}-gateway",
            f"/apis/networking.k8s.io/v1/namespaces/{team}/networkpolicies/"
            f"{full}-vllm-ingress"]
    poll("the release's objects to be deleted",
         lambda: not [p for p in gone if exists(api, p)], timeout=60)
    assert exists(api, crd_path("pools.gpupool.dev"))
    assert exists(api, crd_path("subscriptions.gpupool.dev"))
    assert exists(api, f"/apis/gpupool.dev/v1alpha1/namespaces/{team}/pools/survivor")


@pytest.mark.integration
def test_service_account_rbac_is_least_privilege(release: Release, cluster: LocalCluster,
                                                 admin: RawApi, tmp_path: Path) -> None:
    api, full = admin, release.fullname
    watched = release.namespace_for("watched")
    other = release.namespace_for("other")
    for ns in (watched, other):
        api.request("POST", f"/api/v1/namespaces/{ns}/secrets", body={
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "customer-data"},
            "stringData": {"apiKey": "not-for-you"}})
    release.install("-f", release.values(tmp_path, {"watchNamespaces": [watched]}))

    # 1.20 auto-creates ServiceAccount token Secrets; the operator would run with this token.
    op_client = cluster.api_client(
        service_account_token(api.api_client, release.namespace, f"{full}-operator"))
    gw_client = cluster.api_client(
        service_account_token(api.api_client, release.namespace, f"{full}-gateway"))
    try:
        op, gw = RawApi(op_client), RawApi(gw_client)
        # Bindings take effect at once in the authorizer's cache, but give it a moment.
        poll("the operator's Role to apply", lambda: api_status(
            op, "GET", f"/apis/gpupool.dev/v1alpha1/namespaces/{watched}/pools") == 200)

        # The operator can do its job in the watched namespace ...
        assert api_status(op, "GET", f"/api/v1/namespaces/{watched}/secrets") == 200
        assert api_status(op, "GET", f"/api/v1/namespaces/{watched}/secrets/customer-data") == 200
        assert api_status(op, "GET", f"/apis/apps/v1/namespaces/{watched}/deployments") == 200
        # kopf lists CRDs and namespaces; nothing reads one by name.
        assert api_status(op, "GET", CRDS) == 200
        assert api_status(op, "GET", "/api/v1/namespaces") == 200
        assert api_status(op, "GET", crd_path("pools.gpupool.dev")) == 403
        assert api_status(op, "GET", f"/api/v1/namespaces/{watched}") == 403
        # ... and nothing outside it: no Secrets, no Pools, no cluster-wide lists.
        assert api_status(op, "GET", f"/api/v1/namespaces/{other}/secrets/customer-data") == 403
        assert api_status(op, "GET", f"/api/v1/namespaces/{other}/secrets") == 403
        assert api_status(op, "GET", "/api/v1/secrets") == 403
        assert api_status(op, "GET", f"/apis/gpupool.dev/v1alpha1/namespaces/{other}/pools") == 403
        assert api_status(op, "GET", "/apis/gpupool.dev/v1alpha1/pools") == 403
        # It cannot delete, change or create CRDs, nor touch RBAC or its own release namespace.
        assert api_status(op, "DELETE", crd_path("pools.gpupool.dev")) == 403
        assert api_status(op, "PATCH", crd_path("pools.gpupool.dev"), body={},
                          content_type="application/merge-patch+json") == 403
        assert api_status(op, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                          body={"apiVersion": "apiextensions.k8s.io/v1",
                                "kind": "CustomResourceDefinition",
                                "metadata": {"name": "evil.gpupool.dev"}}) == 403
        assert api_status(op, "GET", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{watched}"
                                     "/roles") == 403
        assert api_status(op, "GET",
                          f"/api/v1/namespaces/{release.namespace}/secrets") == 403
        assert exists(api, crd_path("pools.gpupool.dev"))

        # The full picture, from the API server's own view of the token's rights.
        assert rules_review(op, watched) == OPERATOR_NAMESPACED | OPERATOR_CLUSTER
        assert rules_review(op, other) == OPERATOR_CLUSTER

        # The gateway lists (and watches) Secrets in the watched namespace, and does nothing
        # else: not even read one by name.
        assert api_status(gw, "GET", f"/api/v1/namespaces/{watched}/secrets") == 200
        assert api_status(gw, "GET", f"/api/v1/namespaces/{watched}/secrets/customer-data") == 403
        assert api_status(gw, "GET", f"/api/v1/namespaces/{other}/secrets") == 403
        assert api_status(gw, "GET", f"/api/v1/namespaces/{other}/secrets/customer-data") == 403
        assert api_status(gw, "POST", f"/api/v1/namespaces/{watched}/secrets", body={
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "forged"}}) == 403
        assert api_status(gw, "GET",
                          f"/apis/gpupool.dev/v1alpha1/namespaces/{watched}/pools") == 403
        assert rules_review(gw, watched) == GATEWAY_NAMESPACED
        assert rules_review(gw, other) == set()
    finally:
        op_client.close()
        gw_client.close()
    secret = api.get(f"/api/v1/namespaces/{other}/secrets/customer-data")
    assert base64.b64decode(secret["data"]["apiKey"]) == b"not-for-you"


@pytest.mark.integration
def test_plain_manifests_pass_server_validation(cluster: LocalCluster, admin: RawApi,
                                                kubectl_bin: str) -> None:
    """``kubectl apply -k manifests/`` as a server-side dry run: every object is valid for the
    API server (the Namespace itself is applied for real, so its objects can be dry-run)."""
    created = not exists(admin, "/api/v1/namespaces/gpupool")
    try:
        if created:
            create_namespace(admin, "gpupool")
        proc = run([kubectl_bin, "--kubeconfig", cluster.kubeconfig, "apply", "-k", MANIFESTS,
                    "--dry-run=server"])
        for kind, name in (("deployment.apps", "gpupool-operator"),
                           ("deployment.apps", "gpupool-gateway"),
                           ("clusterrole.rbac.authorization.k8s.io", "gpupool-operator"),
                           ("networkpolicy.networking.k8s.io", "gpupool-vllm-ingress"),
                           ("customresourcedefinition.apiextensions.k8s.io",
                            "pools.gpupool.dev")):
            assert f"{kind}/{name} " in proc.stdout, proc.stdout
    finally:
        if created:
            delete_namespace(admin, "gpupool")
