"""The gpupool gateway: the data plane in front of each pool's vLLM.

Bearer key → key Secret (watched through the Kubernetes API, held as a SHA-256 digest) → gate
(subscription and pool phase, the key's UTC blocks against the gateway's own clock) → per-key
limits (RPM, TPM, concurrency; exact, shared through Redis across replicas) → the pool's vLLM,
with the pool's internal key, streaming.

Modules: :mod:`~gpupool.gateway.app` (the ASGI app and the block-end policy),
:mod:`~gpupool.gateway.keys` (records, store, key sources), :mod:`~gpupool.gateway.kube` (the
Secret watch), :mod:`~gpupool.gateway.gate` (refusals), :mod:`~gpupool.gateway.limits`
(limiters), :mod:`~gpupool.gateway.routes` (allowlist, rewrite, token reservation),
:mod:`~gpupool.gateway.usage` (usage from responses and streams),
:mod:`~gpupool.gateway.errors` (error bodies), :mod:`~gpupool.gateway.metrics`,
:mod:`~gpupool.gateway.cli` (``main(argv)``).
"""
