"""status.conditions in the Kubernetes metav1.Condition shape."""

from __future__ import annotations

from datetime import datetime
from typing import Any

Condition = dict[str, Any]


def iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: list[Condition] | None, type_: str, status: bool | str, reason: str,
                  message: str, generation: int | None, now: datetime) -> list[Condition]:
    """Return ``conditions`` with ``type_`` set; lastTransitionTime moves only when status does."""
    status_s = status if isinstance(status, str) else ("True" if status else "False")
    out: list[Condition] = []
    found = False
    for cond in conditions or []:
        if cond.get("type") != type_:
            out.append(cond)
            continue
        found = True
        changed = cond.get("status") != status_s
        out.append({
            "type": type_, "status": status_s, "reason": reason, "message": message,
            "observedGeneration": generation,
            "lastTransitionTime": iso(now) if changed else cond.get("lastTransitionTime", iso(now)),
        })
    if not found:
        out.append({"type": type_, "status": status_s, "reason": reason, "message": message,
                    "observedGeneration": generation, "lastTransitionTime": iso(now)})
    return out


def get_condition(conditions: list[Condition] | None, type_: str) -> Condition | None:
    for cond in conditions or []:
        if cond.get("type") == type_:
            return cond
    return None


def is_true(conditions: list[Condition] | None, type_: str) -> bool:
    cond = get_condition(conditions, type_)
    return bool(cond and cond.get("status") == "True")
