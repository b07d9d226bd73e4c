"""A real local Kubernetes control plane for the tests and the demo.

``LocalCluster`` runs etcd, kube-apiserver, kube-controller-manager and kube-scheduler (v1.20,
built by ``scripts/build-control-plane.sh`` into ``$GPUPOOL_CACHE/k8s/bin``; etcd from PATH) on
free loopback ports, with every file it needs in one work directory:

    workdir/
      pids                  one line per started process: "PID NAME STARTTIME"
      up.pid                pid of a running ``python -m gpupool.devcluster up`` (CLI only)
      logs/NAME.log         each process's output
      etcd-data/            etcd's data
      certs/                the API server's self-signed serving cert (apiserver.crt is the CA)
      tokens.csv            static admin token (group system:masters)
      sa.key, sa.pub        the service-account signing key (openssl)
      kubeconfig            admin kubeconfig (``LocalCluster.kubeconfig``)

There is no kubelet. ``add_gpu_nodes`` creates Ready Node objects with GPU capacity so the
scheduler binds pods, and ``FakeKubelet`` (a background thread) plays the kubelet's part for pods
bound to those nodes: it marks them Running/Ready with a pod IP, can hold them back or fail them,
and finishes graceful deletions (without it a deleted pod on a node would never go away).

Command line (the demo uses it)::

    python -m gpupool.devcluster up --dir DIR [--gpu-nodes N --gpus-per-node G]
    python -m gpupool.devcluster down --dir DIR

``up`` prints the kubeconfig path on stdout once everything is ready, writes ``DIR/ready`` and runs
until SIGTERM/SIGINT; ``down`` stops it (and kills whatever the pids file still lists).

The sync ``kubernetes`` client (a dev dependency) is imported lazily, so ``import gpupool`` never
needs it. Everything that talks to the API here sends raw JSON through ``RawApi`` rather than the
generated models, so it does not depend on how a given client version models a 1.20 object.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

log = logging.getLogger("gpupool.devcluster")

Obj = dict[str, Any]

K8S_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
CONTROLLERS = "*,-nodeipam,-nodelifecycle,-ttl,-bootstrapsigner,-tokencleaner"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
FAKE_NODE_LABEL = "gpupool.dev/fake-node"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
MERGE_PATCH = "application/merge-patch+json"

_PR_SET_PDEATHSIG = 1


class DevClusterError(RuntimeError):
    """The local control plane could not be started or did not become ready."""


# --------------------------------------------------------------------------------------------
# binaries and small process helpers


def cache_dir() -> Path:
    """``$GPUPOOL_CACHE`` or ``~/.cache/gpupool``."""
    env = os.environ.get("GPUPOOL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gpupool"


def k8s_bin_dir() -> Path:
    return cache_dir() / "k8s" / "bin"


def find_binary(name: str) -> Path:
    """A control-plane binary: the build cache first, then PATH."""
    candidate = k8s_bin_dir() / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    raise DevClusterError(
        f"{name} not found in {k8s_bin_dir()} or on PATH; run scripts/build-control-plane.sh")


def binaries_available() -> bool:
    try:
        for name in (*K8S_BINARIES, "etcd", "openssl"):
            find_binary(name)
    except DevClusterError:
        return False
    return True


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, starttime) of a live process, from /proc/PID/stat; None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ppid ..." -- comm may contain spaces and parentheses.
    rest = raw[raw.rfind(")") + 2:].split()
    if len(rest) < 20:
        return None
    return rest[0], rest[19]


def pid_alive(pid: int, start_time: str | None = None) -> bool:
    """True if ``pid`` runs (zombies count as dead) and, if given, started at ``start_time``."""
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return start_time is None or stat[1] == start_time


@dataclass(frozen=True)
class PidRecord:
    pid: int
    name: str
    start_time: str

    def line(self) -> str:
        return f"{self.pid} {self.name} {self.start_time}\n"

    def alive(self) -> bool:
        return pid_alive(self.pid, self.start_time)


def read_pids(path: Path) -> list[PidRecord]:
    """The records of a pids file (a missing file has none)."""
    records = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        parts = line.split()
        if not parts or not parts[0].isdigit():
            continue
        name = parts[1] if len(parts) > 1 else "?"
        start = parts[2] if len(parts) > 2 else ""
        records.append(PidRecord(int(parts[0]), name, start))
    return records


def kill_pids(records: Iterable[PidRecord], timeout: float = 10.0) -> None:
    """SIGTERM every live record, then SIGKILL what is still alive after ``timeout``.

    A record only counts as alive if its pid still has the recorded start time, so a pid the
    kernel has since reused for another process is left alone. etcd goes last (see ``stop``).
    """
    records = list(records)
    _kill_now([r for r in records if r.name != "etcd"], timeout)
    _kill_now([r for r in records if r.name == "etcd"], timeout)


def _kill_now(records: Iterable[PidRecord], timeout: float) -> None:
    live = [r for r in records if r.alive()]
    for r in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(r.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        live = [r for r in live if r.alive()]
        if live:
            time.sleep(0.05)
    for r in live:
        log.warning("devcluster: %s (pid %d) ignored SIGTERM; killing it", r.name, r.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(r.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while live and time.monotonic() < deadline:
        live = [r for r in live if r.alive()]
        if live:
            time.sleep(0.05)


def _die_with_parent_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel SIGKILL the child when this process dies.

    Linux delivers the signal when the *thread* that forked the child exits, so it is only used
    for children started from the main thread (a child started from a short-lived helper thread
    would otherwise die with that thread).
    """
    if threading.current_thread() is not threading.main_thread() or not sys.platform.startswith(
            "linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return preexec


@dataclass
class _Process:
    name: str
    args: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    record: PidRecord | None = None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _terminate(processes: Sequence[_Process], timeout: float = 10.0) -> None:
    """SIGTERM, wait (reaping), SIGKILL after ``timeout``, wait again."""
    live = [p for p in processes if p.popen is not None and p.popen.poll() is None]
    for p in live:
        assert p.popen is not None
        with contextlib.suppress(ProcessLookupError):
            p.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in live:
        assert p.popen is not None
        try:
            p.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.info("devcluster: %s (pid %d) still running %.0fs after SIGTERM; killing it",
                     p.name, p.popen.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                p.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(5.0)


# --------------------------------------------------------------------------------------------
# raw JSON access through the sync kubernetes client


class RawApi:
    """JSON requests through a ``kubernetes.client.ApiClient``, without the generated models."""

    def __init__(self, api_client: ApiClient) -> None:
        self.api_client = api_client

    def _send(self, method: str, path: str, query: Mapping[str, Any] | None, body: Any,
              content_type: str | None, timeout: float | tuple[float, float]) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        params = [(k, str(v).lower() if isinstance(v, bool) else str(v))
                  for k, v in (query or {}).items() if v is not None]
        method, url, headers, body, _ = self.api_client.param_serialize(
            method=method, resource_path=path, query_params=params, header_params=headers,
            body=body, auth_settings=["BearerToken"])
        return self.api_client.call_api(method, url, headers, body, _request_timeout=timeout)

    def request(self, method: str, path: str, *, query: Mapping[str, Any] | None = None,
                body: Any = None, content_type: str | None = None,
                timeout: float = 30.0) -> Any:
        """The decoded JSON answer; raises ``kubernetes.client.ApiException`` on an error."""
        from kubernetes.client import ApiException

        resp = self._send(method, path, query, body, content_type, timeout)
        data = resp.read()
        text = data.decode("utf-8", errors="replace") if data else ""
        if not 200 <= resp.status <= 299:
            raise ApiException(status=resp.status, reason=resp.reason, body=text)
        return json.loads(text) if text else None

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query)

    def stream(self, path: str, *, query: Mapping[str, Any] | None = None,
               timeout: tuple[float, float] = (5.0, 60.0)) -> Any:
        """An open streaming response (a urllib3 ``HTTPResponse``) for a watch."""
        from kubernetes.client import ApiException

        resp = self._send("GET", path, query, None, None, timeout)
        if not 200 <= resp.status <= 299:
            text = resp.read().decode("utf-8", errors="replace")
            raise ApiException(status=resp.status, reason=resp.reason, body=text)
        return resp.response


def _is_status(exc: BaseException, *codes: int) -> bool:
    return getattr(exc, "status", None) in codes


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# nodes


def add_gpu_nodes(api_client: ApiClient, count: int, gpus_per_node: int,
                  resource_name: str = DEFAULT_GPU_RESOURCE, *, prefix: str = "gpu-node",
                  cpu: str = "64", memory: str = "512Gi", pods: int = 110,
                  labels: Mapping[str, str] | None = None) -> list[str]:
    """Create ``count`` Ready nodes with ``gpus_per_node`` of ``resource_name`` each.

    Names continue after existing ``PREFIX-N`` nodes. Each node gets a podCIDR
    (10.244.N.0/24) from which the fake kubelet hands out pod IPs, the label
    ``gpupool.dev/fake-node=true``, and no ``not-ready`` taint (the TaintNodesByCondition
    admission plugin adds one and only the disabled node-lifecycle controller would lift it).
    Returns the new node names.
    """
    raw = RawApi(api_client)
    existing = raw.get("/api/v1/nodes")["items"]
    used = set()
    for node in existing:
        m = re.fullmatch(rf"{re.escape(prefix)}-(\d+)", node["metadata"]["name"])
        if m:
            used.add(int(m.group(1)))
    taken_cidrs = {n.get("spec", {}).get("podCIDR") for n in existing}
    names = []
    index = 0
    for _ in range(count):
        while index in used:
            index += 1
        used.add(index)
        subnet = next(s for s in itertools.count(index) if f"10.244.{s % 250}.0/24"
                      not in taken_cidrs) % 250
        taken_cidrs.add(f"10.244.{subnet}.0/24")
        name = f"{prefix}-{index}"
        resources = {"cpu": cpu, "memory": memory, "pods": str(pods),
                     "ephemeral-storage": "500Gi", resource_name: str(gpus_per_node)}
        now = _now()
        conditions = [
            {"type": t, "status": "False", "reason": f"Kubelet{r}",
             "message": m, "lastHeartbeatTime": now, "lastTransitionTime": now}
            for t, r, m in (("MemoryPressure", "HasSufficientMemory", "enough memory"),
                            ("DiskPressure", "HasNoDiskPressure", "no disk pressure"),
                            ("PIDPressure", "HasSufficientPID", "enough PIDs"))
        ]
        conditions.append({"type": "Ready", "status": "True", "reason": "KubeletReady",
                           "message": "gpupool fake kubelet is posting ready status",
                           "lastHeartbeatTime": now, "lastTransitionTime": now})
        status = {
            "capacity": resources,
            "allocatable": resources,
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": f"10.0.0.{10 + subnet}"},
                          {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": secrets.token_hex(16), "systemUUID": secrets.token_hex(16),
                         "bootID": secrets.token_hex(16), "kernelVersion": "6.1.0",
                         "osImage": "gpupool fake node", "containerRuntimeVersion": "fake://1.0",
                         "kubeletVersion": "v1.20.2", "kubeProxyVersion": "v1.20.2",
                         "operatingSystem": "linux", "architecture": "amd64"},
        }
        node_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", FAKE_NODE_LABEL: "true",
                       **(labels or {})}
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": node_labels},
                "spec": {"podCIDR": f"10.244.{subnet}.0/24",
                         "podCIDRs": [f"10.244.{subnet}.0/24"]},
                "status": status}
        created = raw.request("POST", "/api/v1/nodes", body=body)
        taints = created.get("spec", {}).get("taints") or []
        kept = [t for t in taints if not t.get("key", "").startswith("node.kubernetes.io/")]
        if kept != taints:
            raw.request("PATCH", f"/api/v1/nodes/{name}", body={"spec": {"taints": kept or None}},
                        content_type=MERGE_PATCH)
        # Status on create is kept for nodes, but patch it too: that is what a kubelet does.
        raw.request("PATCH", f"/api/v1/nodes/{name}/status", body={"status": status},
                    content_type=MERGE_PATCH)
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------
# the kubelet stand-in

PodPredicate = Callable[[Obj], bool]
RuleAction = Literal["hold", "fail", "unready"]

_SELECTOR_TERM = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_./-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9_.-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$")


def label_selector_predicate(selector: str | Mapping[str, str]) -> Callable[[Mapping[str, str]],
                                                                           bool]:
    """A matcher for a label selector: a mapping (matchLabels) or the string form
    (``a=b,c!=d,e,!f,g in (x,y),h notin (z)``)."""
    if isinstance(selector, Mapping):
        wanted = dict(selector)
        return lambda labels: all(labels.get(k) == v for k, v in wanted.items())
    terms: list[tuple[str, str, frozenset[str]]] = []  # (op, key, values)
    for part in re.split(r",(?![^()]*\))", selector):
        if not part.strip():
            continue
        m = _SELECTOR_TERM.match(part)
        if not m or (m.group("neg") and (m.group("op") or m.group("setop"))):
            raise ValueError(f"unsupported label selector term {part!r}")
        key = m.group("key")
        if m.group("op"):
            op = "!=" if m.group("op") == "!=" else "="
            terms.append((op, key, frozenset([m.group("value")])))
        elif m.group("setop"):
            values = frozenset(v.strip() for v in m.group("values").split(",") if v.strip())
            terms.append((m.group("setop"), key, values))
        else:
            terms.append(("!" if m.group("neg") else "exists", key, frozenset()))

    def term_ok(op: str, key: str, values: frozenset[str], labels: Mapping[str, str]) -> bool:
        if op == "exists":
            return key in labels
        if op == "!":
            return key not in labels
        if op in ("=", "in"):
            return labels.get(key) in values
        return labels.get(key) not in values  # "!=", "notin"

    return lambda labels: all(term_ok(*t, labels) for t in terms)


def pod_predicate(*, selector: str | Mapping[str, str] | None = None,
                  name_prefix: str | None = None, namespace: str | None = None,
                  predicate: PodPredicate | None = None) -> PodPredicate:
    """Combine the ways a rule can pick pods (all given ones must match)."""
    label_match = label_selector_predicate(selector) if selector is not None else None

    def match(pod: Obj) -> bool:
        meta = pod.get("metadata", {})
        if namespace is not None and meta.get("namespace") != namespace:
            return False
        if name_prefix is not None and not meta.get("name", "").startswith(name_prefix):
            return False
        if label_match is not None and not label_match(meta.get("labels") or {}):
            return False
        return predicate is None or bool(predicate(pod))

    return match


@dataclass(eq=False)
class PodRule:
    """A hold/fail rule of a ``FakeKubelet``; ``release()`` removes it."""

    kubelet: FakeKubelet
    action: RuleAction
    match: PodPredicate
    description: str
    reason: str = "Error"
    message: str = ""

    def release(self) -> None:
        self.kubelet.release(self)

    def __enter__(self) -> PodRule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def pod_is_ready(pod: Obj) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or [])


class _WatchExpired(Exception):
    pass


@dataclass
class _NodeInfo:
    host_ip: str
    cidr_base: str | None
    next_host: int = 2
    ips: dict[str, str] = field(default_factory=dict)  # pod uid -> ip


class FakeKubelet:
    """Plays the kubelet for pods bound to fake nodes (label ``gpupool.dev/fake-node=true``).

    A background thread lists and watches all pods (re-listing after any error or an expired
    watch, so it survives API server restarts) and for each pod bound to a fake node:

    - being deleted gracefully: deletes it with grace period 0, as the kubelet does once its
      containers stopped;
    - matched by a ``fail`` rule: phase Failed (``mode="failed"``) or Running with its containers
      in CrashLoopBackOff and not ready (``mode="unready"``); this also hits pods that are
      already Running;
    - matched by a ``hold`` rule and not yet ready: Pending, containers waiting in
      ContainerCreating;
    - otherwise, unless already Running and Ready: Running with a pod IP from the node's podCIDR,
      every container running and ready, and the Initialized/ContainersReady/Ready conditions.

    ``fail``/``release`` re-examine all pods before they return (or, if the API server is
    unreachable, make the thread re-list as soon as it is back).
    """

    def __init__(self, api_client_factory: Callable[[], ApiClient], *,
                 node_selector: str | Mapping[str, str] = {FAKE_NODE_LABEL: "true"}) -> None:
        self._api_client_factory = api_client_factory
        self._node_match = label_selector_predicate(node_selector)
        self._api: RawApi | None = None
        self._lock = threading.RLock()
        self._rules: list[PodRule] = []
        self._nodes: dict[str, _NodeInfo | None] = {}
        self._node_checked: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._response: Any = None
        self._synced = threading.Event()
        self.patches = 0
        self.errors = 0

    # lifecycle ----------------------------------------------------------------------------

    def start(self, wait: float = 30.0) -> FakeKubelet:
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._synced.clear()
        self._api = RawApi(self._api_client_factory())
        self._thread = threading.Thread(target=self._run, name="fake-kubelet", daemon=True)
        self._thread.start()
        if wait and not self._synced.wait(wait):
            raise DevClusterError("fake kubelet: the first pod list did not succeed in time")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        resp = self._response
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.shutdown()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("fake kubelet: thread did not stop within %.0fs", timeout)
            self._thread = None
        if self._api is not None:
            with contextlib.suppress(Exception):
                self._api.api_client.close()
            self._api = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> FakeKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # rules --------------------------------------------------------------------------------

    def hold(self, *, selector: str | Mapping[str, str] | None = None,
             name_prefix: str | None = None, namespace: str | None = None,
             predicate: PodPredicate | None = None) -> PodRule:
        """Keep matching pods Pending/not ready until the rule is released.

        Pods that are already ready stay ready.
        """
        return self._add_rule("hold", selector, name_prefix, namespace, predicate)

    def fail(self, *, selector: str | Mapping[str, str] | None = None,
             name_prefix: str | None = None, namespace: str | None = None,
             predicate: PodPredicate | None = None,
             mode: Literal["failed", "unready"] = "failed", reason: str = "Error",
             message: str = "failed by the gpupool fake kubelet") -> PodRule:
        """Fail matching pods, including ones already running.

        ``mode="failed"``: phase Failed (terminal; releasing the rule does not revive them).
        ``mode="unready"``: Running, containers in CrashLoopBackOff and not ready; releasing
        the rule makes them ready again.
        """
        action: RuleAction = "fail" if mode == "failed" else "unready"
        return self._add_rule(action, selector, name_prefix, namespace, predicate,
                              reason=reason, message=message)

    def release(self, rule: PodRule | None = None) -> None:
        """Remove one rule (or all of them) and bring the pods they held up to date."""
        with self._lock:
            if rule is None:
                self._rules.clear()
            elif rule in self._rules:
                self._rules.remove(rule)
        self._resync_or_kick()

    @property
    def rules(self) -> list[PodRule]:
        with self._lock:
            return list(self._rules)

    def _add_rule(self, action: RuleAction, selector: str | Mapping[str, str] | None,
                  name_prefix: str | None, namespace: str | None,
                  predicate: PodPredicate | None, reason: str = "Error",
                  message: str = "") -> PodRule:
        if selector is None and name_prefix is None and namespace is None and predicate is None:
            raise ValueError("a rule needs a selector, name_prefix, namespace or predicate")
        desc = ", ".join(f"{k}={v!r}" for k, v in (("selector", selector),
                                                    ("name_prefix", name_prefix),
                                                    ("namespace", namespace),
                                                    ("predicate", predicate)) if v is not None)
        rule = PodRule(self, action, pod_predicate(selector=selector, name_prefix=name_prefix,
                                                   namespace=namespace, predicate=predicate),
                       f"{action}({desc})", reason=reason, message=message)
        with self._lock:
            self._rules.append(rule)
        if action != "hold":
            self._resync_or_kick()
        return rule

    def _resync_or_kick(self) -> None:
        """Apply changed rules now; if the API is unreachable, have the thread re-list later."""
        try:
            self.resync()
        except Exception as exc:
            log.warning("fake kubelet: could not apply rules now (%s); will on the next re-list",
                        exc)
            resp = self._response
            if resp is not None:  # break the current watch: the thread re-lists
                with contextlib.suppress(Exception):
                    resp.shutdown()

    # syncing ------------------------------------------------------------------------------

    def resync(self) -> str | None:
        """List all pods and bring each up to date now; returns the list's resourceVersion.

        Does nothing (returns None) while the kubelet is not started.
        """
        api = self._api
        if api is None:
            return None
        pods = api.get("/api/v1/pods")
        self._synced.set()
        failed: list[Exception] = []
        for pod in pods.get("items", []):
            try:
                self._sync_pod_safely(api, pod)
            except Exception as exc:  # go on with the other pods, report it afterwards
                failed.append(exc)
        if failed:
            raise failed[0]
        rv = pods.get("metadata", {}).get("resourceVersion")
        return str(rv) if rv is not None else None

    def _run(self) -> None:
        api = self._api
        assert api is not None
        rv: str | None = None
        backoff = 0.1
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self.resync()
                rv = self._watch(api, rv)
                backoff = 0.1
            except _WatchExpired:
                rv = None
            except Exception as exc:
                if self._stop.is_set():
                    break
                log.debug("fake kubelet: watch failed (%s); re-listing", exc)
                rv = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def _watch(self, api: RawApi, rv: str | None) -> str | None:
        query = {"watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": 50,
                 "resourceVersion": rv}
        resp = api.stream("/api/v1/pods", query=query, timeout=(5.0, 65.0))
        self._response = resp
        try:
            if self._stop.is_set():
                return rv
            buf = b""
            for chunk in resp.stream(amt=None, decode_content=False):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        rv = self._handle_event(api, json.loads(line), rv)
                if self._stop.is_set():
                    break
            return rv
        finally:
            self._response = None
            with contextlib.suppress(Exception):
                resp.close()
            with contextlib.suppress(Exception):
                resp.release_conn()

    def _handle_event(self, api: RawApi, event: Obj, rv: str | None) -> str | None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _WatchExpired()
            raise RuntimeError(f"watch error: {obj.get('message')}")
        new_rv = obj.get("metadata", {}).get("resourceVersion") or rv
        if kind in ("ADDED", "MODIFIED"):
            self._sync_pod_safely(api, obj)
        elif kind == "DELETED":
            self._forget_pod(obj)
        return str(new_rv) if new_rv is not None else None

    def _sync_pod_safely(self, api: RawApi, pod: Obj) -> None:
        try:
            self._sync_pod(api, pod)
        except Exception as exc:
            if _is_status(exc, 404, 409) or (
                    _is_status(exc, 422) and "metadata.uid" in str(getattr(exc, "body", ""))):
                return  # gone or re-created meanwhile: a later event brings the new one
            self.errors += 1
            meta = pod.get("metadata", {})
            log.warning("fake kubelet: could not sync pod %s/%s: %s",
                        meta.get("namespace"), meta.get("name"), exc)
            raise

    def _node(self, api: RawApi, name: str) -> _NodeInfo | None:
        with self._lock:
            if name in self._nodes and (self._nodes[name] is not None or time.monotonic()
                                        - self._node_checked.get(name, 0.0) < 2.0):
                return self._nodes[name]
        try:
            node = api.get(f"/api/v1/nodes/{name}")
        except Exception as exc:
            if not _is_status(exc, 404):
                raise
            node = None
        info = None
        if node is not None and self._node_match(node["metadata"].get("labels") or {}):
            addresses = node.get("status", {}).get("addresses") or []
            host_ip = next((a["address"] for a in addresses if a.get("type") == "InternalIP"),
                           "10.0.0.1")
            cidr = node.get("spec", {}).get("podCIDR") or ""
            m = re.fullmatch(r"(\d+\.\d+\.\d+)\.0/24", cidr)
            info = _NodeInfo(host_ip=host_ip, cidr_base=m.group(1) if m else None)
        with self._lock:
            self._nodes[name] = info
            self._node_checked[name] = time.monotonic()
        return info

    def _pod_ip(self, node: _NodeInfo, pod: Obj) -> str:
        uid = pod["metadata"]["uid"]
        existing = (pod.get("status") or {}).get("podIP")
        with self._lock:
            if existing:
                node.ips[uid] = existing
                return str(existing)
            if uid in node.ips:
                return node.ips[uid]
            used = set(node.ips.values())
            base = node.cidr_base or f"10.245.{sum(map(int, node.host_ip.split('.'))) % 250}"
            for _ in range(253):
                candidate = f"{base}.{node.next_host}"
                node.next_host = node.next_host + 1 if node.next_host < 254 else 2
                if candidate not in used:
                    node.ips[uid] = candidate
                    return candidate
            raise DevClusterError(f"no free pod IP left in {base}.0/24")

    def _forget_pod(self, pod: Obj) -> None:
        uid = pod.get("metadata", {}).get("uid")
        node_name = pod.get("spec", {}).get("nodeName")
        with self._lock:
            node = self._nodes.get(node_name) if node_name else None
            if node is not None and uid:
                node.ips.pop(uid, None)

    def _rule_for(self, pod: Obj) -> PodRule | None:
        with self._lock:
            rules = list(self._rules)
        for action in ("fail", "unready", "hold"):
            for rule in rules:
                if rule.action == action and rule.match(pod):
                    return rule
        return None

    def _sync_pod(self, api: RawApi, pod: Obj) -> None:
        meta = pod.get("metadata", {})
        spec = pod.get("spec", {})
        status = pod.get("status") or {}
        node_name = spec.get("nodeName")
        if not node_name:
            return
        node = self._node(api, node_name)
        if node is None:
            return
        ns, name = meta["namespace"], meta["name"]
        path = f"/api/v1/namespaces/{ns}/pods/{name}"
        if meta.get("deletionTimestamp"):
            api.request("DELETE", path, body={"apiVersion": "v1", "kind": "DeleteOptions",
                                              "gracePeriodSeconds": 0,
                                              "preconditions": {"uid": meta["uid"]}})
            self._forget_pod(pod)
            return
        phase = status.get("phase")
        if phase in ("Succeeded", "Failed"):
            return
        with self._lock:  # a rule added meanwhile is seen by the resync that follows it
            rule = self._rule_for(pod)
            desired = self._desired_status(node, pod, rule)
            if desired is None:
                return
            # The uid makes this a precondition: a pod re-created under the same name meanwhile
            # answers 422 (metadata.uid) instead of taking a status meant for its predecessor.
            api.request("PATCH", f"{path}/status",
                        body={"metadata": {"uid": meta["uid"]}, "status": desired},
                        content_type=MERGE_PATCH)
            self.patches += 1

    def _desired_status(self, node: _NodeInfo, pod: Obj, rule: PodRule | None) -> Obj | None:
        """The status to write, or None if the pod already is as it should be."""
        status = pod.get("status") or {}
        containers = pod.get("spec", {}).get("containers") or []
        init_containers = pod.get("spec", {}).get("initContainers") or []
        statuses = {c.get("name"): c for c in status.get("containerStatuses") or []}
        now = _now()
        action = rule.action if rule else "run"
        if action == "hold" and pod_is_ready(pod):
            return None
        if action == "run" and pod_is_ready(pod):
            return None

        def waiting(reason: str) -> bool:
            return status.get("phase") == ("Pending" if reason == "ContainerCreating"
                                           else "Running") and bool(statuses) and all(
                ((s.get("state") or {}).get("waiting") or {}).get("reason") == reason
                for s in statuses.values())

        if action == "hold" and waiting("ContainerCreating"):
            return None
        if action == "unready" and waiting("CrashLoopBackOff"):
            return None

        def cond(kind: str, ok: bool, reason: str | None = None) -> Obj:
            old: Obj = next(
                (c for c in status.get("conditions") or [] if c.get("type") == kind), {})
            same = old.get("status") == ("True" if ok else "False")
            c: Obj = {"type": kind, "status": "True" if ok else "False",
                      "lastProbeTime": None,
                      "lastTransitionTime": old.get("lastTransitionTime") if same else now}
            if reason:
                c["reason"] = reason
            return c

        def container_status(c: Obj, state: Obj, ready: bool, restarts: int = 0) -> Obj:
            old = statuses.get(c["name"], {})
            cid = old.get("containerID") or f"containerd://{secrets.token_hex(32)}"
            image = c.get("image", "")
            return {"name": c["name"], "image": image,
                    "imageID": f"{image}@sha256:{'0' * 64}", "containerID": cid,
                    "ready": ready, "started": "running" in state, "state": state,
                    "lastState": {}, "restartCount": restarts}

        pod_ip = None
        if action == "hold":
            reason = "ContainersNotReady"
            new: Obj = {
                "phase": "Pending", "hostIP": node.host_ip, "startTime": status.get("startTime")
                or now,
                "conditions": [cond("Initialized", True), cond("Ready", False, reason),
                               cond("ContainersReady", False, reason),
                               cond("PodScheduled", True)],
                "containerStatuses": [
                    {"name": c["name"], "image": c.get("image", ""), "imageID": "",
                     "ready": False, "started": False, "restartCount": 0, "lastState": {},
                     "state": {"waiting": {"reason": "ContainerCreating"}}} for c in containers],
            }
        elif action == "fail":
            assert rule is not None
            finished = {"terminated": {"exitCode": 1, "reason": rule.reason,
                                       "message": rule.message, "startedAt": now,
                                       "finishedAt": now}}
            new = {
                "phase": "Failed", "reason": rule.reason, "message": rule.message,
                "hostIP": node.host_ip, "startTime": status.get("startTime") or now,
                "conditions": [cond("Initialized", True),
                               cond("Ready", False, "ContainersNotReady"),
                               cond("ContainersReady", False, "ContainersNotReady"),
                               cond("PodScheduled", True)],
                "containerStatuses": [container_status(c, finished, False) for c in containers],
            }
            if status.get("podIP"):
                new["podIP"] = status["podIP"]
                new["podIPs"] = [{"ip": status["podIP"]}]
        else:
            pod_ip = self._pod_ip(node, pod)
            ready = action == "run"
            if ready:
                state: Obj = {"running": {"startedAt": now}}
            else:
                assert rule is not None
                state = {"waiting": {"reason": "CrashLoopBackOff",
                                     "message": rule.message or "back-off restarting"}}
            why = None if ready else "ContainersNotReady"
            new = {
                "phase": "Running", "hostIP": node.host_ip, "podIP": pod_ip,
                "podIPs": [{"ip": pod_ip}], "startTime": status.get("startTime") or now,
                "conditions": [cond("Initialized", True), cond("Ready", ready, why),
                               cond("ContainersReady", ready, why),
                               cond("PodScheduled", True)],
                "containerStatuses": [container_status(c, state, ready, 0 if ready else 1)
                                      for c in containers],
            }
        if init_containers:
            done = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now,
                                   "finishedAt": now}}
            new["initContainerStatuses"] = [container_status(c, done, True)
                                            for c in init_containers]
        return new


# --------------------------------------------------------------------------------------------
# the control plane


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler on loopback.

    ``start()`` is fresh every time: it kills processes a crashed earlier run left in
    ``workdir/pids``, wipes etcd's data and the certificates, and starts everything anew.
    Optionally (``gpu_nodes``/``kubelet``) it also creates GPU nodes and starts a
    ``FakeKubelet``.
    """

    def __init__(self, workdir: Path | str, *, gpu_nodes: int = 0, gpus_per_node: int = 8,
                 gpu_resource: str = DEFAULT_GPU_RESOURCE, kubelet: bool = False,
                 extra_apiserver_args: Sequence[str] = (),
                 extra_controller_manager_args: Sequence[str] = (),
                 ready_timeout: float = 120.0, stop_timeout: float = 10.0) -> None:
        self.workdir = Path(workdir).resolve()
        self.gpu_nodes = gpu_nodes
        self.gpus_per_node = gpus_per_node
        self.gpu_resource = gpu_resource
        self.start_kubelet_on_start = kubelet
        #: Extra kube-apiserver flags; read at every (re)start of the API server, so they can
        #: be changed before ``restart_apiserver()`` (e.g. admission webhook configuration).
        self.extra_apiserver_args: list[str] = list(extra_apiserver_args)
        self.extra_controller_manager_args: list[str] = list(extra_controller_manager_args)
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.kubelet: FakeKubelet | None = None
        self.started_in: float | None = None
        self._procs: dict[str, _Process] = {}
        self._token = ""
        self._etcd_client_port = 0
        self._etcd_peer_port = 0
        self._apiserver_port = 0
        self._lock = threading.RLock()

    # paths and connection details -------------------------------------------------------

    @property
    def pids_file(self) -> Path:
        return self.workdir / "pids"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def cert_dir(self) -> Path:
        return self.workdir / "certs"

    @property
    def ca(self) -> Path:
        """The CA bundle that verifies the API server (its self-signed cert and CA)."""
        return self.cert_dir / "apiserver.crt"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self._apiserver_port}"

    @property
    def apiserver_port(self) -> int:
        return self._apiserver_port

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self._etcd_client_port}"

    @property
    def token(self) -> str:
        """The admin bearer token (group system:masters)."""
        return self._token

    @property
    def sa_key(self) -> Path:
        return self.workdir / "sa.key"

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def pids(self) -> list[int]:
        """Pids of the processes started by this object that still run."""
        with self._lock:
            return [p.popen.pid for p in self._procs.values()
                    if p.popen is not None and p.running()]

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig)}

    # lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> LocalCluster:
        t0 = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - t0
        log.info("devcluster: control plane ready at %s in %.1fs", self.server, self.started_in)
        return self

    def _start(self) -> None:
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        stale = read_pids(self.pids_file)
        if stale:
            live = [r for r in stale if r.alive()]
            if live:
                log.warning("devcluster: killing %d stale processes from %s",
                            len(live), self.pids_file)
            kill_pids(live, self.stop_timeout)
        self.pids_file.write_text("")
        for sub in ("etcd-data", "certs"):
            shutil.rmtree(self.workdir / sub, ignore_errors=True)
        self.log_dir.mkdir(exist_ok=True)
        for name in ("etcd", *K8S_BINARIES):
            self.log_path(name).unlink(missing_ok=True)
        etcd = find_binary("etcd")
        bins = {name: find_binary(name) for name in K8S_BINARIES}

        self._token = secrets.token_urlsafe(32)
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f"{self._token},admin,admin,system:masters\n")
        tokens.chmod(0o600)
        self._make_sa_key()
        self._etcd_client_port = free_port()
        self._etcd_peer_port = free_port()
        self._apiserver_port = free_port()

        peer = f"http://127.0.0.1:{self._etcd_peer_port}"
        self._spawn("etcd", [
            str(etcd), "--name", "gpupool", "--data-dir", str(self.workdir / "etcd-data"),
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"gpupool={peer}", "--initial-cluster-state", "new",
            "--snapshot-count", "10000", "--log-level", "warn", "--logger", "zap",
        ])
        self._wait("etcd health", self._etcd_healthy, ["etcd"])
        log.debug("devcluster: etcd healthy after %.1fs", time.monotonic() - t0)
        self.start_apiserver()
        log.debug("devcluster: kube-apiserver ready after %.1fs", time.monotonic() - t0)
        self._write_kubeconfig()
        self._spawn("kube-controller-manager", [
            str(bins["kube-controller-manager"]), f"--kubeconfig={self.kubeconfig}",
            f"--service-account-private-key-file={self.sa_key}", f"--root-ca-file={self.ca}",
            f"--controllers={CONTROLLERS}", "--leader-elect=false", "--port=0",
            "--secure-port=0", "--use-service-account-credentials=false",
            "--concurrent-gc-syncs=5", "--v=1", *self.extra_controller_manager_args,
        ])
        self._spawn("kube-scheduler", [
            str(bins["kube-scheduler"]), f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false", "--port=0", "--secure-port=0", "--v=1",
        ])
        log.debug("devcluster: keys made, all spawned after %.1fs", time.monotonic() - t0)
        api = RawApi(self.api_client())
        try:
            # The controller manager is up once the default ServiceAccount has its token Secret.
            self._wait("the default ServiceAccount's token (kube-controller-manager)",
                       lambda: self._sa_token_ready(api, "default", "default"),
                       ["kube-controller-manager", "kube-scheduler", "kube-apiserver"])
            log.debug("devcluster: controller manager working after %.1fs",
                      time.monotonic() - t0)
            if self.gpu_nodes:
                add_gpu_nodes(api.api_client, self.gpu_nodes, self.gpus_per_node,
                              self.gpu_resource)
        finally:
            api.api_client.close()
        if self.start_kubelet_on_start:
            self.start_kubelet()

    def stop(self) -> None:
        """Stop the kubelet thread and every process (SIGTERM, then SIGKILL)."""
        with self._lock:
            if self.kubelet is not None:
                self.kubelet.stop()
                self.kubelet = None
            # Clients first, etcd last: kube-apiserver removes its endpoint lease from etcd on
            # the way out and hangs on that if etcd is already gone.
            order = ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")
            procs = list(self._procs.values())
            for name in order:
                _terminate([p for p in procs if p.name == name], self.stop_timeout)
            _terminate([p for p in procs if p.name not in order], self.stop_timeout)
            # Anything else this workdir recorded (e.g. a process started by another object).
            kill_pids(read_pids(self.pids_file), self.stop_timeout)

    def add_gpu_nodes(self, count: int, gpus_per_node: int,
                      resource_name: str = DEFAULT_GPU_RESOURCE, **kwargs: Any) -> list[str]:
        with self.api_client() as api_client:
            return add_gpu_nodes(api_client, count, gpus_per_node, resource_name, **kwargs)

    def start_kubelet(self) -> FakeKubelet:
        if self.kubelet is None:
            self.kubelet = FakeKubelet(self.api_client)
        return self.kubelet.start()

    # the API server alone (fault tests) ---------------------------------------------------

    def stop_apiserver(self, grace: float = 3.0) -> None:
        """Stop only kube-apiserver (etcd, controllers, scheduler and kubelet keep running).

        SIGTERM, then SIGKILL after ``grace`` seconds: while clients hold watches open, a 1.20
        API server waits up to a minute for its connections to go idle before it exits.
        """
        with self._lock:
            proc = self._procs.get("kube-apiserver")
            if proc is not None:
                _terminate([proc], grace)

    def start_apiserver(self, wait: bool = True) -> None:
        """(Re)start kube-apiserver on the same port, etcd, certificates and token."""
        with self._lock:
            if "kube-apiserver" in self._procs and self._procs["kube-apiserver"].running():
                raise DevClusterError("kube-apiserver is already running")
            self._spawn("kube-apiserver", self._apiserver_args())
        if wait:
            self.wait_apiserver_ready()

    def restart_apiserver(self) -> None:
        self.stop_apiserver()
        self.start_apiserver()

    def wait_apiserver_ready(self, timeout: float | None = None) -> None:
        self._wait("kube-apiserver /readyz", self.apiserver_ready, ["kube-apiserver"],
                   timeout=timeout)

    def apiserver_ready(self) -> bool:
        """One /readyz probe."""
        if not self.ca.exists():
            return False
        try:
            req = urllib.request.Request(f"{self.server}/readyz",
                                         headers={"Authorization": f"Bearer {self._token}"})
            ctx = ssl.create_default_context(cafile=str(self.ca))
            with urllib.request.urlopen(req, timeout=2, context=ctx) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError, ssl.SSLError):
            return False

    def _apiserver_args(self) -> list[str]:
        return [
            str(find_binary("kube-apiserver")),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self._apiserver_port}",
            "--insecure-port=0",
            f"--cert-dir={self.cert_dir}",
            f"--token-auth-file={self.workdir / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self.sa_key}",
            f"--service-account-signing-key-file={self.sa_key}",
            "--service-account-lookup=true",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            # On by default in 1.20; named so nobody disables what the SA token tests rely on.
            "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,"
            "MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
            *self.extra_apiserver_args,
        ]

    # helpers -------------------------------------------------------------------------------

    def api_client(self, token: str | None = None) -> ApiClient:
        """A new sync ``kubernetes.client.ApiClient`` (admin, or the given bearer token)."""
        from kubernetes import client as k8s
        from kubernetes import config as k8s_config

        cfg = k8s.Configuration()
        k8s_config.load_kube_config_from_dict(self.kubeconfig_dict(token),
                                              client_configuration=cfg)
        return k8s.ApiClient(cfg)

    def kubeconfig_dict(self, token: str | None = None, user: str = "admin") -> Obj:
        return {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "gpupool-dev",
                          "cluster": {"server": self.server,
                                      "certificate-authority": str(self.ca)}}],
            "users": [{"name": user, "user": {"token": token or self._token}}],
            "contexts": [{"name": "gpupool-dev",
                          "context": {"cluster": "gpupool-dev", "user": user}}],
            "current-context": "gpupool-dev",
        }

    def write_kubeconfig(self, path: Path, token: str | None = None,
                         user: str = "admin") -> Path:
        """Write a kubeconfig for this cluster (e.g. for a ServiceAccount's token)."""
        path.write_text(json.dumps(self.kubeconfig_dict(token, user), indent=2) + "\n")
        path.chmod(0o600)
        return path

    def _write_kubeconfig(self) -> None:
        self.write_kubeconfig(self.kubeconfig)

    def _make_sa_key(self) -> None:
        openssl = find_binary("openssl")
        subprocess.run([str(openssl), "genrsa", "-out", str(self.sa_key), "2048"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        subprocess.run([str(openssl), "rsa", "-in", str(self.sa_key), "-pubout", "-out",
                        str(self.workdir / "sa.pub")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.sa_key.chmod(0o600)

    def _spawn(self, name: str, args: list[str]) -> _Process:
        log_path = self.log_path(name)
        with open(log_path, "ab") as out:
            out.write(f"\n==== {_now()} {' '.join(args)}\n".encode())
            out.flush()
            popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                     cwd=self.workdir, start_new_session=True,
                                     preexec_fn=_die_with_parent_preexec())
        start = None
        for _ in range(100):
            stat = _proc_stat(popen.pid)
            if stat is not None:
                start = stat[1]
                break
            time.sleep(0.01)
        record = PidRecord(popen.pid, name, start or "")
        with open(self.pids_file, "a") as pids:
            pids.write(record.line())
        proc = _Process(name, args, log_path, popen, record)
        with self._lock:
            self._procs[name] = proc
        log.debug("devcluster: started %s (pid %d)", name, popen.pid)
        return proc

    def _wait(self, what: str, check: Callable[[], Any], watched: Sequence[str],
              timeout: float | None = None, interval: float = 0.1) -> Any:
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        last_exc: BaseException | None = None
        while True:
            for name in watched:
                proc = self._procs.get(name)
                if proc is not None and not proc.running():
                    raise DevClusterError(
                        f"{name} exited (code {proc.popen.returncode if proc.popen else '?'}) "
                        f"while waiting for {what}; last log lines:\n{proc.log_tail()}")
            try:
                result = check()
                if result:
                    return result
            except Exception as exc:
                last_exc = exc
            if time.monotonic() >= deadline:
                tails = "\n".join(f"--- {n}:\n{self._procs[n].log_tail(15)}"
                                  for n in watched if n in self._procs)
                raise DevClusterError(f"timed out waiting for {what} (last error: {last_exc})"
                                      f"\n{tails}")
            time.sleep(interval)

    def _etcd_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as resp:
                return bool(json.load(resp).get("health") == "true")
        except (OSError, ValueError):
            return False

    @staticmethod
    def _sa_token_ready(api: RawApi, namespace: str, name: str) -> bool:
        try:
            sa = api.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}")
        except Exception as exc:
            if _is_status(exc, 404):
                return False
            raise
        return bool(sa.get("secrets"))


def service_account_token(api_client: ApiClient, namespace: str, name: str,
                          timeout: float = 30.0) -> str:
    """The token of a ServiceAccount's auto-created token Secret (waits for it)."""
    import base64

    api = RawApi(api_client)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sa = api.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}")
            for ref in sa.get("secrets") or []:
                secret = api.get(f"/api/v1/namespaces/{namespace}/secrets/{ref['name']}")
                token = (secret.get("data") or {}).get("token")
                if secret.get("type") == "kubernetes.io/service-account-token" and token:
                    return base64.b64decode(token).decode()
        except Exception as exc:
            if not _is_status(exc, 404):
                raise
        if time.monotonic() >= deadline:
            raise DevClusterError(f"no token Secret for ServiceAccount {namespace}/{name}")
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# command line


def _cmd_up(args: argparse.Namespace) -> int:
    workdir = Path(args.dir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "ready").unlink(missing_ok=True)
    up_pid = workdir / "up.pid"
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # keep nohup's ignored SIGHUP
            signal.signal(sig, on_signal)
    old: tuple[int, str] | None = _read_up_pid(up_pid)
    if old is not None and old[0] != os.getpid():
        print(f"devcluster: stopping the earlier 'up' (pid {old[0]})", file=sys.stderr)
        _stop_up(up_pid, timeout=30.0)
    start = _proc_stat(os.getpid())
    up_pid.write_text(f"{os.getpid()} {start[1] if start else ''}\n")
    cluster = LocalCluster(workdir, gpu_nodes=args.gpu_nodes, gpus_per_node=args.gpus_per_node,
                           gpu_resource=args.gpu_resource, kubelet=not args.no_kubelet,
                           extra_apiserver_args=args.apiserver_arg or ())
    try:
        cluster.start()
        (workdir / "ready").write_text(str(cluster.kubeconfig) + "\n")
        print(cluster.kubeconfig, flush=True)
        print(f"devcluster: ready in {cluster.started_in:.1f}s; server {cluster.server}; "
              f"logs in {cluster.log_dir}; stop with SIGTERM or "
              f"'python -m gpupool.devcluster down --dir {workdir}'", file=sys.stderr, flush=True)
        while not stop.is_set():
            stop.wait(1.0)
            if stop.is_set():
                break
            dead = [p.name for p in cluster._procs.values() if not p.running()]
            if dead:
                print(f"devcluster: {', '.join(dead)} exited; stopping", file=sys.stderr)
                return 1
        return 0
    finally:
        cluster.stop()
        (workdir / "ready").unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if _read_up_pid(up_pid) == (os.getpid(), start[1] if start else ""):
                up_pid.unlink()


def _read_up_pid(path: Path) -> tuple[int, str] | None:
    try:
        parts = path.read_text().split()
    except FileNotFoundError:
        return None
    if not parts or not parts[0].isdigit():
        return None
    return int(parts[0]), parts[1] if len(parts) > 1 else ""


def _stop_up(path: Path, timeout: float) -> None:
    up = _read_up_pid(path)
    if up is None:
        return
    pid, start = up
    if pid != os.getpid():
        kill_pids([PidRecord(pid, "devcluster-up", start)], timeout)
    path.unlink(missing_ok=True)


def _cmd_down(args: argparse.Namespace) -> int:
    workdir = Path(args.dir).resolve()
    _stop_up(workdir / "up.pid", timeout=args.timeout)
    kill_pids(read_pids(workdir / "pids"), timeout=args.timeout)
    (workdir / "ready").unlink(missing_ok=True)
    left = [r for r in read_pids(workdir / "pids") if r.alive()]
    if left:
        print(f"devcluster: still running: {left}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpupool.devcluster",
                                     description="a local Kubernetes control plane for gpupool")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the control plane and run until SIGTERM/SIGINT")
    up.add_argument("--dir", required=True, help="work directory (state, logs, kubeconfig)")
    up.add_argument("--gpu-nodes", type=int, default=2)
    up.add_argument("--gpus-per-node", type=int, default=8)
    up.add_argument("--gpu-resource", default=DEFAULT_GPU_RESOURCE)
    up.add_argument("--no-kubelet", action="store_true", help="do not run the fake kubelet")
    up.add_argument("--apiserver-arg", action="append", metavar="FLAG",
                    help="extra kube-apiserver flag (repeatable)")
    up.add_argument("-v", "--verbose", action="store_true")
    down = sub.add_parser("down", help="stop what 'up' started in DIR")
    down.add_argument("--dir", required=True)
    down.add_argument("--timeout", type=float, default=15.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.command == "up":
        return _cmd_up(args)
    return _cmd_down(args)


if __name__ == "__main__":
    sys.exit(main())
