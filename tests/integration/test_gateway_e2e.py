"""The gateway end to end: real key Secrets in the local control plane, ``gpupool gateway``
processes watching them (some under ``faketime``, two sharing a Debian ``redis-server``), and a
real vLLM on the CPU serving the tiny model as the upstream.

The Secrets are built with ``gpupool.keys`` (the operator's own writer of the format), less their
owner references (no Subscription or Pool objects exist here, and the garbage collector would
delete Secrets whose owners are missing). Keys are random and never printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from kubernetes import client as k8s

from gpupool import keys as keyfmt
from gpupool import names
from gpupool.blocks import BLOCK_ORDER, Block, block_at, next_boundary
from gpupool.devcluster import free_port
from gpupool.models import KeyLimits
from support.redis import start_redis
from support.waiting import wait_for

if TYPE_CHECKING:
    from support.vllm import VllmServer

pytestmark = [pytest.mark.integration]

POOL = "tiny"
UPSTREAM_SECRET = names.upstream_key_secret_name(POOL)
ALL = tuple(BLOCK_ORDER)
GATEWAY_START_S = 60.0


# -- Secrets --------------------------------------------------------------------------------------
def new_key() -> str:
    return keyfmt.mint_key()


def _strip_owner(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    assert isinstance(meta, dict)
    meta.pop("ownerReferences", None)
    return obj


def put_upstream_key(kube: Any, ns: str, vllm: VllmServer) -> None:
    assert vllm.api_key is not None
    body = _strip_owner(keyfmt.build_upstream_key_secret(
        namespace=ns, pool=POOL, pool_uid="00000000-0000-4000-8000-000000000000",
        api_key=vllm.api_key))
    k8s.CoreV1Api(kube).create_namespaced_secret(ns, body)


def key_secret(ns: str, sub: str, key: str, vllm: VllmServer, *, blocks: tuple[Block, ...] = ALL,
               rpm: int = 1000, tpm: int = 1_000_000, concurrency: int = 100,
               sub_phase: str = "active", pool_phase: str = "active") -> dict[str, Any]:
    data = keyfmt.key_secret_data(
        api_key=key, kid=keyfmt.key_id(f"uid-{sub}"), pool=POOL, subscription=sub,
        customer_id="cus_test", blocks=blocks,
        limits=KeyLimits(rpm=rpm, tpm=tpm, concurrency=concurrency), upstream=vllm.base_url,
        served_model_name=vllm.served_model_name or "", sub_phase=sub_phase,
        pool_phase=pool_phase)
    return _strip_owner(keyfmt.build_key_secret(
        namespace=ns, subscription=sub, subscription_uid=f"uid-{sub}", pool=POOL, gate="open",
        data=data))


def put_key(kube: Any, ns: str, sub: str, vllm: VllmServer, **kw: Any) -> str:
    key = new_key()
    k8s.CoreV1Api(kube).create_namespaced_secret(ns, key_secret(ns, sub, key, vllm, **kw))
    return key


def key_id_of(sub: str) -> str:
    return keyfmt.key_id(f"uid-{sub}")


# -- gateway processes ----------------------------------------------------------------------------
@dataclass
class GatewayProc:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)


@contextlib.contextmanager
def gateway(kubeconfig: Path, namespace: str, *, redis_url: str | None = None,
            faketime: str | None = None) -> Iterator[GatewayProc]:
    port, metrics_port = free_port(), free_port()
    fd, log_name = tempfile.mkstemp(prefix="gpupool-gateway-", suffix=".log")
    os.close(fd)
    argv = [sys.executable, "-m", "gpupool.gateway", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics_port), "--kubeconfig", str(kubeconfig),
            "--namespace", namespace, "--block-end-grace", "5", "--log-level", "debug"]
    if redis_url:
        argv += ["--redis-url", redis_url]
    if faketime:
        argv = ["faketime", "-f", faketime, *argv]
    with open(log_name, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    gw = GatewayProc(proc, port, metrics_port, Path(log_name))
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"gateway exited with {proc.returncode}:\n{gw.log_tail()}")
            try:
                return httpx.get(f"{gw.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, GATEWAY_START_S, message=lambda: "gateway ready\n" + gw.log_tail())
        yield gw
    finally:
        gw.stop()
        text = gw.log.read_text(errors="replace")
        gw.log.unlink(missing_ok=True)
        leaked = "sk_pool_" in text or "sk_internal_" in text
        assert not leaked, "a key appeared in the gateway's log"


def status_becomes(url: str, path: str, key: str, want: int, body: dict[str, Any],
                   timeout: float = 30.0) -> None:
    """Poll until the gateway answers ``want`` (a Secret change reached it through the watch)."""
    seen: list[int] = []

    def check() -> bool:
        r = httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"},
                       timeout=60)
        seen.append(r.status_code)
        return r.status_code == want

    wait_for(check, timeout, interval=0.2, message=lambda: f"status {want} (seen {seen[-5:]})")


def chat(vllm: VllmServer, max_tokens: int = 8, **kw: Any) -> dict[str, Any]:
    return {"model": vllm.served_model_name, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Hello"}], **kw}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def fire(urls: list[str], key: str, body: dict[str, Any], n: int
               ) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as http:
        async def one(i: int) -> httpx.Response:
            return await http.post(urls[i % len(urls)] + "/v1/chat/completions", json=body,
                                   headers=bearer(key))
        return list(await asyncio.gather(*(one(i) for i in range(n))))


def fire_at_once(urls: list[str], key: str, body: dict[str, Any], n: int,
                 admitted: int, attempts: int = 3) -> list[httpx.Response]:
    """``fire`` for a concurrency limit: ``n`` requests meant to be in flight together.

    On this 2-CPU machine a short generation can finish before the last of ``n`` requests
    reaches the gateway, and its freed slot then admits one more, rightly. Such a burst is
    sent again (the key has no per-minute budget to use up); a limiter that lets more than
    ``admitted`` through at once does so on every attempt, and the last one is returned."""
    responses: list[httpx.Response] = []
    for _ in range(attempts):
        responses = asyncio.run(fire(urls, key, body, n))
        if sum(r.status_code == 200 for r in responses) <= admitted:
            break
    return responses


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture
def pool_ns(kube: Any, own_namespace: str, vllm_server: VllmServer) -> str:
    """A namespace no operator serves: the Secrets here are the gateway's whole world."""
    put_upstream_key(kube, own_namespace, vllm_server)
    return own_namespace


# -- tests ----------------------------------------------------------------------------------------
def test_inference_through_the_gateway(cluster: Any, kube: Any, pool_ns: str,
                                       vllm_server: VllmServer) -> None:
    key = put_key(kube, pool_ns, "alice", vllm_server)
    with gateway(cluster.kubeconfig, pool_ns) as gw:
        # chat completions
        r = httpx.post(gw.url + "/v1/chat/completions", json=chat(vllm_server),
                       headers=bearer(key), timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] >= 1

        # streaming, usage asked for: the last chunk before [DONE] carries it
        with httpx.stream("POST", gw.url + "/v1/chat/completions",
                          json=chat(vllm_server, stream=True,
                                    stream_options={"include_usage": True}),
                          headers=bearer(key), timeout=120) as s:
            assert s.status_code == 200
            assert s.headers["content-type"].startswith("text/event-stream")
            data = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        last = json.loads(data[-2])
        assert last["choices"] == []
        assert last["usage"]["total_tokens"] == (last["usage"]["prompt_tokens"]
                                                 + last["usage"]["completion_tokens"])

        # streaming, usage not asked for: vLLM (--enable-force-include-usage) still sends the
        # usage-only chunk (choices: []); the gateway counts it and keeps it out of the client's
        # stream (vLLM's own usage fields on content chunks are left as they are)
        before = metric(gw.metrics(), "gpupool_gateway_tokens_total",
                        key_id=key_id_of("alice"), kind="completion")
        r = httpx.post(gw.url + "/v1/chat/completions", json=chat(vllm_server, stream=True),
                       headers=bearer(key), timeout=120)
        data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        chunks = [json.loads(d) for d in data if d.startswith("{")]
        assert chunks and all(c["choices"] for c in chunks)
        assert data[-1] == "[DONE]"
        after = metric(gw.metrics(), "gpupool_gateway_tokens_total",
                       key_id=key_id_of("alice"), kind="completion")
        assert after > before

        # Anthropic messages (x-api-key), rewritten to vLLM's /v1/messages
        r = httpx.post(gw.url + "/anthropic/v1/messages",
                       json={"model": vllm_server.served_model_name, "max_tokens": 8,
                             "messages": [{"role": "user", "content": "Hello"}]},
                       headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                       timeout=120)
        assert r.status_code == 200, r.text
        msg = r.json()
        assert msg["type"] == "message"
        assert msg["usage"]["input_tokens"] >= 1
        assert msg["usage"]["output_tokens"] >= 1

        # models, and nothing outside the allowlist
        r = httpx.get(gw.url + "/v1/models", headers=bearer(key), timeout=30)
        assert r.status_code == 200
        assert r.json()["data"][0]["id"] == vllm_server.served_model_name
        for path in ("/tokenize", "/pause", "/invocations", "/metrics", "/health"):
            assert httpx.post(gw.url + path, json={}, headers=bearer(key),
                              timeout=30).status_code == 404

        text = gw.metrics()
        assert metric(text, "gpupool_gateway_requests_total", key_id=key_id_of("alice"),
                      route="chat", status="200") == 3
        leaked = key in text
        assert not leaked, "a key appeared in /metrics"


def test_refusals(cluster: Any, kube: Any, pool_ns: str, vllm_server: VllmServer) -> None:
    past_due = put_key(kube, pool_ns, "bob", vllm_server, sub_phase="past_due")
    canceled = put_key(kube, pool_ns, "carol", vllm_server, sub_phase="canceled")
    pending = put_key(kube, pool_ns, "dave", vllm_server, sub_phase="pending_key")
    paused = put_key(kube, pool_ns, "erin", vllm_server, pool_phase="paused")
    live = put_key(kube, pool_ns, "frank", vllm_server)
    body = chat(vllm_server)
    with gateway(cluster.kubeconfig, pool_ns) as gw:
        def post(key: str, path: str = "/v1/chat/completions", **kw: Any) -> httpx.Response:
            return httpx.post(gw.url + path, json=body, headers=bearer(key), timeout=60, **kw)

        r = post(new_key())
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert post(past_due).status_code == 402
        r = post(canceled)
        assert (r.status_code, r.json()["error"]["code"]) == (403, "subscription_canceled")
        r = post(pending)
        assert (r.status_code, r.json()["error"]["code"]) == (403, "key_not_active")
        assert post(paused).status_code == 503
        r = post(canceled, "/anthropic/v1/messages")
        assert r.status_code == 403
        assert r.json()["type"] == "error"

        # Secret changes reach the gateway through the watch, no restart
        assert post(live).status_code == 200
        api = k8s.CoreV1Api(kube)
        name = names.key_secret_name("frank")
        api.patch_namespaced_secret(name, pool_ns, {"stringData": {"subscriptionPhase":
                                                                   "past_due"}})
        status_becomes(gw.url, "/v1/chat/completions", live, 402, body)
        api.patch_namespaced_secret(name, pool_ns, {"stringData": {"subscriptionPhase":
                                                                   "active"}})
        status_becomes(gw.url, "/v1/chat/completions", live, 200, body)
        api.delete_namespaced_secret(name, pool_ns)
        status_becomes(gw.url, "/v1/chat/completions", live, 401, body)


def _offset_to(target: datetime) -> int:
    """faketime's relative offset (whole seconds) that makes a process start at ``target``."""
    return round((target - datetime.now(UTC)).total_seconds())


def test_closed_key_under_faketime(cluster: Any, kube: Any, pool_ns: str,
                                   vllm_server: VllmServer) -> None:
    # The gateway's clock: 20 s before the next boundary. One key owns the block that is ending,
    # one owns only a block that is not current.
    now = datetime.now(UTC)
    boundary = next_boundary(now + timedelta(hours=1))
    ending = block_at(boundary - timedelta(seconds=1))
    other = next(b for b in BLOCK_ORDER if b not in (ending, block_at(boundary)))
    closing = put_key(kube, pool_ns, "grace", vllm_server, blocks=(ending,))
    closed = put_key(kube, pool_ns, "henry", vllm_server, blocks=(other,))
    body = chat(vllm_server)
    offset = _offset_to(boundary - timedelta(seconds=20))
    with gateway(cluster.kubeconfig, pool_ns, faketime=f"+{offset}s") as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", json=body, headers=bearer(closed),
                       timeout=60)
        assert r.status_code == 403
        err = r.json()["error"]
        assert err["code"] == "outside_blocks"
        opens = datetime.fromisoformat(err["next_open_at"].replace("Z", "+00:00"))
        assert block_at(opens) == other
        assert int(r.headers["retry-after"]) >= 1

        # open now (before the boundary by the gateway's clock) ...
        r = httpx.post(gw.url + "/v1/chat/completions", json=body, headers=bearer(closing),
                       timeout=60)
        assert r.status_code == 200, r.text
        # ... and closed from the boundary on, by the gateway's own clock (nobody touched the
        # Secret: this is the gateway's check, not the operator's flip)
        status_becomes(gw.url, "/v1/chat/completions", closing, 403, body, timeout=60)
        r = httpx.post(gw.url + "/v1/chat/completions", json=body, headers=bearer(closing),
                       timeout=60)
        assert r.json()["error"]["code"] == "outside_blocks"
        assert datetime.fromisoformat(
            r.json()["error"]["next_open_at"].replace("Z", "+00:00")) == boundary + timedelta(
            hours=16)


def test_limits_hold(cluster: Any, kube: Any, pool_ns: str, vllm_server: VllmServer) -> None:
    rpm_key = put_key(kube, pool_ns, "rpm", vllm_server, rpm=3)
    conc_key = put_key(kube, pool_ns, "conc", vllm_server, concurrency=2)
    tpm_key = put_key(kube, pool_ns, "tpm", vllm_server, tpm=600)
    long = chat(vllm_server, max_tokens=200, ignore_eos=True)
    with gateway(cluster.kubeconfig, pool_ns) as gw:
        # RPM: 10 at once, 3 admitted
        responses = asyncio.run(fire([gw.url], rpm_key, chat(vllm_server), 10))
        assert sorted(r.status_code for r in responses) == [200] * 3 + [429] * 7
        assert {r.json()["error"]["limit"] for r in responses if r.status_code == 429} == {"rpm"}
        assert all(int(r.headers["retry-after"]) >= 1 for r in responses
                   if r.status_code == 429)

        # concurrency: 8 long generations at once, 2 admitted
        responses = fire_at_once([gw.url], conc_key, long, 8, admitted=2)
        assert sorted(r.status_code for r in responses) == [200] * 2 + [429] * 6
        assert {r.json()["error"]["limit"] for r in responses
                if r.status_code == 429} == {"concurrency"}

        # TPM 600: each reservation is capped by max_model_len (256): 2 fit, not 3; the
        # tokens really used by what was admitted stay within the limit
        responses = asyncio.run(fire([gw.url], tpm_key, long, 5))
        assert sorted(r.status_code for r in responses) == [200] * 2 + [429] * 3
        used = sum(r.json()["usage"]["total_tokens"] for r in responses if r.status_code == 200)
        assert used <= 600
        assert {r.json()["error"]["limit"] for r in responses if r.status_code == 429} == {"tpm"}
        # settled from usage: what is left of the minute admits exactly what fits
        admitted = used
        for _ in range(4):
            r = httpx.post(gw.url + "/v1/chat/completions", json=long, headers=bearer(tpm_key),
                           timeout=120)
            if r.status_code == 200:
                admitted += r.json()["usage"]["total_tokens"]
            else:
                assert r.status_code == 429
        assert admitted <= 600


def test_limits_hold_across_two_replicas_sharing_redis(cluster: Any, kube: Any, pool_ns: str,
                                                       vllm_server: VllmServer) -> None:
    rpm_key = put_key(kube, pool_ns, "rpm2", vllm_server, rpm=4)
    conc_key = put_key(kube, pool_ns, "conc2", vllm_server, concurrency=2)
    tpm_key = put_key(kube, pool_ns, "tpm2", vllm_server, tpm=600)
    long = chat(vllm_server, max_tokens=200, ignore_eos=True)
    with start_redis() as redis, \
            gateway(cluster.kubeconfig, pool_ns, redis_url=redis.url) as a, \
            gateway(cluster.kubeconfig, pool_ns, redis_url=redis.url) as b:
        urls = [a.url, b.url]
        responses = asyncio.run(fire(urls, rpm_key, chat(vllm_server), 12))
        assert sorted(r.status_code for r in responses) == [200] * 4 + [429] * 8

        responses = fire_at_once(urls, conc_key, long, 8, admitted=2)
        assert sorted(r.status_code for r in responses) == [200] * 2 + [429] * 6

        responses = asyncio.run(fire(urls, tpm_key, long, 6))
        assert sorted(r.status_code for r in responses) == [200] * 2 + [429] * 4
        assert sum(r.json()["usage"]["total_tokens"] for r in responses
                   if r.status_code == 200) <= 600

        total_refused = sum(metric(gw.metrics(), "gpupool_gateway_refusals_total",
                                   key_id=key_id_of("rpm2"), reason="rpm") for gw in (a, b))
        assert total_refused == 8


def test_gateway_cli_help() -> None:
    out = subprocess.run([sys.executable, "-m", "gpupool.gateway", "--help"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    for opt in ("--host", "--port", "--namespace", "--redis-url", "--kubeconfig",
                "--upstream-timeout", "--block-end-grace", "--metrics-port"):
        assert opt in out
