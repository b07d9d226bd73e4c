"""``gpupool api``: serve the REST API, or manage its management keys.

    gpupool api --namespace shop [--port 8000] [--kubeconfig FILE]       serve
    gpupool api create-key --customer cus_x --namespace shop [--email E]  print a new mk_ key once
    gpupool api revoke-key --key-id mkid_0123456789abcdef --namespace shop
    gpupool api openapi                                                  print the OpenAPI document

Serving needs the rights the chart grants its ServiceAccount; create-key and revoke-key run with
your own kubeconfig (they create and delete a Secret in the namespace). The namespace defaults to
``POD_NAMESPACE`` (set by the chart).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from gpupool.api import mgmt_keys

log = logging.getLogger("gpupool.api")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--namespace", "-n", default=os.environ.get("POD_NAMESPACE"),
                   help="the namespace of the pools, subscriptions and management keys "
                        "(default: $POD_NAMESPACE)")
    p.add_argument("--kubeconfig", default=None,
                   help="kubeconfig file (default: in-cluster service account, else "
                        "~/.kube/config)")
    p.add_argument("--context", default=None, help="kubeconfig context")


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpupool api",
                                description="Serve the REST API (/api/pools, /api/keys) over "
                                            "the Pools and Subscriptions of one namespace.",
                                epilog="Other commands: gpupool api create-key --customer ID "
                                       "--namespace NS (prints a management key once); "
                                       "gpupool api revoke-key --key-id mkid_... --namespace NS; "
                                       "gpupool api openapi (prints the OpenAPI document).")
    _common(p)
    p.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    p.add_argument("--decision-timeout", type=float, default=20.0,
                   help="seconds subscribe waits for the operator's decision (default 20)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The API client logs response bodies (key Secrets included) at DEBUG: never let it.
    logging.getLogger("kubernetes_asyncio").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


async def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gpupool.api.app import Api
    from gpupool.api.backend import Backend, api_client
    from gpupool.kube import Kube

    backend = Backend(await api_client(args.kubeconfig, args.context), args.namespace,
                      await Kube.connect(args.kubeconfig, args.context))
    api = Api(backend, decision_timeout=args.decision_timeout)
    server = uvicorn.Server(uvicorn.Config(
        api.app(), host=args.host, port=args.port, lifespan="off", loop="none",
        access_log=False, log_config=None, server_header=False))
    log.info("REST API on %s:%d for namespace %s", args.host, args.port, args.namespace)
    try:
        await server.serve()
    finally:
        await backend.close()
    return 0 if server.started else 1


def _key_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"gpupool api {command}")
    _common(p)
    if command == "create-key":
        p.description = ("Create a management key for a customer and print it once (only its "
                         "SHA-256 digest is stored, in a Secret).")
        p.add_argument("--customer", required=True,
                       help="customer id the key acts for (the Stripe customer id, cus_..., "
                            "when billing is on)")
        p.add_argument("--email", default=None, help="customer email for new subscriptions")
    else:
        p.description = "Revoke a management key (delete its Secret)."
        p.add_argument("--key-id", required=True, help="the key's public id, mkid_...")
    return p


async def _create_key(args: argparse.Namespace) -> int:
    from gpupool.kube import Conflict, Kube

    kube = await Kube.connect(args.kubeconfig, args.context)
    try:
        key = mgmt_keys.mint()
        body = mgmt_keys.build_secret(key, namespace=args.namespace, customer_id=args.customer,
                                      email=args.email)
        try:
            await kube.create("secrets", args.namespace, body)
        except Conflict:  # 2^-80: a digest prefix taken already
            print("gpupool api create-key: name clash, run it again", file=sys.stderr)
            return 1
    finally:
        await kube.close()
    key_id = mgmt_keys.key_id_of_digest(mgmt_keys.digest(key))
    print(f"created {key_id} for customer {args.customer} in namespace {args.namespace} "
          f"(Secret {body['metadata']['name']}); the key is shown once:", file=sys.stderr)
    print(key)
    return 0


async def _revoke_key(args: argparse.Namespace) -> int:
    from gpupool.kube import Kube

    if not mgmt_keys.KEY_ID_SHAPE.match(args.key_id):
        print("gpupool api revoke-key: --key-id is mkid_ and 16 hex digits", file=sys.stderr)
        return 2
    kube = await Kube.connect(args.kubeconfig, args.context)
    try:
        selector = f"{mgmt_keys.names.LABEL_KIND}={mgmt_keys.KIND}"
        for secret in await kube.list("secrets", args.namespace, label_selector=selector):
            data = mgmt_keys.decode(secret.get("data"))
            if data.get("keyId") == args.key_id:
                await kube.delete("secrets", args.namespace, secret["metadata"]["name"])
                print(f"revoked {args.key_id}", file=sys.stderr)
                return 0
    finally:
        await kube.close()
    print(f"gpupool api revoke-key: no key {args.key_id} in {args.namespace}", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    if argv and argv[0] == "openapi":
        from gpupool.api.openapi import document

        print(json.dumps(document(), indent=2))
        return 0
    if argv and argv[0] in ("create-key", "revoke-key"):
        args = _key_parser(argv[0]).parse_args(argv[1:])
        runner = _create_key if argv[0] == "create-key" else _revoke_key
    else:
        args = _serve_parser().parse_args(argv[1:] if argv and argv[0] == "serve" else argv)
        runner = _serve
    if not args.namespace:
        print("gpupool api: --namespace is required (or set POD_NAMESPACE)", file=sys.stderr)
        return 2
    _logging(getattr(args, "log_level", "warning"))
    import uvloop

    return uvloop.run(runner(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
