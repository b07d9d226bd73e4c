"""``gpupool api``: the seeds' REST API (``/api/pools``, ``/api/keys``) over the CRs.

An optional component. It serves the Pools of one namespace, creates and patches Subscriptions
there for the customers its management keys name, and reads the key Secrets the operator mints.
It holds no state of its own: every answer is read from the API server.

Modules:

- ``mgmt_keys``: management keys (``mk_...``), stored hashed in Secrets; the customer each names.
- ``views``: pure translation of Pools, Subscriptions and key Secrets into the seeds' JSON.
- ``schemas`` / ``openapi``: the request and response shapes and the OpenAPI document.
- ``backend``: the Kubernetes reads and writes (``kubernetes_asyncio``).
- ``app``: the Starlette application; ``cli``: ``gpupool api ...``.

Choices where the seeds leave room are listed in ``app``'s docstring (also in the README).
"""

from __future__ import annotations
