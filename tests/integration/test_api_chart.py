"""The chart's REST API parts (``api.enabled``), rendered with helm (no cluster needed).

The API's rights, exactly: it reads Pools (get, list: by slug, and by uid through the list);
creates Subscriptions, follows one with a watch until the operator decides, patches
``spec.cancelAtPeriodEnd`` and its own annotations, and deletes one the operator refused; reads
key Secrets and management-key Secrets by name. It never lists Secrets (a management key's
Secret name follows from the key's digest), never writes a Pool or a Secret, and holds these
rights in its one namespace only. The contract tests run the API on a ServiceAccount holding
exactly these rendered rules (``support.api.scoped_kubeconfig``), so they are also enough.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpupool.devcluster import cache_dir

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "gpupool"
Obj = dict[str, Any]

API_RULES = frozenset(
    {("gpupool.dev", "pools", v) for v in ("get", "list")}
    | {("gpupool.dev", "subscriptions", v)
       for v in ("get", "list", "watch", "create", "patch", "delete")}
    | {("", "secrets", "get")}
)


@pytest.fixture(scope="module")
def helm() -> Path:
    path = cache_dir() / "bin" / "helm"
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"helm not found at {path}: run `bash scripts/get-helm.sh`", pytrace=False)
    return path


def render(helm: Path, *args: str, check: bool = True) -> list[Obj] | str:
    proc = subprocess.run([str(helm), "template", "gpupool", str(CHART), "--namespace", "gpupool",
                           *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    if not check:
        return proc.stderr if proc.returncode else ""
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def docs_of(helm: Path, *args: str) -> list[Obj]:
    out = render(helm, *args)
    assert isinstance(out, list)
    return out


def api_docs(docs: list[Obj]) -> list[Obj]:
    return [d for d in docs if (d["metadata"].get("labels") or {}).get(
        "app.kubernetes.io/component") == "api"]


def one(docs: list[Obj], kind: str) -> Obj:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def rule_set(rules: list[Obj]) -> set[tuple[str, str, str]]:
    out = set()
    for rule in rules:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"]
                for v in rule["verbs"]}
    return out


def test_off_by_default(helm: Path) -> None:
    assert api_docs(docs_of(helm)) == []


def test_enabled_render(helm: Path) -> None:
    docs = api_docs(docs_of(helm, "--set", "api.enabled=true"))
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Role", "RoleBinding", "Service",
                                               "ServiceAccount"]
    role = one(docs, "Role")
    assert role["metadata"] == {**role["metadata"], "name": "gpupool-api",
                                "namespace": "gpupool"}
    assert rule_set(role["rules"]) == API_RULES
    binding = one(docs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "gpupool-api"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "gpupool-api",
                                    "namespace": "gpupool"}]
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "gpupool-api"
    assert pod["securityContext"]["runAsNonRoot"] is True
    [c] = pod["containers"]
    assert c["args"] == ["api", "--port", "8000", "--namespace", "gpupool"]
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    svc = one(docs, "Service")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert labels["app.kubernetes.io/component"] == "api"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http",
                                     "protocol": "TCP"}]


def test_namespace_follows_watch_namespaces(helm: Path) -> None:
    docs = api_docs(docs_of(helm, "--set", "api.enabled=true", "--set",
                            "watchNamespaces={team-a,team-b}"))
    assert one(docs, "Role")["metadata"]["namespace"] == "team-a"
    assert one(docs, "RoleBinding")["metadata"]["namespace"] == "team-a"
    assert one(docs, "Deployment")["metadata"]["namespace"] == "gpupool"
    [c] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert c["args"][-2:] == ["--namespace", "team-a"]
    docs = api_docs(docs_of(helm, "--set", "api.enabled=true", "--set",
                            "watchNamespaces={team-a,team-b}", "--set", "api.namespace=team-b"))
    assert one(docs, "Role")["metadata"]["namespace"] == "team-b"


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "watchNamespaces={team-a}", "--set", "api.namespace=elsewhere"],
     "api.namespace (elsewhere) must be one of watchNamespaces"),
    (["--set", "api.ports.http=9000"], "api.ports.http (9000) must equal the API's --port"),
    (["--set-string", "api.extraArgs={--namespace,x}"], "must not pass --namespace"),
    (["--set", "api.replicas=many"], "api"),
    (["--set", "api.namespace=Not_A_Namespace"], "api"),
])
def test_render_refuses(helm: Path, args: list[str], message: str) -> None:
    stderr = render(helm, "--set", "api.enabled=true", *args, check=False)
    assert stderr and message in stderr, stderr


def test_full_values(helm: Path) -> None:
    docs = api_docs(docs_of(helm, "-f", str(CHART / "values-full.yaml")))
    assert one(docs, "Role")["metadata"]["namespace"] == "team-b"
    assert rule_set(one(docs, "Role")["rules"]) == API_RULES
    dep = one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 2
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["api", "--port", "8088", "--namespace", "team-b", "--decision-timeout",
                         "30"]
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "gpupool-api-sa"
    assert one(docs, "ServiceAccount")["metadata"]["name"] == "gpupool-api-sa"
