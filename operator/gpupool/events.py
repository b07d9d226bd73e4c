"""Kubernetes Events about gpupool objects (never carrying a key)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from gpupool.blocks import utcnow
from gpupool.conditions import iso
from gpupool.kube import Kube

log = logging.getLogger(__name__)


async def post(kube: Kube, obj: dict[str, Any], reason: str, message: str,
               type_: str = "Normal") -> None:
    meta = obj.get("metadata", {})
    now = iso(utcnow())
    body = {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{meta.get('name')}.{uuid.uuid4().hex[:12]}",
                     "namespace": meta.get("namespace")},
        "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
                           "name": meta.get("name"), "namespace": meta.get("namespace"),
                           "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
        "reason": reason, "message": message, "type": type_,
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        "source": {"component": "gpupool-operator"},
        "reportingComponent": "gpupool-operator",
    }
    try:
        await kube.create("events", meta.get("namespace", "default"), body)
    except Exception as exc:  # an event is best effort; the status carries the truth
        status = getattr(exc, "status", None)
        log.info("event %s for %s not posted: %s%s", reason, meta.get("name"),
                 type(exc).__name__, f" (HTTP {status})" if status else "")
