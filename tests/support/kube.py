"""Small helpers for tests that talk to the local control plane with the sync client."""

from __future__ import annotations

import re
import secrets
from typing import Any

from gpupool.devcluster import RawApi, pod_is_ready, service_account_token
from support.waiting import wait_for

__all__ = ["RawApi", "create_namespace", "pod_is_ready", "raw", "service_account_token",
           "unique_name", "wait_for_default_service_account"]


def raw(api_client: Any) -> RawApi:
    """Plain-JSON requests (``raw(kube).get("/api/v1/pods")``) next to the typed APIs."""
    return RawApi(api_client)


def unique_name(hint: str, max_len: int = 40) -> str:
    """A DNS-1123 label from ``hint`` plus a random suffix."""
    base = re.sub(r"[^a-z0-9-]+", "-", hint.lower()).strip("-")[: max_len - 6].strip("-")
    return f"{base or 'x'}-{secrets.token_hex(2)}"


def wait_for_default_service_account(api_client: Any, namespace: str,
                                     timeout: float = 30.0) -> None:
    """Wait until ``default`` in ``namespace`` has its token Secret.

    Until then the ServiceAccount admission plugin rejects pods in the namespace (1.20 mounts the
    token Secret into every pod), so create pods directly only after this.
    """
    api = raw(api_client)

    def has_token() -> bool:
        sa = api.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default")
        return bool(sa.get("secrets"))

    wait_for(has_token, timeout, message=f"default ServiceAccount token in {namespace}",
             ignore=(Exception,))


def create_namespace(api_client: Any, name: str, labels: dict[str, str] | None = None,
                     wait_ready: bool = True) -> str:
    raw(api_client).request("POST", "/api/v1/namespaces", body={
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels or {}}})
    if wait_ready:
        wait_for_default_service_account(api_client, name)
    return name
