"""Benchmark: N Subscriptions over P pools through the operator, next to the API server's limit.

    .venv/bin/python benchmarks/control_plane.py                      # 1,000 over 10 pools
    .venv/bin/python benchmarks/control_plane.py --subscriptions 5000 # peak RSS at 5,000

One run, one local control plane (``gpupool.devcluster`` in a temporary directory, stopped at
the end):

1. Installs the CRDs, starts the real operator (``gpupool operator``, its own process, watching
   one namespace, metrics on a free port) and creates P Pools with activation threshold 0 and a
   seat for every subscription; the fake kubelet makes their Deployments Ready, so they go
   ``active``. Waits until the operator is idle.
2. The burst: creates N Subscriptions (one block each, spread over the pools) from
   ``--concurrency`` client threads and times from the first create until every one is
   ``active`` with its key Secret (two watches, one on the Subscriptions, one metadata-only on
   the key Secrets: no polling, no key ever read). Then waits until the operator is idle again.
3. Counts API requests per subscription: the operator's own client
   (``gpupool_api_requests_total`` on its metrics port, by verb and resource) and everything the
   API server handled in the window (``apiserver_request_total``, watches excluded) less the
   benchmark's own creates: that rest is kopf (finalizers, its annotations) plus the control
   plane's own background work. Reads the operator's peak RSS (``VmHWM``).
4. Stops the operator and creates N Secrets (the size of a key Secret) straight through the API
   server with the same client and the same concurrency: the limit. Prints both rates and the
   ratio.

Keys are never printed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import ssl
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from gpupool import GROUP, VERSION, names  # noqa: E402
from gpupool.devcluster import LocalCluster, binaries_available, free_port  # noqa: E402

Obj = dict[str, Any]
CRDS = ROOT / "crds"
BLOCKS = ("asia", "europe", "americas")
METADATA = "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io"
NS, LIMIT_NS = "bench", "limit"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class ApiError(RuntimeError):
    pass


class Api:
    """Plain JSON over one urllib3 pool (thread-safe), with the admin token."""

    def __init__(self, cluster: LocalCluster, maxsize: int) -> None:
        self.base = cluster.server
        self.ca = str(cluster.ca)
        self.http = urllib3.PoolManager(num_pools=2, maxsize=maxsize, block=True,
                                        cert_reqs="CERT_REQUIRED", ca_certs=self.ca)
        self.auth = {"Authorization": f"Bearer {cluster.token}"}

    def call(self, method: str, path: str, body: Any = None, *,
             query: dict[str, str] | None = None, accept: str = "application/json") -> Any:
        url = self.base + path + (f"?{urlencode(query)}" if query else "")
        headers = {**self.auth, "Accept": accept}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
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
        for attempt in range(5):
            try:
                self.call("POST", path, body)
                return
            except (ApiError, urllib3.exceptions.HTTPError):
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def watch(self, path: str, on_event: Callable[[str, Obj], None], stop: threading.Event,
              *, selector: str = "", accept: str = "application/json") -> None:
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
    started = time.monotonic()
    with cf.ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(fn, items):
            pass
    return time.monotonic() - started


def wait(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5,
         progress: Callable[[], str] | None = None,
         alive: Callable[[], None] | None = None) -> Any:
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


def operator_requests(port: int) -> Counter[str]:
    out: Counter[str] = Counter()
    for labels, value in scrape(f"http://127.0.0.1:{port}/metrics",
                                "gpupool_api_requests_total").items():
        fields = _labels(labels)
        out[f"{fields['verb']} {fields['resource']}"] += int(value)
    return out


def reconcile_times(port: int) -> dict[str, tuple[float, float]]:
    """resource -> (reconciles, seconds spent in them)."""
    url = f"http://127.0.0.1:{port}/metrics"
    counts = scrape(url, "gpupool_reconcile_seconds_count")
    sums = scrape(url, "gpupool_reconcile_seconds_sum")
    return {_labels(k)["resource"]: (counts[k], sums.get(k, 0.0)) for k in counts}


def operator_reconciles(port: int) -> float:
    return sum(scrape(f"http://127.0.0.1:{port}/metrics", "gpupool_reconciles_total").values())


def apiserver_requests(cluster: LocalCluster) -> Counter[str]:
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


def _merge_get(counts: Counter[str]) -> Counter[str]:
    out: Counter[str] = Counter()
    for key, value in counts.items():
        verb, _, what = key.partition(" ")
        out[f"{'GET/LIST' if verb in ('GET', 'LIST') else verb} {what}"] += value
    return out


def proc_status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_process(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def table(counts: Counter[str], per: int) -> str:
    rows = sorted(((v, k) for k, v in counts.items() if v), reverse=True)
    return "\n".join(f"      {k:<36} {v:>8}  {v / per:6.2f}/sub" for v, k in rows)


# -- the burst --------------------------------------------------------------------------------
class Progress:
    """What the two watches have seen: subscriptions active with their key Secret."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.lock = threading.Lock()
        self.key_of: dict[str, str] = {}  # subscription -> keySecretName while active
        self.secrets: set[str] = set()
        self.ok: set[str] = set()
        self.phases: Counter[str] = Counter()
        self.phase_of: dict[str, str] = {}
        self.done_at: float | None = None

    def _update(self, sub: str) -> None:
        secret = self.key_of.get(sub)
        if secret and secret in self.secrets:
            self.ok.add(sub)
        else:
            self.ok.discard(sub)
        if len(self.ok) >= self.n and self.done_at is None:
            self.done_at = time.monotonic()

    def on_sub(self, kind: str, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        st = obj.get("status") or {}
        with self.lock:
            phase = "deleted" if kind == "DELETED" else (st.get("phase") or "new")
            old = self.phase_of.get(name)
            if old:
                self.phases[old] -= 1
            self.phase_of[name] = phase
            self.phases[phase] += 1
            if phase == "active" and st.get("keySecretName"):
                self.key_of[name] = st["keySecretName"]
            else:
                self.key_of.pop(name, None)
            self._update(name)

    def on_secret(self, kind: str, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        sub = (obj["metadata"].get("labels") or {}).get(names.LABEL_SUBSCRIPTION, "")
        with self.lock:
            if kind == "DELETED":
                self.secrets.discard(name)
            else:
                self.secrets.add(name)
            if sub:
                self._update(sub)

    def describe(self) -> str:
        with self.lock:
            phases = ", ".join(f"{k} {v}" for k, v in sorted(self.phases.items()) if v)
            return f"{len(self.ok)}/{self.n} active with key; {phases}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscriptions", "-n", type=int, default=1000)
    parser.add_argument("--pools", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=16,
                        help="client threads creating objects, in both halves (default 16)")
    parser.add_argument("--resync", type=float, default=300.0,
                        help="the operator's GPUPOOL_RESYNC_SECONDS (default: its production "
                             "default, 300)")
    parser.add_argument("--workers", type=int, default=None,
                        help="the operator's GPUPOOL_WORKERS (default: its own default)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--profile", metavar="FILE", default=None,
                        help="record the operator with py-spy (pip install py-spy) during the "
                             "burst, as collapsed stacks")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the figures")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if not binaries_available():
        print("control plane binaries missing: run scripts/build-control-plane.sh",
              file=sys.stderr)
        return 2

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    workdir = Path(tempfile.mkdtemp(prefix="gpupool-cpbench-"))
    os.environ["GPUPOOL_TEST_LOGS"] = str(workdir / "operator-logs")
    cluster = LocalCluster(workdir / "cluster", gpu_nodes=2, gpus_per_node=8, kubelet=True)
    ok = False
    try:
        ok = run(args, cluster)
    finally:
        cluster.stop()
        if args.keep or not ok:
            say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def run(args: argparse.Namespace, cluster: LocalCluster) -> bool:
    from support.kube import create_namespace
    from support.objects import kubectl, pool_body, sub_body
    from support.operator import OperatorProcess

    n, threads = args.subscriptions, args.concurrency
    pools = [f"pool-{i}" for i in range(args.pools)]
    t0 = time.monotonic()
    cluster.start()
    say(f"control plane up in {time.monotonic() - t0:.1f}s; {os.cpu_count()} CPUs")
    kc = str(cluster.kubeconfig)
    kubectl(kc, "apply", "-f", str(CRDS), check=True)
    kubectl(kc, "wait", "--for", "condition=established", "--timeout=60s",
            "crd/pools.gpupool.dev", "crd/subscriptions.gpupool.dev", check=True)
    with cluster.api_client() as sync_client:
        create_namespace(sync_client, NS)
        create_namespace(sync_client, LIMIT_NS)
    api = Api(cluster, maxsize=threads + 4)

    port = free_port()
    env = {"GPUPOOL_METRICS_PORT": str(port), "GPUPOOL_RESYNC_SECONDS": str(args.resync)}
    if args.workers:
        env["GPUPOOL_WORKERS"] = str(args.workers)
    op = OperatorProcess(cluster.kubeconfig, name="operator-cpbench", namespaces=[NS],
                         env=env).start()
    assert op.proc is not None
    pid = op.proc.pid

    def alive() -> None:
        if op.proc is None or op.proc.poll() is not None:
            raise SystemExit(f"the operator exited; log tail:\n{op.log_tail(15)}")

    def idle(quiet: float = 3.0) -> None:
        seen: list[float] = []
        per = int(quiet / 0.5)

        def still() -> bool:
            seen.append(operator_reconciles(port))
            return len(seen) > per and seen[-1] == seen[-1 - per]
        wait("the operator to go idle", still, timeout=args.timeout, alive=alive)

    per_pool = math.ceil(n / len(pools))
    for pool in pools:
        api.create(custom("pools", NS), pool_body(pool, seats=per_pool, activationThreshold=0))
    wait("every pool active", lambda: all(
        ((api.call("GET", custom("pools", NS, p)).get("status") or {}).get("phase") == "active")
        for p in pools), timeout=300, interval=1.0, alive=alive)
    idle()
    say(f"{len(pools)} pools active ({per_pool} seats per block each); operator idle, "
        f"RSS {proc_status_kb(pid, 'VmRSS') / 1024:.0f} MB")

    progress = Progress(n)
    stop = threading.Event()
    watchers = [
        threading.Thread(target=api.watch, args=(custom("subscriptions", NS), progress.on_sub,
                                                 stop), daemon=True),
        threading.Thread(target=api.watch, args=(core("secrets", NS), progress.on_secret, stop),
                         kwargs={"selector": f"{names.LABEL_KIND}={names.KIND_API_KEY}",
                                 "accept": METADATA}, daemon=True),
    ]
    for w in watchers:
        w.start()
    time.sleep(1.0)  # both watches listed (empty) and are watching
    ops_before, api_before = operator_requests(port), apiserver_requests(cluster)
    procs = {"operator": pid, "benchmark (client, watches)": os.getpid()}
    for other in cluster.pids():
        with contextlib.suppress(OSError):
            procs[Path(f"/proc/{other}/comm").read_text().strip()] = other
    cpu_before = cpu_by_process(procs)
    rec_before = reconcile_times(port)
    profiler = None
    if args.profile:
        import subprocess

        profiler = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
             "--output", args.profile, "--format", "raw", "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def create_sub(i: int) -> None:
        body = sub_body(f"sub-{i:05d}", pools[i % len(pools)], [BLOCKS[(i // len(pools)) % 3]])
        api.create(custom("subscriptions", NS), body)

    started = time.monotonic()
    create_s = run_threads(create_sub, range(n), threads)
    say(f"created {n} subscriptions in {create_s:.1f}s ({n / create_s:.0f}/s, {threads} "
        "client threads)")
    wait("every subscription active with its key Secret", lambda: progress.done_at,
         timeout=args.timeout, progress=progress.describe, alive=alive)
    assert progress.done_at is not None
    burst_s = progress.done_at - started
    ops_done, api_done = operator_requests(port), apiserver_requests(cluster)
    cpu_done = cpu_by_process(procs)
    rec_done = reconcile_times(port)
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(timeout=120)
    hwm_done = proc_status_kb(pid, "VmHWM")
    say(f"all {n} active with their key Secret {burst_s:.1f}s after the first create")
    idle()
    settle_s = time.monotonic() - started
    ops_idle, api_idle = operator_requests(port), apiserver_requests(cluster)
    hwm = proc_status_kb(pid, "VmHWM")
    rss = proc_status_kb(pid, "VmRSS")
    stop.set()
    op.stop()
    say(f"operator idle {settle_s:.1f}s after the first create; stopped")

    # -- the limit: N Secrets the size of a key Secret, same client, same concurrency ---------
    data = {k: "x" * 24 for k in ("apiKey", "keyId", "pool", "subscription", "customerId",
                                  "blocks", "rpm", "tpm", "concurrency", "upstream",
                                  "upstreamKeySecret", "servedModelName",
                                  "subscriptionPhase", "poolPhase")}

    def create_secret(i: int) -> None:
        import base64

        api.create(core("secrets", LIMIT_NS), {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": f"limit-{i:05d}", "labels": {"bench.gpupool.dev/limit": "1"}},
            "data": {k: base64.b64encode((v + secrets.token_hex(4)).encode()).decode()
                     for k, v in data.items()}})

    server_procs = {k: v for k, v in procs.items() if k != "operator"}
    limit_cpu_before = cpu_by_process(server_procs)
    limit_s = run_threads(create_secret, range(n), threads)
    limit_cpu = {k: v - limit_cpu_before[k] for k, v in cpu_by_process(server_procs).items()}

    # -- report ------------------------------------------------------------------------------
    ops = ops_done - ops_before
    ops_all = ops_idle - ops_before
    server = api_done - api_before
    server_all = api_idle - api_before
    bench_own = Counter({"POST subscriptions": n, "GET/LIST subscriptions": 1,
                         "GET/LIST secrets": 1})
    rate, limit_rate = n / burst_s, n / limit_s
    # The API server counts a GET of one custom resource as LIST: compare the two as one.
    others = _merge_get(server) - bench_own - _merge_get(ops)
    cpu = {k: cpu_done[k] - cpu_before[k] for k in procs}
    recs = {k: (c - rec_before.get(k, (0, 0))[0], t - rec_before.get(k, (0, 0))[1])
            for k, (c, t) in rec_done.items()}
    figures = {
        "subscriptions": n, "pools": len(pools), "concurrency": threads, "cpus": os.cpu_count(),
        "create_s": round(create_s, 2), "active_s": round(burst_s, 2),
        "idle_s": round(settle_s, 2), "subs_per_s": round(rate, 1),
        "limit_s": round(limit_s, 2), "limit_per_s": round(limit_rate, 1),
        "ratio": round(rate / limit_rate, 3),
        "operator_requests_per_sub": round(sum(ops.values()) / n, 2),
        "operator_requests_per_sub_to_idle": round(sum(ops_all.values()) / n, 2),
        "apiserver_requests_per_sub": round(sum(server.values()) / n, 2),
        "apiserver_requests_per_sub_to_idle": round(sum(server_all.values()) / n, 2),
        "kopf_and_control_plane_per_sub": round(sum(others.values()) / n, 2),
        "peak_rss_mb": round(hwm / 1024, 1), "peak_rss_mb_at_active": round(hwm_done / 1024, 1),
        "rss_mb_idle": round(rss / 1024, 1),
        "cpu_s": {k: round(v, 1) for k, v in cpu.items()},
        "limit_cpu_s": {k: round(v, 1) for k, v in limit_cpu.items()},
        "reconciles": {k: [int(c), round(t, 1)] for k, (c, t) in recs.items()},
        "operator_requests": dict(ops_all), "apiserver_requests": dict(server_all),
    }
    print()
    print(f"gpupool control plane, {n} subscriptions over {len(pools)} pools, {threads} client "
          f"threads, {os.cpu_count()} CPUs")
    print(f"  operator   : {n} subscriptions active with keys in {burst_s:.1f}s = "
          f"{rate:.1f} subscriptions/s (creates alone took {create_s:.1f}s; idle after "
          f"{settle_s:.1f}s)")
    print(f"  limit      : {n} Secrets created straight through the API server in "
          f"{limit_s:.1f}s = {limit_rate:.1f} /s")
    print(f"  ratio      : {rate / limit_rate:.2f} of the limit")
    print(f"  requests   : operator's client {sum(ops.values()) / n:.2f}/subscription until all "
          f"active ({sum(ops_all.values()) / n:.2f} until idle); API server in all "
          f"{sum(server.values()) / n:.2f}/subscription (the create included), of which kopf "
          f"and the control plane {sum(others.values()) / n:.2f}")
    print("    operator's client until idle:")
    print(table(ops_all, n))
    print("    kopf and the control plane until all active (API server less the operator's "
          "client and the benchmark's creates):")
    print(table(others, n))
    print(f"  CPU seconds until all active ({burst_s:.0f}s on {os.cpu_count()} CPUs): " + ", ".join(
        f"{k} {v:.0f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v >= 0.5))
    print("  CPU seconds of the limit: " + ", ".join(
        f"{k} {v:.1f}" for k, v in sorted(limit_cpu.items(), key=lambda kv: -kv[1])
        if v >= 0.05))
    control = ("kube-apiserver", "etcd")
    per_sub = sum(cpu.get(k, 0.0) for k in (*control, "operator")) / n
    per_secret = sum(limit_cpu.get(k, 0.0) for k in control) / n
    figures["cpu_ms_per_sub"] = round(per_sub * 1000, 2)
    figures["cpu_ms_per_limit_secret"] = round(per_secret * 1000, 2)
    print(f"  CPU cost   : {per_sub * 1000:.1f} ms per subscription (API server, etcd and "
          f"operator) vs {per_secret * 1000:.1f} ms per Secret of the limit (API server and "
          f"etcd): on a machine the two saturate, at most {per_secret / per_sub:.2f} of the "
          "limit")
    print("  reconciles until all active: " + ", ".join(
        f"{k} {c:.0f} ({c / n:.1f}/sub, mean {t / c * 1000 if c else 0:.0f} ms)"
        for k, (c, t) in sorted(recs.items())))
    print(f"  peak RSS   : {hwm / 1024:.0f} MB (VmHWM; {hwm_done / 1024:.0f} MB when all were "
          f"active; {rss / 1024:.0f} MB idle at the end)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    with contextlib.suppress(Exception):
        for w in watchers:
            w.join(timeout=1)
    return True


if __name__ == "__main__":
    sys.exit(main())
