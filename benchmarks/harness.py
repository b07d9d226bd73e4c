"""What the control-plane benchmarks share: a local control plane in a temporary directory, a raw
JSON client with the admin token, waiting, the operator's process, and what is measured (the
Prometheus text of the operator's metrics port and of the API server, ``/proc``).

The benchmarks run as ``.venv/bin/python benchmarks/<name>.py``, so this directory is first on
``sys.path`` and ``from harness import ...`` finds this module; importing it puts ``tests/`` on
``sys.path`` too, for the test suite's ``support`` package.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import urllib3

from gpupool import GROUP, VERSION
from gpupool.devcluster import LocalCluster, binaries_available, free_port

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

Obj = dict[str, Any]
CRDS = ROOT / "crds"
JSON = "application/json"
METADATA = "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io"
METADATA_LIST = "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the control plane ------------------------------------------------------------------------
def run_with_cluster(prefix: str, body: Callable[[LocalCluster, Path], bool], *, keep: bool,
                     **cluster: Any) -> int:
    """``body(cluster, workdir)`` against a local control plane (``LocalCluster(**cluster)``) in
    a fresh temporary work directory, stopped at the end. The exit status: 0 when ``body``
    returned True, 1 otherwise (the work directory is then kept, as with ``keep``), 2 when the
    control plane binaries are missing."""
    if not binaries_available():
        print("control plane binaries missing: run scripts/build-control-plane.sh",
              file=sys.stderr)
        return 2

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)  # also when started in the background
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["GPUPOOL_TEST_LOGS"] = str(workdir / "operator-logs")
    local = LocalCluster(workdir / "cluster", **cluster)
    ok = False
    try:
        ok = body(local, workdir)
    finally:
        local.stop()
        if keep or not ok:
            say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def start_cluster(cluster: LocalCluster) -> float:
    """Start the control plane; the seconds it took."""
    started = time.monotonic()
    cluster.start()
    return time.monotonic() - started


def install_crds(cluster: LocalCluster, *namespaces: str) -> None:
    """Apply the CRDs, wait until they are established, and create ``namespaces``."""
    from support.kube import create_namespace
    from support.objects import kubectl

    kc = str(cluster.kubeconfig)
    kubectl(kc, "apply", "-f", str(CRDS), check=True)
    kubectl(kc, "wait", "--for", "condition=established", "--timeout=60s",
            "crd/pools.gpupool.dev", "crd/subscriptions.gpupool.dev", check=True)
    with cluster.api_client() as sync_client:
        for ns in namespaces:
            create_namespace(sync_client, ns)


# -- the client -------------------------------------------------------------------------------
class ApiError(RuntimeError):
    pass


class Api:
    """Plain JSON over one urllib3 pool (thread-safe), with the admin token."""

    def __init__(self, cluster: LocalCluster, maxsize: int) -> None:
        self.base = cluster.server
        self.http = urllib3.PoolManager(num_pools=2, maxsize=maxsize, block=True,
                                        cert_reqs="CERT_REQUIRED", ca_certs=str(cluster.ca))
        self.auth = {"Authorization": f"Bearer {cluster.token}"}

    def call(self, method: str, path: str, body: Any = None, *,
             query: dict[str, str] | None = None, accept: str = JSON,
             content_type: str = JSON) -> Any:
        url = self.base + path + (f"?{urlencode(query)}" if query else "")
        headers = {**self.auth, "Accept": accept}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        resp = self.http.request(method, url, body=data, headers=headers, timeout=120.0,
                                 retries=False)
        if not 200 <= resp.status < 300:
            # Only the Status message: never echo an object (a Secret would carry its key).
            try:
                message = json.loads(resp.data).get("message", "")
            except ValueError:
                message = ""
            raise ApiError(f"{method} {path}: HTTP {resp.status} {message[:200]}")
        return json.loads(resp.data) if resp.data else None

    def create(self, path: str, body: Obj) -> None:
        """POST, retried up to five times (a busy API server may refuse or drop one)."""
        for attempt in range(5):
            try:
                self.call("POST", path, body)
                return
            except (ApiError, urllib3.exceptions.HTTPError):
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def list_all(self, path: str, query: dict[str, str] | None = None,
                 accept: str = JSON) -> list[Obj]:
        items: list[Obj] = []
        cont = ""
        while True:
            q = {**(query or {}), "limit": "500"}
            if cont:
                q["continue"] = cont
            page = self.call("GET", path, query=q, accept=accept)
            items.extend(page.get("items") or [])
            cont = (page.get("metadata") or {}).get("continue") or ""
            if not cont:
                return items

    def table(self, path: str, selector: str) -> tuple[list[str], list[list[Any]]]:
        """Server-side table rows (printer columns only, no objects) from the watch cache."""
        page = self.call("GET", path, accept=TABLE, query={
            "labelSelector": selector, "includeObject": "None", "resourceVersion": "0"})
        columns = [c["name"] for c in page.get("columnDefinitions") or []]
        return columns, [row["cells"] for row in page.get("rows") or []]

    def metadata_names(self, path: str, selector: str) -> list[str]:
        page = self.call("GET", path, accept=METADATA_LIST, query={
            "labelSelector": selector, "resourceVersion": "0"})
        return [i["metadata"]["name"] for i in page.get("items") or []]

    def watch(self, path: str, on_event: Callable[[str, Obj], None], stop: threading.Event,
              *, selector: str = "", accept: str = JSON) -> None:
        """List, then watch from the list's resourceVersion; re-list after an expired watch."""
        while not stop.is_set():
            query = {"labelSelector": selector} if selector else {}
            listing = self.call("GET", path, query=query, accept=accept.replace(
                "PartialObjectMetadata", "PartialObjectMetadataList"))
            for item in listing.get("items") or []:
                on_event("ADDED", item)
            rv = listing["metadata"]["resourceVersion"]
            while not stop.is_set() and rv:
                rv = self._watch_once(path, {**query, "watch": "1", "resourceVersion": rv,
                                             "allowWatchBookmarks": "true",
                                             "timeoutSeconds": "600"}, accept, on_event, stop)

    def _watch_once(self, path: str, query: dict[str, str], accept: str,
                    on_event: Callable[[str, Obj], None], stop: threading.Event) -> str:
        rv = query["resourceVersion"]
        try:
            resp = self.http.request("GET", f"{self.base}{path}?{urlencode(query)}",
                                     headers={**self.auth, "Accept": accept},
                                     preload_content=False, retries=False,
                                     timeout=urllib3.Timeout(connect=10, read=700))
        except urllib3.exceptions.HTTPError:
            time.sleep(0.5)
            return rv
        buf = b""
        try:
            for chunk in resp.stream(65536):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    event = json.loads(line)
                    if event["type"] == "ERROR":
                        return ""  # expired: list again
                    obj = event["object"]
                    rv = obj["metadata"].get("resourceVersion") or rv
                    if event["type"] != "BOOKMARK":
                        on_event(event["type"], obj)
                if stop.is_set():
                    break
        except (urllib3.exceptions.HTTPError, OSError):
            time.sleep(0.2)
        finally:
            resp.release_conn()
        return rv


def custom(plural: str, ns: str, name: str = "") -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{plural}" + (f"/{name}" if name else "")


def core(plural: str, ns: str, name: str = "") -> str:
    return f"/api/v1/namespaces/{ns}/{plural}" + (f"/{name}" if name else "")


def run_threads(fn: Callable[[Any], Any], items: Iterable[Any], threads: int) -> float:
    """``fn`` over ``items`` from ``threads`` threads; the seconds it took."""
    started = time.monotonic()
    with cf.ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(fn, items):
            pass
    return time.monotonic() - started


def wait(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5,
         progress: Callable[[], str] | None = None,
         alive: Callable[[], None] | None = None) -> Any:
    """Poll ``check`` until truthy and return its value; a progress line every 15 s. ``alive``
    raises when a process the wait depends on is gone."""
    started = time.monotonic()
    next_note = started + 15
    while True:
        if alive:
            alive()
        value = check()
        if value:
            return value
        now = time.monotonic()
        if now - started > timeout:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}"
                             + (f" ({progress()})" if progress else ""))
        if progress and now >= next_note:
            say(f"  ... {what}: {progress()}")
            next_note = now + 15
        time.sleep(interval)


# -- the operator's process -------------------------------------------------------------------
class Operator:
    """The real operator (``gpupool operator`` through the tests' ``OperatorProcess``, under
    ``faketime`` if given) in its own process, watching ``namespaces``, its metrics on a free
    port. ``pid`` is its python process (under faketime, a child of the one started)."""

    def __init__(self, cluster: LocalCluster, name: str, namespaces: list[str],
                 env: dict[str, str] | None = None, faketime: str | None = None) -> None:
        from support.operator import OperatorProcess

        self.port = free_port()
        self.process = OperatorProcess(
            cluster.kubeconfig, name=name, faketime=faketime, namespaces=namespaces,
            env={**(env or {}), "GPUPOOL_METRICS_PORT": str(self.port)})
        self.pid = 0

    def start(self) -> Operator:
        self.process.start()
        self.pid = operator_pid(self.process.proc.pid if self.process.proc else 0)
        return self

    def check_alive(self) -> None:
        if not process_alive(self.pid):
            raise SystemExit(f"the operator (pid {self.pid}) is gone; log tail:\n"
                             f"{self.process.log_tail(15)}")

    def stop(self) -> None:
        """SIGTERM and wait until the operator's python process is gone too (faketime, the
        process OperatorProcess waits for, may exit before its child has finished)."""
        proc = self.process.proc
        pid = self.pid if proc is not None and proc.poll() is None else 0
        self.process.stop()
        deadline = time.monotonic() + 20
        while pid and process_alive(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)
                break
            time.sleep(0.1)

    def log_text(self) -> str:
        return self.process.log_text()

    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def reconciles(self) -> float:
        """Reconciles finished so far (``gpupool_reconciles_total``, every resource)."""
        return sum(scrape(self.metrics_url(), "gpupool_reconciles_total").values())

    def requests(self) -> Counter[str]:
        """The operator's own API requests so far (``gpupool_api_requests_total``):
        "VERB resource" -> count."""
        out: Counter[str] = Counter()
        for labels, value in scrape(self.metrics_url(), "gpupool_api_requests_total").items():
            fields = _labels(labels)
            out[f"{fields['verb']} {fields['resource']}"] += int(value)
        return out

    def reconcile_times(self) -> dict[str, tuple[float, float]]:
        """resource -> (reconciles, seconds spent in them)."""
        counts = scrape(self.metrics_url(), "gpupool_reconcile_seconds_count")
        sums = scrape(self.metrics_url(), "gpupool_reconcile_seconds_sum")
        return {_labels(k)["resource"]: (counts[k], sums.get(k, 0.0)) for k in counts}

    def wait_idle(self, timeout: float, quiet: float = 3.0) -> None:
        """Until no reconcile has finished for ``quiet`` seconds."""
        seen: list[float] = []
        per = int(quiet / 0.5)

        def still() -> bool:
            seen.append(self.reconciles())
            return len(seen) > per and seen[-1] == seen[-1 - per]
        wait("the operator to go idle", still, timeout=timeout, interval=0.5,
             alive=self.check_alive)


def start_profile(output: str | None, pid: int,
                  seconds: float | None = None) -> subprocess.Popen[bytes] | None:
    """py-spy (the venv's, else on PATH) recording ``pid`` as collapsed stacks into ``output``;
    None without an output."""
    if not output or not pid:
        return None
    exe = Path(sys.executable).parent / "py-spy"
    cmd = [str(exe) if exe.exists() else "py-spy", "record", "--pid", str(pid),
           "--output", output, "--format", "raw", "--nonblocking"]
    if seconds:
        cmd += ["--duration", str(int(seconds))]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def end_profile(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)


# -- measuring --------------------------------------------------------------------------------
def scrape(url: str, metric: str, headers: dict[str, str] | None = None,
           ctx: Any = None) -> dict[str, float]:
    """``metric``'s samples from a Prometheus text page: label string -> value."""
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=30, context=ctx) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            labels, value = line[len(metric):].rsplit(" ", 1)
            out[labels] = float(value)
    return out


def _labels(text: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', text))


def apiserver_requests(cluster: LocalCluster) -> Counter[str]:
    """Requests the API server has handled so far (``apiserver_request_total``, watches and
    connects excluded): "VERB resource[/subresource]" -> count."""
    ctx = ssl.create_default_context(cafile=str(cluster.ca))
    samples = scrape(f"{cluster.server}/metrics", "apiserver_request_total",
                     {"Authorization": f"Bearer {cluster.token}"}, ctx)
    out: Counter[str] = Counter()
    for labels, value in samples.items():
        fields = _labels(labels)
        if fields.get("verb") in ("WATCH", "CONNECT"):
            continue
        what = fields.get("resource", "") + (f"/{fields['subresource']}"
                                             if fields.get("subresource") else "")
        out[f"{fields.get('verb')} {what}"] += int(value)
    return out


def _stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name (state first); None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def operator_pid(root_pid: int) -> int:
    """The python process running ``gpupool operator`` (under faketime it is a child)."""
    family = {root_pid}
    changed = True
    while changed:
        changed = False
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in family:
                continue
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) in family:
                family.add(int(entry.name))
                changed = True
    for pid in sorted(family):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"gpupool" in cmd and b"operator" in cmd and not cmd[0].endswith(b"faketime"):
                return pid
    return root_pid


def proc_status_kb(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` figure in kB (``VmRSS``, ``VmHWM``: the peak RSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_process(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def cluster_processes(cluster: LocalCluster) -> dict[str, int]:
    """The control plane's processes by command name (``kube-apiserver``, ``etcd``...)."""
    out: dict[str, int] = {}
    for pid in cluster.pids():
        with contextlib.suppress(OSError):
            out[Path(f"/proc/{pid}/comm").read_text().strip()] = pid
    return out
