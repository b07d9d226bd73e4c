"""Building, applying and reading gpupool objects in tests (sync kubernetes client)."""

from __future__ import annotations

import base64
import copy
import subprocess
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from support.waiting import wait_for

GROUP, VERSION = "gpupool.dev", "v1alpha1"
Obj = dict[str, Any]


def pool_body(name: str, **spec: Any) -> Obj:
    base: Obj = {
        "model": {"id": "org/tiny-model", "displayName": "Tiny"},
        "seats": 10,
        "blocks": {"asia": {"price": "27.00"}, "europe": {"price": "39.00"},
                   "americas": {"price": "39.00"}},
        "published": True,
        "activationThreshold": 0,
    }
    base.update(spec)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Pool", "metadata": {"name": name},
            "spec": base}


def sub_body(name: str, pool: str, blocks: list[str] | None = None, quantity: int = 1,
             **spec: Any) -> Obj:
    body: Obj = {"poolRef": {"name": pool}, "customer": {"id": f"cus_{name}"},
                 "blocks": blocks or ["europe"], "quantity": quantity}
    body.update(spec)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Subscription",
            "metadata": {"name": name}, "spec": body}


class Objects:
    """CRUD for pools and subscriptions in one namespace."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.api = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.ns = namespace

    def create(self, body: Obj) -> Obj:
        plural = "pools" if body["kind"] == "Pool" else "subscriptions"
        result: Obj = self.api.create_namespaced_custom_object(
            GROUP, VERSION, self.ns, plural, copy.deepcopy(body))
        return result

    def get(self, plural: str, name: str) -> Obj | None:
        try:
            result: Obj = self.api.get_namespaced_custom_object(GROUP, VERSION, self.ns, plural,
                                                                name)
            return result
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def pool(self, name: str) -> Obj:
        obj = self.get("pools", name)
        assert obj is not None, f"pool {name} missing"
        return obj

    def sub(self, name: str) -> Obj:
        obj = self.get("subscriptions", name)
        assert obj is not None, f"subscription {name} missing"
        return obj

    def list_subs(self) -> list[Obj]:
        items: list[Obj] = self.api.list_namespaced_custom_object(
            GROUP, VERSION, self.ns, "subscriptions")["items"]
        return items

    def patch(self, plural: str, name: str, body: Obj) -> Obj:
        result: Obj = self.api.patch_namespaced_custom_object(GROUP, VERSION, self.ns, plural,
                                                              name, body)
        return result

    def patch_status(self, plural: str, name: str, status: Obj) -> Obj:
        result: Obj = self.api.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.ns, plural, name, {"status": status})
        return result

    def delete(self, plural: str, name: str) -> None:
        try:
            self.api.delete_namespaced_custom_object(GROUP, VERSION, self.ns, plural, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def phase(self, plural: str, name: str) -> str | None:
        obj = self.get(plural, name)
        return ((obj or {}).get("status") or {}).get("phase")

    def wait_phase(self, plural: str, name: str, phase: str, timeout: float = 30) -> Obj:
        def reached() -> Obj | None:
            obj = self.get(plural, name)
            return obj if ((obj or {}).get("status") or {}).get("phase") == phase else None
        return wait_for(reached, timeout=timeout, message=lambda: (
            f"{plural}/{name} phase {phase} (now {self.phase(plural, name)}; "
            f"status {((self.get(plural, name) or {}).get('status') or {}).get('conditions')})"))

    def _secret(self, name: str) -> Any:
        try:
            return self.core.read_namespaced_secret(name, self.ns)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def secret_data(self, name: str) -> dict[str, str] | None:
        """A Secret's data, decoded. Callers must never print the apiKey."""
        sec = self._secret(name)
        if sec is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (sec.data or {}).items()}

    def secret_labels(self, name: str) -> dict[str, str] | None:
        sec = self._secret(name)
        return None if sec is None else dict(sec.metadata.labels or {})

    def events(self, name: str) -> list[Any]:
        return [e for e in self.core.list_namespaced_event(self.ns).items
                if e.involved_object.name == name]


def condition(obj: Obj, type_: str) -> Obj | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def kubectl(kubeconfig: str, *args: str, input: str | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", "--kubeconfig", kubeconfig, *args], input=input,
                          capture_output=True, text=True, check=check, timeout=120)
