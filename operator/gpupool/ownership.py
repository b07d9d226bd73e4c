"""Which existing objects are whose: owner references and gpupool's labels. No API calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpupool import API_VERSION, names

Obj = dict[str, Any]


@dataclass(frozen=True)
class Owner:
    """A gpupool object as the parent of children: its kind, name, and the label that names it."""

    kind: str
    name: str
    label: str

    @classmethod
    def pool(cls, name: str) -> Owner:
        return cls("Pool", name, names.LABEL_POOL)

    @classmethod
    def subscription(cls, name: str) -> Owner:
        return cls("Subscription", name, names.LABEL_SUBSCRIPTION)


class NotOurs(Exception):
    """An object exists under the name of a child the operator would make, and is not that
    child (:func:`is_child`): it is left as it is."""

    def __init__(self, kind: str, namespace: str, name: str, owner: Owner) -> None:
        super().__init__(f"{kind} {namespace}/{name} exists and was not made for this "
                         f"{owner.kind}; rename or delete it")


def owner_ref(obj: Obj, kind: str) -> Obj | None:
    """``obj``'s owner reference to a gpupool object of ``kind``, if it has one."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == kind and ref.get("apiVersion") == API_VERSION:
            return dict(ref)
    return None


def is_child(obj: Obj, owner: Owner) -> bool:
    """Whether ``obj`` is (or may become) a child of ``owner``.

    Its owner reference says so (an earlier object of that name counts: its child is taken
    over); or it has no controller at all and gpupool's labels name that owner, as a child
    left by ``kubectl delete --cascade=orphan`` does: it is adopted, as Kubernetes' own
    controllers adopt theirs. Anything else is someone else's."""
    ref = owner_ref(obj, owner.kind)
    if ref is not None:
        return ref.get("name") == owner.name
    meta = obj.get("metadata") or {}
    if any(r.get("controller") for r in meta.get("ownerReferences") or []):
        return False
    labels = meta.get("labels") or {}
    return all(labels.get(k) == v for k, v in names.MANAGED_BY.items()) \
        and labels.get(owner.label) == owner.name
