"""Prometheus metrics of the operator (never a key; key ids and names only)."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from gpupool.blocks import Block

RECONCILES = Counter("gpupool_reconciles_total", "Reconciles by resource and outcome",
                     ["resource", "outcome"])
RECONCILE_SECONDS = Histogram("gpupool_reconcile_seconds", "Reconcile latency", ["resource"])
SEATS = Gauge("gpupool_seats", "Seats per pool and block", ["namespace", "pool", "block", "state"])
KEYS_OPEN = Gauge("gpupool_keys_open", "Open keys per pool", ["namespace", "pool"])
GATE_FLIPS = Counter("gpupool_gate_flips_total", "Keys opened or closed", ["to"])
TRANSITIONS = Counter("gpupool_subscription_transitions_total", "Subscription phase changes",
                      ["phase"])
API_REQUESTS = Counter("gpupool_api_requests_total",
                       "Kubernetes API requests the operator's own client sent (kopf's watches "
                       "and its finalizer/annotation patches are not counted)",
                       ["verb", "resource"])
STRIPE_CALLS = Counter("gpupool_stripe_calls_total", "Stripe calls by operation and outcome",
                       ["operation", "outcome"])


class Metrics:
    def serve(self, port: int) -> None:
        start_http_server(port)

    def reconcile(self, resource: str, outcome: str, seconds: float) -> None:
        RECONCILES.labels(resource, outcome).inc()
        RECONCILE_SECONDS.labels(resource).observe(seconds)

    def seats(self, namespace: str, pool: str, reserved: Mapping[Block, int],
              capacity: Mapping[Block, int]) -> None:
        for block, cap in capacity.items():
            SEATS.labels(namespace, pool, block.value, "capacity").set(cap)
            SEATS.labels(namespace, pool, block.value, "reserved").set(reserved.get(block, 0))

    def keys_open(self, pool: tuple[str, str], count: int) -> None:
        KEYS_OPEN.labels(pool[0], pool[1]).set(count)

    def gate_flip(self, to: str) -> None:
        GATE_FLIPS.labels(to).inc()

    def transition(self, phase: str) -> None:
        TRANSITIONS.labels(phase).inc()

    def stripe_call(self, operation: str, outcome: str) -> None:
        STRIPE_CALLS.labels(operation, outcome).inc()
