"""Prometheus metrics of the gateway, labelled by namespace, pool and key id (never the key).

=============================================  =========  ======================================
metric                                         type       labels
=============================================  =========  ======================================
``gpupool_gateway_requests_total``             counter    namespace, pool, key_id, route, status
``gpupool_gateway_refusals_total``             counter    namespace, pool, key_id, reason
``gpupool_gateway_tokens_total``               counter    namespace, pool, key_id, kind
                                                          (prompt | completion | unsettled)
``gpupool_gateway_inflight_requests``          gauge      namespace, pool, key_id
``gpupool_gateway_upstream_seconds``           histogram  namespace, pool (time to response
                                                          headers from vLLM)
``gpupool_gateway_keys``                       gauge      (api keys loaded)
``gpupool_gateway_ready``                      gauge      (1 once the key list is loaded)
=============================================  =========  ======================================

Requests with no or an unknown key are counted with ``key_id="unknown"`` and an empty pool.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("gpupool_gateway_requests_total",
                                "Requests answered by the gateway",
                                ["namespace", "pool", "key_id", "route", "status"], registry=r)
        self.refusals = Counter("gpupool_gateway_refusals_total",
                                "Requests refused by the gateway, by reason",
                                ["namespace", "pool", "key_id", "reason"], registry=r)
        self.tokens = Counter("gpupool_gateway_tokens_total",
                              "Tokens used, from the upstream's usage (unsettled: reservations "
                              "kept because a response ended without usage)",
                              ["namespace", "pool", "key_id", "kind"], registry=r)
        self.inflight = Gauge("gpupool_gateway_inflight_requests",
                              "Requests being proxied now", ["namespace", "pool", "key_id"],
                              registry=r)
        self.upstream_seconds = Histogram(
            "gpupool_gateway_upstream_seconds", "Time to the upstream's response headers",
            ["namespace", "pool"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.keys = Gauge("gpupool_gateway_keys", "API keys loaded", registry=r)
        self.ready = Gauge("gpupool_gateway_ready", "1 once the initial key list is loaded",
                           registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
