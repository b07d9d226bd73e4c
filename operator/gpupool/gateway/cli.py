"""``gpupool gateway``: run the gateway (``main(argv)``; ``python -m gpupool.gateway`` too).

Examples::

    gpupool gateway --namespace team-a --namespace team-b --redis-url redis://redis:6379/0
    gpupool gateway --kubeconfig ~/.kube/config --port 8080          # all namespaces

The Redis URL may also come from ``GPUPOOL_GATEWAY_REDIS_URL`` (keeps a password out of the
process list). Without Redis, limits live in this process's memory: run one replica then.
Metrics are served on ``--metrics-port`` (default 9090, ``/metrics``), apart from the public
port; ``--metrics-port 0`` serves ``/metrics`` on the main port instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import uvicorn

from gpupool.gateway.app import Gateway, GatewaySettings
from gpupool.gateway.kube import KubernetesKeySource
from gpupool.gateway.limits import Limiter, LocalLimiter, RedisLimiter

log = logging.getLogger("gpupool.gateway")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpupool gateway",
        description="Authenticate, gate and rate-limit API keys in front of the pools' vLLM.")
    p.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8080, help="listen port (default 8080)")
    p.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                   help="watch key Secrets in NS (repeatable or comma-separated; default: all)")
    p.add_argument("--redis-url", default=os.environ.get("GPUPOOL_GATEWAY_REDIS_URL"),
                   help="share limit state through this Redis (default: in-process memory)")
    p.add_argument("--kubeconfig", default=None,
                   help="kubeconfig file (default: the in-cluster service account)")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("--upstream-timeout", type=float, default=600.0,
                   help="seconds to wait for vLLM between bytes, incl. a whole non-streamed "
                        "generation (default 600)")
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="seconds to connect to vLLM (default 5)")
    p.add_argument("--block-end-grace", type=float, default=60.0,
                   help="seconds a running request may go on after its key's block ends "
                        "(default 60)")
    p.add_argument("--default-max-tokens", type=int, default=4096,
                   help="completion tokens reserved when a request sets no max_tokens and the "
                        "model's context length is unknown (default 4096)")
    p.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024,
                   help="largest request body accepted (default 32 MiB)")
    p.add_argument("--metrics-port", type=int, default=9090,
                   help="port of /metrics (default 9090; 0 = on the main port)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    return p


def _namespaces(values: list[str]) -> list[str]:
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def server_config(app: Any, host: str, port: int) -> uvicorn.Config:
    """How the gateway is served: uvicorn with httptools on the running (uv)loop, no access log."""
    return uvicorn.Config(app, host=host, port=port, lifespan="on", http="httptools",
                          loop="none", access_log=False, log_config=None, server_header=False,
                          date_header=True, backlog=4096, timeout_keep_alive=75)


async def serve(args: argparse.Namespace) -> int:
    limiter: Limiter = RedisLimiter(args.redis_url) if args.redis_url else LocalLimiter()
    settings = GatewaySettings(
        upstream_timeout=args.upstream_timeout, connect_timeout=args.connect_timeout,
        block_end_grace=args.block_end_grace, default_max_tokens=args.default_max_tokens,
        max_body_bytes=args.max_body_bytes, serve_metrics=args.metrics_port == 0)
    source = KubernetesKeySource(_namespaces(args.namespace), kubeconfig=args.kubeconfig,
                                 context=args.context)
    gateway = Gateway(source, limiter=limiter, settings=settings)
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.host, registry=gateway.metrics.registry)
    server = uvicorn.Server(server_config(gateway, args.host, args.port))
    log.info("gateway on %s:%d (limits: %s; namespaces: %s)", args.host, args.port,
             "redis" if args.redis_url else "local memory",
             ", ".join(source.namespaces) or "all")
    await server.serve()
    return 0 if server.started else 1


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    return uvloop.run(serve(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
