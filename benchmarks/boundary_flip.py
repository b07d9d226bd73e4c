"""Benchmark: one UTC block boundary with N subscriptions, next to the API server's limit.

    .venv/bin/python benchmarks/boundary_flip.py --subscriptions 5000
    .venv/bin/python benchmarks/boundary_flip.py --quick          # 500 subscriptions

What it does, all in one run against one local control plane (``gpupool.devcluster``, started in
a temporary directory and stopped at the end):

1. Installs the CRDs, makes a namespace and one Pool (activation threshold 0, so it opens active;
   the fake kubelet makes its Deployment Ready) with a seat for every subscription.
2. Starts the real operator under ``faketime``, its clock ``--lead`` seconds before a block
   boundary, and creates N Subscriptions from a thread pool: 45 % for the block that is ending,
   45 % for the block that starts at the boundary, 10 % all day. Waits until every one is
   ``active`` with its key Secret and the right gate, labels each key Secret with its group (so
   the polls below can ask the API server for exactly the keys that are still wrong), and waits
   until the operator is idle.
3. From the boundary on, polls with list calls until every key is right: label-selected
   metadata-only lists of the key Secrets whose gate label is still wrong, and server-side Table
   lists (the ``Gate`` printer column, no objects) of the Subscriptions per group. Reports the
   time from the boundary until the last key was right (its resolution is one poll round), when
   each pool's open-keys Secret listed exactly the open keys, the operator's own log line for the
   pass, the API requests the server handled in that window, and the operator's peak RSS
   (VmHWM).
4. Stops the operator and sends N plain label patches to the N key Secrets straight to the API
   server, through the operator's own client (``gpupool.kube.Kube``) with the operator's flip
   concurrency (``gates.DEFAULT_CONCURRENCY``): the limit. Prints both times and the ratio.

The operator's periodic resync is pushed past the end of the run so the figure is the boundary
pass alone, not a resync that happens to land on it. Keys are never printed. ``--pools P``
spreads the subscriptions over P pools (one GPU each); ``--profile FILE`` records the operator
with py-spy (collapsed stacks).

Measured on a 2-CPU machine shared with other work (load average 5-9, so +-30 %):

    subs  pools  flipped  last key right  open-keys right  plain patches  ratio  peak RSS
    500   1      450      11.1 s          0.1 s            2.1 s          5.4    191 MiB
    5000  10     4500     205 s           1.5 s            22.5 s         9.1    543 MiB

5,000 in one pool did not finish setup in reasonable time: every subscription reconcile reads
the whole Pool, whose status ledger grows with its subscriptions (about 1 activation/s).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from harness import (
    METADATA,
    Api,
    Operator,
    apiserver_requests,
    core,
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
from gpupool.blocks import BLOCK_ORDER, block_at
from gpupool.devcluster import LocalCluster
from gpupool.gates import DEFAULT_CONCURRENCY

GROUP_LABEL = "bench.gpupool.dev/group"
ENDING, STARTING, ALLDAY = "ending", "starting", "allday"


# -- the benchmark ----------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.n: int = args.subscriptions
        self.workdir = workdir
        self.ns = "bench"
        self.pools = [f"pool-{i}" for i in range(args.pools)]
        self.groups: dict[str, str] = {}
        self.pool_of: dict[str, str] = {}
        self.key_ids: dict[str, str] = {}
        self.results: dict[str, Any] = {}
        self.alive: Callable[[], None] | None = None
        """Raises when the operator is gone."""

    # setup ----------------------------------------------------------------------------------
    def plan(self) -> None:
        for i in range(self.n):
            name = f"sub-{i:05d}"
            self.groups[name] = ALLDAY if i % 10 == 9 else (ENDING if i % 2 == 0 else STARTING)
            self.pool_of[name] = self.pools[(i // 10) % len(self.pools)]  # every group in each

    def expected(self, group: str) -> str:
        """The gate after the boundary."""
        return "closed" if group == ENDING else "open"

    def create_objects(self, api: Api, ending: str, starting: str) -> None:
        from support.objects import pool_body, sub_body

        per_pool = math.ceil(self.n / len(self.pools))
        for pool in self.pools:
            api.call("POST", custom("pools", self.ns),
                     pool_body(pool, seats=per_pool, activationThreshold=0))
        blocks = {ENDING: [ending], STARTING: [starting],
                  ALLDAY: [b.value for b in BLOCK_ORDER]}

        def create(name: str) -> None:
            body = sub_body(name, self.pool_of[name], blocks[self.groups[name]])
            body["metadata"]["labels"] = {GROUP_LABEL: self.groups[name]}
            api.create(custom("subscriptions", self.ns), body)

        took = run_threads(create, list(self.groups), self.args.threads)
        self.results["create_s"] = took
        say(f"created {self.n} subscriptions in {took:.1f}s ({self.n / took:.0f}/s)")

    def gate_rows(self, api: Api, group: str) -> list[tuple[str, str, str]]:
        columns, rows = api.table(custom("subscriptions", self.ns), f"{GROUP_LABEL}={group}")
        name_i, phase_i, gate_i = (columns.index(c) for c in ("Name", "Phase", "Gate"))
        return [(str(r[name_i]), str(r[phase_i] or ""), str(r[gate_i] or "")) for r in rows]

    def wait_active(self, api: Api, before: dict[str, str]) -> None:
        counts = Counter(self.groups.values())
        state: dict[str, int] = {}

        def done() -> bool:
            for group, want in before.items():
                rows = self.gate_rows(api, group)
                state[group] = sum(1 for _, ph, g in rows if ph == "active" and g == want)
            return all(state[g] == counts[g] for g in before)

        started = time.monotonic()
        wait("every subscription active with its key", done, timeout=self.args.setup_timeout,
             interval=5.0, progress=lambda: ", ".join(
                 f"{g} {state.get(g, 0)}/{counts[g]}" for g in before), alive=self.alive)
        self.results["activate_s"] = time.monotonic() - started
        say(f"all {self.n} active with keys {self.results['activate_s']:.1f}s after creation")

    def label_secrets(self, api: Api) -> None:
        subs = api.list_all(custom("subscriptions", self.ns))
        secrets: dict[str, str] = {}
        for sub in subs:
            st = sub.get("status") or {}
            name = sub["metadata"]["name"]
            secrets[name] = st["keySecretName"]
            self.key_ids[name] = st["keyId"]

        def label(name: str) -> None:
            api.call("PATCH", core("secrets", self.ns, secrets[name]),
                     {"metadata": {"labels": {GROUP_LABEL: self.groups[name]}}},
                     content_type="application/merge-patch+json")

        took = run_threads(label, list(secrets), self.args.threads)
        say(f"labelled {len(secrets)} key Secrets with their group in {took:.1f}s")
        self.secret_names = [secrets[n] for n in sorted(secrets)]

    def open_key_ids(self, api: Api, pool: str) -> set[str]:
        secret = api.call("GET", core("secrets", self.ns, names.open_keys_secret_name(pool)))
        return set((secret or {}).get("data") or {})  # client ids only; values are keys

    def open_keys_are(self, api: Api, pool: str, want: set[str]) -> bool:
        return self.open_key_ids(api, pool) == want

    def want_open(self, pool: str, groups: Iterable[str]) -> set[str]:
        chosen = set(groups)
        return {self.key_ids[n] for n, g in self.groups.items()
                if g in chosen and self.pool_of[n] == pool}

    # the boundary ---------------------------------------------------------------------------
    def count_wrong_secrets(self, api: Api, selector: str) -> int:
        return len(api.metadata_names(core("secrets", self.ns), selector))

    def count_wrong_status(self, api: Api, group: str, want: str) -> int:
        return sum(1 for _, _, gate in self.gate_rows(api, group) if gate != want)

    def measure_boundary(self, api: Api, boundary_real: float) -> dict[str, float]:
        """Poll from the boundary until every key is right; seconds after it, per check."""
        kind = f"{names.LABEL_KIND}={names.KIND_API_KEY}"
        checks: dict[str, Callable[[], int]] = {}
        for group in (ENDING, STARTING, ALLDAY):
            want = self.expected(group)
            selector = f"{kind},{GROUP_LABEL}={group},{names.LABEL_GATE}!={want}"
            checks[f"secrets {group}"] = partial(self.count_wrong_secrets, api, selector)
            checks[f"status {group}"] = partial(self.count_wrong_status, api, group, want)
        open_rv: dict[str, str] = {}
        for pool in self.pools:
            want_ids = self.want_open(pool, (STARTING, ALLDAY))

            def open_keys(pool: str = pool, want_ids: set[str] = want_ids) -> int:
                name = names.open_keys_secret_name(pool)
                meta = api.call("GET", core("secrets", self.ns, name), accept=METADATA)
                rv = meta["metadata"]["resourceVersion"]
                if open_rv.get(pool) == rv:
                    return 1
                open_rv[pool] = rv
                return 0 if self.open_key_ids(api, pool) == want_ids else 1
            checks[f"open-keys {pool}"] = open_keys

        right_at: dict[str, float] = {}
        wrong: dict[str, int] = {}
        deadline = boundary_real + self.args.flip_timeout
        while len(right_at) < len(checks):
            for what, check in checks.items():
                if what in right_at:
                    continue
                wrong[what] = check()
                if wrong[what] == 0:
                    right_at[what] = time.time() - boundary_real
            if self.alive:
                self.alive()
            if time.time() > deadline:
                raise SystemExit(f"keys not right {self.args.flip_timeout:.0f}s after the "
                                 f"boundary: {wrong}")
            time.sleep(self.args.poll_interval)
        return right_at

    # the limit ------------------------------------------------------------------------------
    async def plain_patches(self, kubeconfig: Path) -> float:
        from gpupool.kube import Kube
        from gpupool.kubeconfig import load

        kube = Kube(load(str(kubeconfig)), connections=self.args.concurrency)
        sem = asyncio.Semaphore(self.args.concurrency)

        async def patch(name: str) -> None:
            async with sem:
                await kube.patch("secrets", self.ns, name,
                                 {"metadata": {"labels": {"bench.gpupool.dev/touched": "1"}}})
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            await asyncio.gather(*(patch(n) for n in self.secret_names))
            return loop.time() - started
        finally:
            await kube.close()


def default_lead(n: int) -> float:
    """Seconds from the operator's start to the boundary: enough for setup on a busy 2-core
    machine (measured: 500 took 140-190 s; one pool's ledger grows with N, so more per
    subscription at 5,000). Too short fails with the lead to use; too long only waits."""
    return 120.0 + n * 0.4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscriptions", "-n", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="500 subscriptions")
    parser.add_argument("--pools", type=int, default=1)
    parser.add_argument("--lead", type=float, default=None,
                        help="seconds between the operator's start and the boundary "
                             "(default: sized from N)")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help="in-flight patches for the limit (default: the operator's)")
    parser.add_argument("--threads", type=int, default=16, help="threads creating objects")
    parser.add_argument("--poll-interval", type=float, default=0.2)
    parser.add_argument("--setup-timeout", type=float, default=3600.0)
    parser.add_argument("--flip-timeout", type=float, default=900.0)
    parser.add_argument("--profile", metavar="FILE", default=None,
                        help="record the operator with py-spy (the venv's, else on PATH) "
                             "during setup (FILE.setup) and from the boundary until every key "
                             "is right (FILE), as collapsed stacks")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.subscriptions = 500
    # One GPU per pool's single replica, so every pool's Deployment becomes Ready.
    return run_with_cluster("gpupool-flipbench-", partial(run, args), keep=args.keep,
                            gpu_nodes=math.ceil(args.pools / 8), gpus_per_node=8, kubelet=True)


def run(args: argparse.Namespace, cluster: LocalCluster, workdir: Path) -> bool:
    from support.clock import ShiftedClock

    bench = Bench(args, workdir)
    bench.plan()
    n = bench.n
    took = start_cluster(cluster)
    say(f"control plane up in {took:.1f}s ({cluster.server})")
    install_crds(cluster, bench.ns)
    api = Api(cluster, maxsize=max(args.threads, 8))

    lead = args.lead if args.lead is not None else default_lead(n)
    clock = ShiftedClock(lead=lead)
    op = Operator(cluster, name="operator-bench", faketime=clock.faketime,
                  namespaces=[bench.ns],
                  env={"GPUPOOL_RESYNC_SECONDS": str(int(lead) + 86400)}).start()
    boundary_real = clock.boundary.timestamp() - clock.offset
    bench.alive = op.check_alive
    ending = block_at(clock.shifted_now())
    starting = BLOCK_ORDER[(BLOCK_ORDER.index(ending) + 1) % 3]
    say(f"operator clock {clock.shifted_now():%H:%M:%S}, boundary {clock.boundary:%H:%M} UTC "
        f"({ending.value} -> {starting.value}) in {clock.seconds_to_boundary():.0f}s")
    setup_started = time.monotonic()
    setup_profiler = start_profile(args.profile and f"{args.profile}.setup", op.pid, 3600)
    try:
        bench.create_objects(api, ending.value, starting.value)
        bench.wait_active(api, {ENDING: "open", STARTING: "closed", ALLDAY: "open"})
        bench.label_secrets(api)
        for pool in bench.pools:
            want = bench.want_open(pool, (ENDING, ALLDAY))
            wait(f"open-keys Secret of {pool} before the boundary",
                 partial(bench.open_keys_are, api, pool, want), 120, alive=op.check_alive)
        op.wait_idle(timeout=600)  # no reconcile finished for 3 s
        setup_s = time.monotonic() - setup_started
        end_profile(setup_profiler)
        left = clock.seconds_to_boundary()
        say(f"setup done in {setup_s:.0f}s; boundary in {left:.1f}s")
        if left < 3:
            say(f"setup took longer than the lead ({lead:.0f}s): rerun with --lead "
                f"{setup_s * 1.3 + 30:.0f}")
            return False
        pid = op.pid
        rss_before = proc_status_kb(pid, "VmRSS")
        hwm_setup = proc_status_kb(pid, "VmHWM")
        requests_before = apiserver_requests(cluster)
        reconciles_before = op.reconciles()
        while time.time() < boundary_real - 1:
            time.sleep(0.05)
        profiler = start_profile(args.profile, op.pid, args.flip_timeout)
        while time.time() < boundary_real:
            time.sleep(min(0.05, max(0.0, boundary_real - time.time())))
        say("boundary")
        right_at = bench.measure_boundary(api, boundary_real)
        requests_after = apiserver_requests(cluster)
        reconciles_after = op.reconciles()
        end_profile(profiler)
        last_key = max(v for k, v in right_at.items() if not k.startswith("open-keys"))
        open_keys = max(v for k, v in right_at.items() if k.startswith("open-keys"))
        passes = wait("the operator's boundary log line",
                      lambda: re.findall(r"boundary pass: (\d+) key\(s\) flipped in ([\d.]+)s",
                                         op.log_text()), timeout=args.flip_timeout,
                      alive=op.check_alive)
        hwm = proc_status_kb(pid, "VmHWM")
        delta = requests_after - requests_before
    finally:
        op.stop()

    flipped = sum(1 for g in bench.groups.values() if g != ALLDAY)
    print()
    print(f"== boundary flip: {n} subscriptions in {len(bench.pools)} pool(s), "
          f"{flipped} keys change ({ending.value} -> {starting.value}) ==")
    print(f"setup: create {bench.results['create_s']:.1f}s, all active "
          f"{bench.results['activate_s']:.1f}s later, lead {lead:.0f}s")
    for what in sorted(right_at):
        print(f"  {what:<22} right {right_at[what]:6.2f}s after the boundary")
    print(f"operator log: {passes[-1][0]} key(s) flipped in {passes[-1][1]}s (the whole pass)")
    print(f"API requests in the window (no watches; the benchmark's own polls included): "
          f"{sum(delta.values())}")
    for what, count in delta.most_common(12):
        print(f"  {count:7d}  {what}")
    print(f"operator reconciles in the window: {reconciles_after - reconciles_before:.0f}")
    sys.stdout.flush()

    patches_s = asyncio.run(bench.plain_patches(cluster.kubeconfig))
    print()
    print(f"boundary -> last key right : {last_key:8.2f} s   (poll resolution "
          f"~{args.poll_interval:.1f}s + one poll)")
    print(f"boundary -> open-keys right: {open_keys:8.2f} s")
    print(f"{n} plain label patches   : {patches_s:8.2f} s   (concurrency "
          f"{args.concurrency}, operator stopped)")
    print(f"ratio (flip / limit)       : {last_key / patches_s:8.2f}")
    print(f"operator peak RSS (VmHWM)  : {hwm / 1024:8.1f} MiB   (at the end of setup "
          f"{hwm_setup / 1024:.1f} MiB; RSS at the boundary {rss_before / 1024:.1f} MiB)")
    print(f"load average at the end    : {' '.join(os.getloadavg().__repr__()[1:-1].split(', '))}"
          f"  ({os.cpu_count()} CPUs; other work on the machine skews every figure)")
    return True


if __name__ == "__main__":
    sys.exit(main())
