"""The ``gpupool`` command: ``gpupool operator``, ``gpupool gateway``, ..."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _operator(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpupool operator",
                                     description="Run the gpupool Kubernetes operator.")
    parser.add_argument("--namespace", "-n", action="append", default=[],
                        help="namespace to watch (repeatable); default: all namespaces")
    parser.add_argument("--liveness", default=None,
                        help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--admission-port", type=int,
                        default=int(os.environ.get("GPUPOOL_ADMISSION_PORT") or 0),
                        help="serve the validating admission webhooks over HTTPS on this port "
                             "(env GPUPOOL_ADMISSION_PORT; 0 = off; the other GPUPOOL_ADMISSION_* "
                             "settings are described in gpupool.admission)")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)

    # kopf accepts objects of the kubernetes, kubernetes_asyncio and pykube client libraries
    # when they are importable, and importing them costs about 50 MB of the operator's memory.
    # The operator hands kopf plain dicts and talks to the API server itself (gpupool.kube).
    for library in ("kubernetes", "kubernetes_asyncio", "pykube"):
        sys.modules.setdefault(library, None)  # type: ignore[arg-type]
    import kopf

    import gpupool.handlers  # noqa: F401 - registers the handlers
    from gpupool import admission

    if args.admission_port:
        admission.register(admission.AdmissionOptions.from_env(args.admission_port,
                                                               args.namespace))

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Only gpupool's own loggers ever go to DEBUG: kopf logs whole object bodies there.
    logging.getLogger("gpupool").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # kopf logs every watch-handler call at INFO; the operator logs its own decisions.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(standalone=True, clusterwide=not args.namespace, namespaces=list(args.namespace),
             liveness_endpoint=args.liveness)
    return 0


def _gateway(argv: list[str]) -> int:
    from gpupool.gateway.cli import main as gateway_main

    return gateway_main(argv)


def _api(argv: list[str]) -> int:
    from gpupool.api.cli import main as api_main

    return api_main(argv)


COMMANDS = {"operator": _operator, "gateway": _gateway, "api": _api}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: gpupool {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
