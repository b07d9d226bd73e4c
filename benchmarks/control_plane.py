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
5. The floor: creates the same N Subscriptions (same specs, same pools, which it creates there
   too) with the same client and concurrency in a namespace no operator watches. No operator
   can make subscriptions active faster than they can be created, so its rate against the
   limit is the ceiling for the ratio.

Keys are never printed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import secrets
import sys
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path

from harness import (
    METADATA,
    Api,
    Obj,
    Operator,
    apiserver_requests,
    cluster_processes,
    core,
    cpu_by_process,
    custom,
    end_profile,
    install_crds,
    proc_status_kb,
    run_threads,
    run_with_cluster,
    say,
    start_cluster,
    start_profile,
    wait,
)

from gpupool import names
from gpupool.devcluster import LocalCluster

BLOCKS = ("asia", "europe", "americas")
NS, LIMIT_NS, FLOOR_NS = "bench", "limit", "floor"


def _merge_get(counts: Counter[str]) -> Counter[str]:
    out: Counter[str] = Counter()
    for key, value in counts.items():
        verb, _, what = key.partition(" ")
        out[f"{'GET/LIST' if verb in ('GET', 'LIST') else verb} {what}"] += value
    return out


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
    return run_with_cluster("gpupool-cpbench-", partial(run, args), keep=args.keep,
                            gpu_nodes=2, gpus_per_node=8, kubelet=True)


def run(args: argparse.Namespace, cluster: LocalCluster, _workdir: Path) -> bool:
    from support.objects import pool_body, sub_body

    n, threads = args.subscriptions, args.concurrency
    pools = [f"pool-{i}" for i in range(args.pools)]
    took = start_cluster(cluster)
    say(f"control plane up in {took:.1f}s; {os.cpu_count()} CPUs")
    install_crds(cluster, NS, LIMIT_NS, FLOOR_NS)
    api = Api(cluster, maxsize=threads + 4)

    env = {"GPUPOOL_RESYNC_SECONDS": str(args.resync)}
    if args.workers:
        env["GPUPOOL_WORKERS"] = str(args.workers)
    op = Operator(cluster, name="operator-cpbench", namespaces=[NS], env=env).start()
    pid = op.pid

    per_pool = math.ceil(n / len(pools))
    for pool in pools:
        api.create(custom("pools", NS), pool_body(pool, seats=per_pool, activationThreshold=0))
    wait("every pool active", lambda: all(
        ((api.call("GET", custom("pools", NS, p)).get("status") or {}).get("phase") == "active")
        for p in pools), timeout=300, interval=1.0, alive=op.check_alive)
    op.wait_idle(timeout=args.timeout)
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
    ops_before, api_before = op.requests(), apiserver_requests(cluster)
    procs = {"operator": pid, "benchmark (client, watches)": os.getpid(),
             **cluster_processes(cluster)}
    cpu_before = cpu_by_process(procs)
    rec_before = op.reconcile_times()
    profiler = start_profile(args.profile, pid)

    def create_sub(ns: str, i: int) -> None:
        body = sub_body(f"sub-{i:05d}", pools[i % len(pools)], [BLOCKS[(i // len(pools)) % 3]])
        api.create(custom("subscriptions", ns), body)

    started = time.monotonic()
    create_s = run_threads(partial(create_sub, NS), range(n), threads)
    say(f"created {n} subscriptions in {create_s:.1f}s ({n / create_s:.0f}/s, {threads} "
        "client threads)")
    wait("every subscription active with its key Secret", lambda: progress.done_at,
         timeout=args.timeout, progress=progress.describe, alive=op.check_alive)
    assert progress.done_at is not None
    burst_s = progress.done_at - started
    ops_done, api_done = op.requests(), apiserver_requests(cluster)
    cpu_done = cpu_by_process(procs)
    rec_done = op.reconcile_times()
    end_profile(profiler)
    hwm_done = proc_status_kb(pid, "VmHWM")
    say(f"all {n} active with their key Secret {burst_s:.1f}s after the first create")
    op.wait_idle(timeout=args.timeout)
    settle_s = time.monotonic() - started
    ops_idle, api_idle = op.requests(), apiserver_requests(cluster)
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
        api.create(core("secrets", LIMIT_NS), {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": f"limit-{i:05d}", "labels": {"bench.gpupool.dev/limit": "1"}},
            "data": {k: base64.b64encode((v + secrets.token_hex(4)).encode()).decode()
                     for k, v in data.items()}})

    server_procs = {k: v for k, v in procs.items() if k != "operator"}
    limit_cpu_before = cpu_by_process(server_procs)
    limit_s = run_threads(create_secret, range(n), threads)
    limit_cpu = {k: v - limit_cpu_before[k] for k, v in cpu_by_process(server_procs).items()}

    # -- the floor: the same N Subscriptions (same pools, same client, same concurrency) in a
    # namespace no operator watches: no operator can make them active faster than this ----------
    for pool in pools:
        api.create(custom("pools", FLOOR_NS),
                   pool_body(pool, seats=per_pool, activationThreshold=0))
    floor_cpu_before = cpu_by_process(server_procs)
    floor_s = run_threads(partial(create_sub, FLOOR_NS), range(n), threads)
    floor_cpu = {k: v - floor_cpu_before[k] for k, v in cpu_by_process(server_procs).items()}

    # -- report ------------------------------------------------------------------------------
    ops = ops_done - ops_before
    ops_all = ops_idle - ops_before
    server = api_done - api_before
    server_all = api_idle - api_before
    bench_own = Counter({"POST subscriptions": n, "GET/LIST subscriptions": 1,
                         "GET/LIST secrets": 1})
    rate, limit_rate, floor_rate = n / burst_s, n / limit_s, n / floor_s
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
        "floor_s": round(floor_s, 2), "floor_per_s": round(floor_rate, 1),
        "floor_ratio": round(floor_rate / limit_rate, 3),
        "operator_requests_per_sub": round(sum(ops.values()) / n, 2),
        "operator_requests_per_sub_to_idle": round(sum(ops_all.values()) / n, 2),
        "apiserver_requests_per_sub": round(sum(server.values()) / n, 2),
        "apiserver_requests_per_sub_to_idle": round(sum(server_all.values()) / n, 2),
        "kopf_and_control_plane_per_sub": round(sum(others.values()) / n, 2),
        "peak_rss_mb": round(hwm / 1024, 1), "peak_rss_mb_at_active": round(hwm_done / 1024, 1),
        "rss_mb_idle": round(rss / 1024, 1),
        "cpu_s": {k: round(v, 1) for k, v in cpu.items()},
        "limit_cpu_s": {k: round(v, 1) for k, v in limit_cpu.items()},
        "floor_cpu_s": {k: round(v, 1) for k, v in floor_cpu.items()},
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
    print(f"  floor      : {n} Subscriptions created straight through the API server (no "
          f"operator) in {floor_s:.1f}s = {floor_rate:.1f} /s")
    print(f"  ratio      : {rate / limit_rate:.2f} of the limit")
    print(f"  ceiling    : creating the Subscriptions alone (no operator) = "
          f"{floor_rate / limit_rate:.2f} of the limit")
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
    for step, step_cpu in (("limit", limit_cpu), ("floor", floor_cpu)):
        print(f"  CPU seconds of the {step}: " + ", ".join(
            f"{k} {v:.1f}" for k, v in sorted(step_cpu.items(), key=lambda kv: -kv[1])
            if v >= 0.05))
    control = ("kube-apiserver", "etcd")
    per_sub = sum(cpu.get(k, 0.0) for k in (*control, "operator")) / n
    per_secret = sum(limit_cpu.get(k, 0.0) for k in control) / n
    figures["cpu_ms_per_sub"] = round(per_sub * 1000, 2)
    figures["cpu_ms_per_limit_secret"] = round(per_secret * 1000, 2)
    figures["cpu_ms_per_floor_sub"] = round(
        sum(floor_cpu.get(k, 0.0) for k in control) / n * 1000, 2)
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
