"""Helpers for tests of ``gpupool api``: the API as a child process with a ServiceAccount scoped to
one namespace (the chart's own rules), management keys, and an HTTP caller that never prints a key.

The ``stack`` fixture (``support.api_fixtures``) starts one in a test's fresh namespace.

Keys (``sk_pool_...``) and management keys (``mk_...``) never reach test output: ``Reply`` and
``Caller`` have redacting reprs, ``redact`` masks them in anything compared with ``==``, and
management keys are made by ``gpupool api create-key`` with its stdout captured.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from gpupool.devcluster import LocalCluster, cache_dir, service_account_token
from support.kube import raw
from support.objects import Objects
from support.operator import LOG_DIR, ROOT, ChildProcess
from support.waiting import wait_for

Obj = dict[str, Any]
CHART = ROOT / "charts" / "gpupool"
SECRET_SHAPES = re.compile(r"(sk_pool_|mk_)[A-Za-z0-9_-]{8,}")


def redact(value: Any) -> Any:
    """``value`` with every key-shaped string masked (for comparisons that may be printed)."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return SECRET_SHAPES.sub(lambda m: f"{m.group(1)}<redacted>", value)
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chart_api_rules(namespace: str) -> list[Obj]:
    """The API's RBAC rules as the chart renders them (Role ``<release>-gpupool-api``)."""
    helm = cache_dir() / "bin" / "helm"
    assert helm.is_file(), f"helm missing at {helm}: run scripts/get-helm.sh"
    out = subprocess.run(
        [str(helm), "template", "t", str(CHART), "--namespace", "gpupool",
         "--set", "api.enabled=true", "--set", f"watchNamespaces={{{namespace}}}"],
        capture_output=True, text=True, check=True, timeout=120).stdout
    roles = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Role"
             and d["metadata"]["name"].endswith("-api")]
    assert len(roles) == 1, f"expected one API Role, found {len(roles)}"
    rules: list[Obj] = roles[0]["rules"]
    return rules


def scoped_kubeconfig(cluster: LocalCluster, kube: Any, namespace: str, path: Path) -> Path:
    """A kubeconfig for a ServiceAccount in ``namespace`` holding exactly the chart's API rules
    there (and nothing anywhere else)."""
    api = raw(kube)
    api.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", body={
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "gpupool-api"}})
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}"
    api.request("POST", f"{rbac}/roles", body={
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "gpupool-api"}, "rules": chart_api_rules(namespace)})
    api.request("POST", f"{rbac}/rolebindings", body={
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "gpupool-api"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "gpupool-api"},
        "subjects": [{"kind": "ServiceAccount", "name": "gpupool-api",
                      "namespace": namespace}]})
    token = service_account_token(kube, namespace, "gpupool-api")
    return cluster.write_kubeconfig(path, token=token, user="gpupool-api")


class ApiProcess(ChildProcess):
    """``gpupool api`` in a subprocess; its log stays under LOG_DIR (the key-leak test reads it)."""

    def __init__(self, kubeconfig: Path, namespace: str, name: str,
                 decision_timeout: float = 30.0) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.name = name
        self.decision_timeout = decision_timeout
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"api-{name}-{os.getpid()}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiProcess:
        cmd = [sys.executable, "-m", "gpupool", "api", "--kubeconfig", str(self.kubeconfig),
               "--namespace", self.namespace, "--host", "127.0.0.1", "--port", str(self.port),
               "--decision-timeout", str(self.decision_timeout)]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                     start_new_session=True)
        wait_for(self.ready, timeout=60, interval=0.2,
                 message=lambda: f"gpupool api ready; log tail:\n{self.log_tail()}")
        return self

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"gpupool api exited; log tail:\n{self.log_tail()}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


def create_management_key(kubeconfig: Path | str, namespace: str, customer: str,
                          email: str | None = None) -> str:
    """``gpupool api create-key``; returns the key (never print it)."""
    cmd = [sys.executable, "-m", "gpupool", "api", "create-key", "--kubeconfig", str(kubeconfig),
           "--namespace", namespace, "--customer", customer]
    if email:
        cmd += ["--email", email]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, f"create-key exited {proc.returncode}: {proc.stderr[-2000:]}"
    key = proc.stdout.strip()
    shaped = bool(re.fullmatch(r"mk_[A-Za-z0-9_-]{43}", key))
    assert shaped, "create-key did not print one management key on stdout"
    return key


@dataclass(repr=False)
class Reply:
    status: int
    body: Any

    @property
    def data(self) -> Any:
        assert isinstance(self.body, dict) and self.body.get("success") is True, \
            f"not a success envelope: {self!r}"
        return self.body["data"]

    @property
    def error(self) -> str:
        assert isinstance(self.body, dict) and self.body.get("success") is False, \
            f"not an error envelope: {self!r}"
        return str(self.body["error"])

    def __repr__(self) -> str:
        return f"Reply({self.status}, {redact(self.body)!r})"


@dataclass(repr=False)
class Caller:
    """HTTP calls to the API as one customer (``key`` is a management key, or None)."""

    base: str
    key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Caller({self.base})"

    def request(self, method: str, path: str, json: Any = None, *, content: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60.0) -> Reply:
        hdrs = dict(self.headers)
        if self.key is not None:
            hdrs["Authorization"] = f"Bearer {self.key}"
        hdrs.update(headers or {})
        resp = httpx.request(method, self.base + path, json=json, content=content, headers=hdrs,
                             timeout=timeout)
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        return Reply(resp.status_code, body)

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Reply:
        return self.request("POST", path, json, **kw)

    def delete(self, path: str, **kw: Any) -> Reply:
        return self.request("DELETE", path, **kw)


# ---- a stack: the API in front of an operator, in one namespace --------------------------------

@dataclass
class Stack:
    cluster: LocalCluster
    namespace: str
    objs: Objects
    api: ApiProcess

    def caller(self, customer: str, email: str | None = None) -> Caller:
        key = create_management_key(self.cluster.kubeconfig, self.namespace, customer, email)
        return Caller(self.api.url, key)

    def uid(self, plural: str, name: str) -> str:
        obj = self.objs.get(plural, name)
        assert obj is not None, f"{plural}/{name} missing"
        return str(obj["metadata"]["uid"])

    def sub_by_uid(self, uid: str) -> Obj:
        [sub] = [s for s in self.objs.list_subs() if s["metadata"]["uid"] == uid]
        return sub

    def wait_pool(self, name: str, **status: Any) -> Obj:
        def reached() -> Obj | None:
            pool = self.objs.get("pools", name) or {}
            st = pool.get("status") or {}
            return pool if all(st.get(k) == v for k, v in status.items()) else None

        def now() -> str:
            st = (self.objs.get("pools", name) or {}).get("status") or {}
            return f"pool {name} status {status} (now { {k: st.get(k) for k in status} })"
        return wait_for(reached, timeout=60, message=now)


def start_stack(cluster: LocalCluster, kube: Any, namespace: str, tmp: Path, name: str,
                decision_timeout: float = 30.0) -> Stack:
    kubeconfig = scoped_kubeconfig(cluster, kube, namespace, tmp / "api.kubeconfig")
    api = ApiProcess(kubeconfig, namespace, name, decision_timeout=decision_timeout).start()
    return Stack(cluster, namespace, Objects(kube, namespace), api)
