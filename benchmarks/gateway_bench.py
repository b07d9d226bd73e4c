"""Gateway overhead on loopback: direct vs the gpupool gateway vs LiteLLM's proxy.

One run measures requests/s and p50/p99 latency at 1, 50 and 200 concurrent clients for

  (a) direct     the stand-in upstream itself (a fixed chat completion with usage, uvicorn +
                 httptools + uvloop, its own process)
  (b) gateway    ``gpupool gateway`` (same server config as the CLI) in front of it: key lookup,
                 gate, RPM/TPM/concurrency limits in local memory, usage settled from the body
  (b+r) gateway  the same with the limits in Redis (a Debian ``redis-server`` on loopback), if
       +redis    redis-server is installed
  (c) litellm    LiteLLM's proxy (``scripts/setup-litellm.sh`` installs ``litellm[proxy]`` into
                 ~/.cache/gpupool/litellm-venv) with per-key rpm/tpm/parallel-request limits

and prints the latency each adds over (a) and the ratios.

Closed loop (1, 50, 200 clients): each client sends its next request as soon as the previous
answer is complete. At 50 and 200 clients every target runs flat out, so latency there is
clients / throughput (Little's law) and "added latency" mostly measures throughput. Open loop
(``--rate``, default 250 and 1000 req/s, the latter the load at which LiteLLM publishes its
overhead): requests
leave on a fixed schedule over up to 256 connections and latency counts from each request's
scheduled time, so this is the added latency at a given load.

Every request is a non-streamed ``POST /v1/chat/completions`` on a keep-alive connection. The
load generator is a minimal HTTP/1.1 client on uvloop in this process, so it costs little CPU
next to the servers (all of them share the machine's cores; under load the figures include that
contention, for every target alike). The
``cpu us/req`` column is the CPU time the target's own process spent per answered request (from
/proc): unlike the latencies it hardly moves when other work shares the machine.

LiteLLM and virtual keys: LiteLLM keeps virtual keys (``/key/generate``) in a Postgres database
through Prisma; without one it answers ``DB not connected`` (500). ``litellm[proxy]``
1.81.0 does not ship Prisma, and installing ``prisma`` does not help here: its CLI fetches the
query engine at first use from binaries.prisma.sh (``getaddrinfo ENOTFOUND binaries.prisma.sh``:
only the package registries are reachable from these machines). So (c) runs LiteLLM's
documented DB-less equivalent: a ``custom_auth``
function that maps each virtual key (by SHA-256) to a ``UserAPIKeyAuth`` with ``rpm_limit``,
``tpm_limit`` and ``max_parallel_requests``, which LiteLLM's own parallel-request limiter then
enforces in memory. The run checks that those limits really bite (a key with rpm_limit=2 must get
a 429 on its third request) and prints the result.

Usage::

    .venv/bin/python benchmarks/gateway_bench.py                 # everything, ~2 minutes
    .venv/bin/python benchmarks/gateway_bench.py --duration 3 --concurrency 1,50
    .venv/bin/python benchmarks/gateway_bench.py --no-litellm --no-redis
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
CACHE = Path(os.environ.get("GPUPOOL_CACHE") or Path.home() / ".cache" / "gpupool")
LITELLM = CACHE / "litellm-venv" / "bin" / "litellm"
MODEL = "tiny"
BIG = 10**9

CHAT_REQUEST = json.dumps({"model": MODEL, "max_tokens": 16,
                           "messages": [{"role": "user", "content": "Hello there"}]}).encode()


# ---------------------------------------------------------------------------------------------
# the stand-in upstream
# ---------------------------------------------------------------------------------------------
def upstream_app(api_key: str) -> Any:
    completion = json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "length", "logprobs": None,
                     "message": {"role": "assistant", "content": "Hello! How can I help?"}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28},
    }).encode()
    models = json.dumps({"object": "list", "data": [
        {"id": MODEL, "object": "model", "created": 1700000000, "owned_by": "bench",
         "max_model_len": 4096}]}).encode()
    expected = b"Bearer " + api_key.encode()
    unauthorized = b'{"error":{"message":"Unauthorized"}}'

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        more = True
        while more:
            msg = await receive()
            more = msg.get("more_body", False)
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        status, body = 200, (models if scope["path"] == "/v1/models" else completion)
        if auth != expected:
            status, body = 401, unauthorized
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


def run_upstream(port: int) -> None:
    import uvicorn
    import uvloop

    config = uvicorn.Config(upstream_app(os.environ["BENCH_UPSTREAM_KEY"]), host="127.0.0.1",
                            port=port, http="httptools", loop="none", access_log=False,
                            log_level="warning", backlog=4096)
    uvloop.run(uvicorn.Server(config).serve())


def run_gateway(port: int, upstream: str, redis_url: str | None) -> None:
    import uvicorn
    import uvloop

    from gpupool.gateway.app import Gateway
    from gpupool.gateway.cli import server_config
    from gpupool.gateway.keys import StaticKeySource
    from gpupool.gateway.limits import Limiter, LocalLimiter, RedisLimiter
    from gpupool.gateway.testing import key_record, upstream_key

    source = StaticKeySource([
        key_record(os.environ["BENCH_KEY"], upstream=upstream, key_id="key_bench", rpm=BIG,
                   tpm=BIG * 1000, concurrency=BIG),
        upstream_key(os.environ["BENCH_UPSTREAM_KEY"]),
    ])
    limiter: Limiter = RedisLimiter(redis_url) if redis_url else LocalLimiter()
    gateway = Gateway(source, limiter=limiter)
    config = server_config(gateway, "127.0.0.1", port)
    config.log_level = "warning"
    uvloop.run(uvicorn.Server(config).serve())


# ---------------------------------------------------------------------------------------------
# a small, fast HTTP/1.1 load generator
# ---------------------------------------------------------------------------------------------
class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = -1
        self.status = 0
        self.chunked = False
        self.waiter: asyncio.Future[int] | None = None
        self.transport: Any = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            self.status = int(head[9:12])
            self.chunked = b"transfer-encoding: chunked" in head
            if self.chunked:
                self.need = end + 4
            else:
                i = head.find(b"content-length:")
                length = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0
                                  else len(head)]) if i >= 0 else 0
                self.need = end + 4 + length
        if self.chunked:
            if self.buf.endswith(b"0\r\n\r\n"):
                self._done()
        elif len(self.buf) >= self.need:
            self._done()

    def _done(self) -> None:
        self.buf.clear()
        self.need = -1
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.status)

    async def request(self, raw: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


def raw_request(port: int, key: str, path: str = "/v1/chat/completions",
                body: bytes = CHAT_REQUEST) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@dataclass
class Result:
    target: str
    clients: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float = float("nan")  # CPU time of the target's own process per request


def summarize(target: str, clients: int, latencies: list[int], errors: int, duration: float,
              cpu: list[float]) -> Result:
    """Percentiles (ms) of the latencies (ns), the rate, and the target's CPU per request
    (``cpu``: its CPU seconds at the start and the end of the measurement)."""
    latencies.sort()
    n = len(latencies)

    def pct(p: float) -> float:
        return latencies[min(n - 1, int(p * n))] / 1e6 if n else float("nan")

    cpu_us = (cpu[1] - cpu[0]) / n * 1e6 if len(cpu) == 2 and n else float("nan")
    return Result(target, clients, n, errors, n / duration, pct(0.50), pct(0.99), cpu_us)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(port: int, key: str, clients: int, warmup: float, duration: float,
               target: str, pid: int | None = None) -> Result:
    loop = asyncio.get_running_loop()
    raw = raw_request(port, key)
    conns: list[Client] = []
    for _ in range(clients):
        _, proto = await loop.create_connection(Client, "127.0.0.1", port)
        conns.append(proto)
    latencies: list[int] = []
    errors = 0
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + duration
    cpu: list[float] = []

    async def sample_cpu() -> None:
        if pid is None:
            return
        await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
        cpu.append(cpu_seconds(pid))
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        cpu.append(cpu_seconds(pid))

    async def worker(c: Client) -> None:
        nonlocal errors
        while True:
            t0 = time.perf_counter_ns()
            if t0 / 1e9 >= t_end:
                return
            try:
                status = await c.request(raw)
            except ConnectionError:
                errors += 1
                return
            t1 = time.perf_counter_ns()
            if t0 / 1e9 >= t_measure:
                if status == 200:
                    latencies.append(t1 - t0)
                else:
                    errors += 1

    await asyncio.gather(sample_cpu(), *(worker(c) for c in conns))
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return summarize(target, clients, latencies, errors, duration, cpu)


async def load_rate(port: int, key: str, rate: float, warmup: float, duration: float,
                    target: str, pid: int | None = None, max_conns: int = 256) -> Result:
    """Open loop: requests are sent at ``rate`` per second whatever the answers do; latency is
    counted from each request's scheduled time (so a stalled target is not let off)."""
    loop = asyncio.get_running_loop()
    raw = raw_request(port, key)
    idle: list[Client] = []
    opened = 0
    waiting: asyncio.Queue[Client] = asyncio.Queue()
    latencies: list[int] = []
    errors = 0
    t0 = time.perf_counter() + 0.05
    t_measure = t0 + warmup
    t_end = t_measure + duration
    cpu: list[float] = []
    pending: set[asyncio.Task[None]] = set()

    every: list[Client] = []

    async def conn() -> Client:
        nonlocal opened
        if idle:
            return idle.pop()
        if opened < max_conns:
            opened += 1
            _, proto = await loop.create_connection(Client, "127.0.0.1", port)
            every.append(proto)
            return proto
        return await waiting.get()

    def give_back(c: Client) -> None:
        if c.lost:
            return
        if waiting._getters:  # type: ignore[attr-defined]
            waiting.put_nowait(c)
        else:
            idle.append(c)

    async def one(scheduled: float) -> None:
        nonlocal errors, opened
        c = await conn()
        try:
            status = await c.request(raw)
        except ConnectionError:
            errors += 1
            opened -= 1
            return
        done = time.perf_counter()
        give_back(c)
        if scheduled >= t_measure:
            if status == 200:
                latencies.append(int((done - scheduled) * 1e9))
            else:
                errors += 1

    i = 0
    while True:
        now = time.perf_counter()
        if now >= t_end:
            break
        if not cpu and now >= t_measure and pid is not None:
            cpu.append(cpu_seconds(pid))
        due = t0 + i / rate
        while due <= now and due < t_end:
            task = loop.create_task(one(due))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
            due = t0 + i / rate
        await asyncio.sleep(max(0.0, min(due, t_end) - time.perf_counter()))
    if pid is not None and cpu:
        cpu.append(cpu_seconds(pid))
    measured_sent = sum(1 for k in range(i) if t0 + k / rate >= t_measure)
    # a target that cannot keep up: what is not answered 5 s after the end counts as an error
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            await asyncio.gather(*pending, return_exceptions=True)
    for task in list(pending):
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for c in every:
        if c.transport is not None:
            c.transport.close()
    errors += max(0, measured_sent - len(latencies) - errors)
    return summarize(target, -int(rate), latencies, errors, duration, cpu)


async def drain(port: int, key: str, timeout: float = 90.0) -> None:
    """Wait until a target has worked off any backlog: two quick answers in a row."""
    loop = asyncio.get_running_loop()
    _, c = await loop.create_connection(Client, "127.0.0.1", port)
    raw = raw_request(port, key)
    quick = 0
    deadline = time.perf_counter() + timeout
    try:
        while quick < 2 and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await c.request(raw)
            quick = quick + 1 if time.perf_counter() - t0 < 0.1 else 0
    finally:
        c.transport.close()


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not listen on {port} within {timeout:.0f} s")
        time.sleep(0.1)  # poll interval


def http_status(port: int, raw: bytes, timeout: float = 10) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.sendall(raw)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return int(data[9:12]) if len(data) >= 12 else 0


def wait_answering(port: int, key: str, proc: subprocess.Popen[bytes], what: str,
                   timeout: float = 120) -> None:
    """Until a chat completion through ``what`` answers 200."""
    deadline = time.monotonic() + timeout
    last = 0
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            last = http_status(port, raw_request(port, key))
            if last == 200:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not answer 200 within {timeout:.0f} s (last {last})")
        time.sleep(0.2)  # poll interval


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = Path(tempfile.mkdtemp(prefix="gpupool-bench-"))

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: str | None = None) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                cwd=cwd, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=15)

    def tail(self, name: str, lines: int = 20) -> str:
        try:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def processes() -> Iterator[Procs]:
    procs = Procs()
    try:
        yield procs
    finally:
        procs.stop()
        shutil.rmtree(procs.logs, ignore_errors=True)


LITELLM_AUTH = '''
"""Virtual keys with limits, without LiteLLM's database (see benchmarks/gateway_bench.py)."""
import hashlib
import json
import os

from fastapi import Request
from litellm.proxy._types import UserAPIKeyAuth

KEYS = json.loads(os.environ["BENCH_LITELLM_KEYS"])  # sha256(key) -> limits


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    token = hashlib.sha256(api_key.encode()).hexdigest()
    limits = KEYS.get(token)
    if limits is None:
        raise Exception("invalid virtual key")
    # LiteLLM's rate limiter keys its counters on api_key (the hashed token).
    return UserAPIKeyAuth(api_key=token, token=token, key_alias=limits["alias"],
                          rpm_limit=limits["rpm"],
                          tpm_limit=limits["tpm"],
                          max_parallel_requests=limits["max_parallel_requests"])
'''


def start_litellm(procs: Procs, upstream_port: int, upstream_key: str,
                  keys: dict[str, dict[str, Any]]) -> tuple[int, subprocess.Popen[bytes]]:
    workdir = procs.logs / "litellm"
    workdir.mkdir()
    (workdir / "bench_auth.py").write_text(LITELLM_AUTH)
    (workdir / "config.yaml").write_text(textwrap.dedent(f"""\
        model_list:
          - model_name: {MODEL}
            litellm_params:
              model: openai/{MODEL}
              api_base: http://127.0.0.1:{upstream_port}/v1
              api_key: os.environ/BENCH_UPSTREAM_KEY
        litellm_settings:
          telemetry: false
          set_verbose: false
          json_logs: false
        general_settings:
          custom_auth: bench_auth.user_api_key_auth
          disable_spend_logs: true
        """))
    port = free_port()
    hashed = {hashlib.sha256(k.encode()).hexdigest(): v for k, v in keys.items()}
    env = {"BENCH_UPSTREAM_KEY": upstream_key, "BENCH_LITELLM_KEYS": json.dumps(hashed),
           "LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "PYTHONPATH": str(workdir), "NO_DOCS": "True", "DISABLE_ADMIN_UI": "True"}
    proc = procs.start("litellm", [str(LITELLM), "--config", str(workdir / "config.yaml"),
                                   "--host", "127.0.0.1", "--port", str(port),
                                   "--num_workers", "1"], env=env, cwd=str(workdir))
    return port, proc


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def fmt(results: list[Result], direct: dict[int, Result]) -> str:
    lines = [f"{'target':<15}{'load':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
             f"{'+p50 ms':>9}{'+p99 ms':>9}{'cpu us/req':>11}{'errors':>8}"]
    for r in results:
        d = direct[r.clients]
        load_label = f"{-r.clients}/s" if r.clients < 0 else str(r.clients)
        added = "" if r.target == "direct" else f"{r.p50_ms - d.p50_ms:>9.3f}"
        added99 = "" if r.target == "direct" else f"{r.p99_ms - d.p99_ms:>9.3f}"
        lines.append(f"{r.target:<15}{load_label:>8}{r.rps:>10.0f}{r.p50_ms:>9.3f}"
                     f"{r.p99_ms:>9.3f}{added or '':>9}{added99 or '':>9}{r.cpu_us:>11.0f}"
                     f"{r.errors:>8}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,50,200")
    p.add_argument("--rate", default="250,1000",
                   help="open-loop points: offered requests/s, comma-separated ('' for none)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--no-litellm", action="store_true")
    p.add_argument("--no-redis", action="store_true")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("_role", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--upstream", help=argparse.SUPPRESS)
    p.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._role == "_upstream":
        run_upstream(args.port)
        return 0
    if args._role == "_gateway":
        run_gateway(args.port, args.upstream, args.redis_url)
        return 0

    levels = [int(c) for c in args.concurrency.split(",") if c]
    rates = [float(r) for r in args.rate.split(",") if r]
    upstream_key = "sk_internal_" + secrets.token_urlsafe(24)
    gateway_key = "sk_pool_" + secrets.token_urlsafe(32)
    litellm_key = "sk-virtual-" + secrets.token_urlsafe(24)
    litellm_small = "sk-virtual-" + secrets.token_urlsafe(24)
    env = {"BENCH_UPSTREAM_KEY": upstream_key, "BENCH_KEY": gateway_key}
    me = [sys.executable, str(HERE)]
    print(f"gateway benchmark: {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}, "
          f"{args.duration:.0f} s per point after {args.warmup:.0f} s warm-up", flush=True)

    with processes() as procs:
        up_port = free_port()
        up = procs.start("upstream", [*me, "_upstream", "--port", str(up_port)], env)
        wait_port(up_port, up, "upstream")
        targets: list[tuple[str, int, str, int]] = [("direct", up_port, upstream_key, up.pid)]

        gw_port = free_port()
        gw = procs.start("gateway", [*me, "_gateway", "--port", str(gw_port), "--upstream",
                                     f"http://127.0.0.1:{up_port}"], env)
        wait_answering(gw_port, gateway_key, gw, "gateway")
        targets.append(("gateway", gw_port, gateway_key, gw.pid))

        redis_note = ""
        redis_bin = shutil.which("redis-server")
        if not args.no_redis and redis_bin:
            r_port = free_port()
            redis = procs.start("redis", [redis_bin, "--port", str(r_port), "--bind",
                                          "127.0.0.1", "--save", "", "--appendonly", "no"])
            wait_port(r_port, redis, "redis-server")
            gr_port = free_port()
            gr = procs.start("gateway-redis", [
                *me, "_gateway", "--port", str(gr_port), "--upstream",
                f"http://127.0.0.1:{up_port}", "--redis-url",
                f"redis://127.0.0.1:{r_port}/0"], env)
            wait_answering(gr_port, gateway_key, gr, "gateway with Redis")
            targets.append(("gateway+redis", gr_port, gateway_key, gr.pid))
        elif not args.no_redis:
            redis_note = "gateway+redis skipped: redis-server is not installed"

        litellm_note = ""
        if args.no_litellm:
            litellm_note = "litellm skipped (--no-litellm)"
        elif not LITELLM.exists():
            litellm_note = (f"litellm skipped: {LITELLM} missing - run "
                            "scripts/setup-litellm.sh")
        else:
            keys = {litellm_key: {"alias": "bench", "rpm": BIG, "tpm": BIG * 1000,
                                  "max_parallel_requests": BIG},
                    litellm_small: {"alias": "small", "rpm": 2, "tpm": BIG,
                                    "max_parallel_requests": 10}}
            ll_port, ll = start_litellm(procs, up_port, upstream_key, keys)
            try:
                wait_answering(ll_port, litellm_key, ll, "litellm", timeout=180)
            except (RuntimeError, TimeoutError) as exc:
                litellm_note = f"litellm failed to start: {exc}\n{procs.tail('litellm')}"
            else:
                codes = [http_status(ll_port, raw_request(ll_port, litellm_small))
                         for _ in range(3)]
                enforced = codes == [200, 200, 429]
                litellm_note = ("litellm: virtual keys via custom_auth (no DB); its limiter "
                                f"{'enforces' if enforced else 'did NOT enforce'} rpm_limit=2 "
                                f"(statuses {codes})")
                targets.append(("litellm", ll_port, litellm_key, ll.pid))

        results: list[Result] = []

        async def run_all() -> None:
            for clients in levels:
                for name, port, key, pid in targets:
                    r = await load(port, key, clients, args.warmup, args.duration, name, pid)
                    await drain(port, key)
                    results.append(r)
                    print(f"  {name:<14} {clients:>4} clients: {r.rps:8.0f} req/s  "
                          f"p50 {r.p50_ms:7.3f} ms  p99 {r.p99_ms:7.3f} ms  "
                          f"cpu {r.cpu_us:6.0f} us/req  errors {r.errors}", flush=True)

            for rate in rates:
                for name, port, key, pid in targets:
                    r = await load_rate(port, key, rate, args.warmup, args.duration, name, pid)
                    await drain(port, key)
                    results.append(r)
                    print(f"  {name:<14} {rate:>5.0f} req/s offered: {r.rps:8.0f} req/s  "
                          f"p50 {r.p50_ms:7.3f} ms  p99 {r.p99_ms:7.3f} ms  "
                          f"cpu {r.cpu_us:6.0f} us/req  errors {r.errors}", flush=True)

        import uvloop

        uvloop.run(run_all())

    direct = {r.clients: r for r in results if r.target == "direct"}
    print()
    print(fmt(results, direct))
    print()
    by = {(r.target, r.clients): r for r in results}
    for clients in [*levels, *(-int(r) for r in rates)]:
        g = by.get(("gateway", clients))
        d = direct[clients]
        parts = [f"{clients:>3} clients:" if clients > 0 else f"{-clients} req/s offered:"]
        if g:
            parts.append(f"gateway/direct req/s {g.rps / d.rps:.2f}, "
                         f"+p50 {g.p50_ms - d.p50_ms:.3f} ms, +p99 {g.p99_ms - d.p99_ms:.3f} ms")
        lr = by.get(("litellm", clients))
        if lr and g:
            parts.append(f"| litellm/gateway req/s {lr.rps / g.rps:.2f}, added-p50 ratio "
                         f"{(lr.p50_ms - d.p50_ms) / max(g.p50_ms - d.p50_ms, 1e-6):.1f}x, "
                         f"added-p99 ratio "
                         f"{(lr.p99_ms - d.p99_ms) / max(g.p99_ms - d.p99_ms, 1e-6):.1f}x")
        print(" ".join(parts))
    for note in (redis_note, litellm_note):
        if note:
            print(note)
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
