"""Validating admission webhooks: ``kubectl apply`` gets the operator's answer at apply time.

The reconciles stay the authority. Everything refused here is also caught by them, as a condition
on the object (``InvalidSpec``, ``PoolNotFound``, ``PoolNotPublished``, ``SpecLocked``,
``OwnedArgs``...), and nothing here is needed for the seat ledger to stay right: the ledger is
written only by the Pool's reconcile, with the Pool's resourceVersion as a precondition. The
webhook only turns a mistake into an immediate, readable refusal naming the field and saying what
would be accepted.

Served by kopf's ``WebhookServer`` over HTTPS when ``GPUPOOL_ADMISSION_PORT`` is set (off
otherwise). The ValidatingWebhookConfiguration is rendered by the chart
(``templates/admission.yaml``: rules, failure policy, namespace selector, where the API server
calls); the operator keeps its ``caBundle`` in step with the certificate it serves (a self-signed
CA and certificate it makes at each start, or a certificate from files). So the operator needs
``get`` and ``patch`` on that one configuration only, not the right to create webhook
configurations, and the chart (or ``kubectl delete -k``) removes it with the rest of the release.

Failure policy: ``Ignore`` (the chart's default). With the operator stopped or unreachable, Pools
and Subscriptions are admitted as if there were no webhook and the reconcile refuses the bad ones
with conditions once it runs; an operator restart (``Recreate`` strategy, one replica) never
blocks a customer's checkout. The handlers themselves fail open too: when a check cannot be made
(the Pool cannot be read, say) the request is allowed with a warning, never refused. An update is
refused only for what it brings: a problem the stored object already had (from before the webhook,
or while it was down) is the reconcile's to report, and never blocks pausing a Pool or canceling a
Subscription. Updates touching only metadata, and deletions, are not judged.

Environment (``gpupool operator``):

- ``GPUPOOL_ADMISSION_PORT`` (or ``--admission-port``): HTTPS port; unset or 0 = no webhooks.
- ``GPUPOOL_ADMISSION_ADDR``: address to listen on (default ``0.0.0.0``).
- ``GPUPOOL_ADMISSION_CONFIGURATION``: the ValidatingWebhookConfiguration whose ``caBundle`` the
  operator keeps (default ``gpupool.dev``; empty = leave it to someone else).
- ``GPUPOOL_ADMISSION_SERVICE``: ``namespace/name`` of the Service in front of the port: the
  self-signed certificate covers its DNS names (it always covers localhost and 127.0.0.1).
- ``GPUPOOL_ADMISSION_CERT_DIR``: a directory with ``tls.crt``, ``tls.key`` and optionally
  ``ca.crt`` (a mounted kubernetes.io/tls Secret, e.g. from cert-manager) instead of the
  self-signed certificate; re-read when the files change.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import kopf

# kopf's own matcher, so the webhooks judge exactly the namespaces the operator serves.
from kopf._cogs.structs.references import NamespaceName, match_namespace
from pydantic import ValidationError

from gpupool import GROUP, VERSION, workload
from gpupool.blocks import BLOCK_ORDER, Block, normalize_blocks
from gpupool.kube import Kube
from gpupool.ledger import parse_ledger
from gpupool.models import (
    PoolSpec,
    SubscriptionSpec,
    describe_validation_error,
    parse_pool_spec,
    parse_subscription_spec,
)

log = logging.getLogger(__name__)
Obj = dict[str, Any]

ENV_PORT = "GPUPOOL_ADMISSION_PORT"
ENV_ADDR = "GPUPOOL_ADMISSION_ADDR"
ENV_CONFIGURATION = "GPUPOOL_ADMISSION_CONFIGURATION"
ENV_SERVICE = "GPUPOOL_ADMISSION_SERVICE"
ENV_CERT_DIR = "GPUPOOL_ADMISSION_CERT_DIR"
DEFAULT_CONFIGURATION = "gpupool.dev"

# The handler ids are the URL paths the webhook configuration calls (``/pools``,
# ``/subscriptions``): kopf runs only the handler a path names.
POOLS_ID = "pools"
SUBSCRIPTIONS_ID = "subscriptions"
VWC_PATH = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
STRATEGIC = "application/strategic-merge-patch+json"
# How often the caBundle is re-checked once right (a re-applied configuration loses nothing with a
# 3-way merge, but a replaced one would), and the back-off while it cannot be written.
RECHECK_SECONDS = 60.0
RETRY_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)

# Where the value of each operator-owned vLLM flag comes from, for the refusal message.
OWNED_ARG_SOURCES: dict[str, str] = {
    "--model": "spec.model.id",
    "--served-model-name": "spec.model.id",
    "--port": "spec.runtime.port",
    "--host": "the operator (0.0.0.0)",
    "--api-key": "the operator (the key only the gateway holds)",
    "--tensor-parallel-size": "spec.runtime.gpusPerReplica",
    "-tp": "spec.runtime.gpusPerReplica",
}
OWNED_ENV_SOURCES: dict[str, str] = {
    workload.API_KEY_ENV: "the operator (the key only the gateway holds)",
}


# -- options --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdmissionOptions:
    port: int
    addr: str = "0.0.0.0"
    configuration: str = DEFAULT_CONFIGURATION
    service: tuple[str, str] | None = None
    """(namespace, name) of the Service the API server calls."""
    cert_dir: Path | None = None
    namespaces: tuple[str, ...] = ()
    """The operator's namespace patterns (kopf syntax); () = every namespace."""

    @classmethod
    def from_env(cls, port: int, namespaces: list[str] | tuple[str, ...] = (),
                 env: Mapping[str, str] | None = None) -> AdmissionOptions:
        env = os.environ if env is None else env
        service = None
        if env.get(ENV_SERVICE):
            ns, _, name = env[ENV_SERVICE].partition("/")
            if not ns or not name:
                raise ValueError(f"{ENV_SERVICE} must be namespace/name, not "
                                 f"{env[ENV_SERVICE]!r}")
            service = (ns, name)
        cert_dir = Path(env[ENV_CERT_DIR]) if env.get(ENV_CERT_DIR) else None
        return cls(port=port, addr=env.get(ENV_ADDR) or "0.0.0.0",
                   configuration=env.get(ENV_CONFIGURATION, DEFAULT_CONFIGURATION),
                   service=service, cert_dir=cert_dir, namespaces=tuple(namespaces))

    def serves(self, namespace: str | None) -> bool:
        """Whether objects in ``namespace`` are this operator's to judge."""
        if not self.namespaces:
            return True
        return namespace is not None and any(match_namespace(NamespaceName(namespace), p)
                                             for p in self.namespaces)

    def hostnames(self) -> list[str]:
        """What the self-signed certificate covers (DNS names and IP addresses)."""
        names = ["localhost", "127.0.0.1", "::1"]
        if self.service:
            ns, name = self.service
            names += [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
        with contextlib.suppress(ValueError):
            if not ipaddress.ip_address(self.addr).is_unspecified:
                names.append(self.addr)
        return list(dict.fromkeys(names))


# -- the checks (pure) ----------------------------------------------------------------------


def _money_problem(path: str, value: Any, what: str) -> str | None:
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        amount = None
    if amount is None or not amount.is_finite():
        return (f"{path}: {value!r} is not an amount; write the {what} in USD as a quoted "
                f'string with at most two decimals, e.g. "39.00"')
    if amount < 0:
        return (f"{path}: {value} is negative; a {what} is 0 or more (USD, at most two "
                f'decimals, e.g. "39.00")')
    if amount != amount.quantize(Decimal("0.01")):
        return f"{path}: {value} has more than two decimals; round it to the cent"
    return None


def money_problems(spec: Mapping[str, Any]) -> list[str]:
    """Readable refusals for a negative or malformed price or reservation fee, and a discount
    outside [0, 1). The CRD's patterns refuse the same values where its schema is installed."""
    problems: list[str] = []
    blocks = spec.get("blocks")
    if isinstance(blocks, Mapping):
        for block, offer in blocks.items():
            if isinstance(offer, Mapping) and "price" in offer:
                p = _money_problem(f"spec.blocks.{block}.price", offer["price"],
                                   "block's monthly seat price")
                if p:
                    problems.append(p)
    if "reservationFee" in spec:
        p = _money_problem("spec.reservationFee", spec["reservationFee"], "reservation fee")
        if p:
            problems.append(p)
    if "annualDiscount" in spec:
        raw = spec["annualDiscount"]
        accepted = 'use a fraction from 0 up to 0.9999 ("0.15" = 15% off the yearly price)'
        try:
            discount: Decimal | None = Decimal(str(raw))
        except InvalidOperation:
            discount = None
        if discount is None or not discount.is_finite():
            problems.append(f"spec.annualDiscount: {raw!r} is not a number; {accepted}")
        elif discount < 0:
            problems.append(f"spec.annualDiscount: {raw} is negative; {accepted}")
        elif discount >= 1:
            problems.append(f"spec.annualDiscount: {raw} would make a yearly subscription free "
                            f"or pay the customer; {accepted}")
    return problems


def _owned_source(flag: str) -> str:
    name = _flag(flag)
    if name in OWNED_ARG_SOURCES:
        return OWNED_ARG_SOURCES[name]
    full = [o for o in OWNED_ARG_SOURCES if o.startswith("--") and o.startswith(name)]
    return OWNED_ARG_SOURCES[full[0]] if len(full) == 1 else "the operator"


def owned_problems(spec: PoolSpec) -> list[str]:
    problems = []
    args = workload.check_extra_args(spec.runtime.extra_args)
    if args:
        sources = "; ".join(f"{a} comes from {_owned_source(a)}" for a in args)
        problems.append(f"spec.runtime.extraArgs: {', '.join(args)} "
                        f"{'is' if len(args) == 1 else 'are'} set by the operator; remove "
                        f"{'it' if len(args) == 1 else 'them'} ({sources})")
    env = workload.check_env(spec.runtime.env)
    if env:
        sources = "; ".join(f"{e} comes from {OWNED_ENV_SOURCES.get(e, 'the operator')}"
                            for e in env)
        problems.append(f"spec.runtime.env: {', '.join(env)} "
                        f"{'is' if len(env) == 1 else 'are'} set by the operator; remove "
                        f"{'it' if len(env) == 1 else 'them'} ({sources})")
    return problems


def held_seats(pool: Mapping[str, Any]) -> dict[Block, tuple[int, list[str]]]:
    """Seats held per block (count, holders), from the Pool's ledger and its per-block
    ``reserved`` counts, whichever is larger."""
    status = pool.get("status") or {}
    holders: dict[Block, list[str]] = {b: [] for b in BLOCK_ORDER}
    counts: dict[Block, int] = dict.fromkeys(BLOCK_ORDER, 0)
    for name, (_, holding) in sorted(parse_ledger(status.get("ledger")).items()):
        for block, seats in holding.items():
            if seats:
                holders[block].append(name)
                counts[block] += len(seats)
    seats_status = status.get("seats") or {}
    for block in BLOCK_ORDER:
        entry = seats_status.get(block.value) if isinstance(seats_status, Mapping) else None
        if isinstance(entry, Mapping):
            with contextlib.suppress(TypeError, ValueError):
                counts[block] = max(counts[block], int(entry.get("reserved") or 0))
    return {b: (counts[b], holders[b]) for b in BLOCK_ORDER if counts[b]}


def _who(holders: list[str]) -> str:
    if not holders:
        return "subscriptions"
    shown = ", ".join(holders[:5])
    more = len(holders) - 5
    return f"subscription(s) {shown}" + (f" and {more} more" if more > 0 else "")


def seat_cut_problems(spec: PoolSpec, old_pool: Mapping[str, Any],
                      old_capacity: Mapping[Block, int] | None = None) -> list[str]:
    """A new spec may not take a block away from its holders nor give it fewer seats than held:
    seats are never taken back from a subscription holding them. With ``old_capacity`` (the
    spec being replaced), only a change that cuts is refused: a block already below its holders
    (cut while the webhook was down) does not stop an unrelated edit, such as pausing."""
    problems = []
    capacity = spec.capacity()
    offered = spec.blocks.offered()
    before = old_capacity or {}
    for block, (count, holders) in held_seats(old_pool).items():
        if block not in capacity:
            if old_capacity is not None and block not in before:
                continue
            problems.append(
                f"spec.blocks.{block.value}: {count} seat(s) in {block.value} are held by "
                f"{_who(holders)}; keep offering {block.value} (a block cannot be removed while "
                "subscriptions hold seats in it; cancel them first)")
        elif capacity[block] < count:
            if old_capacity is not None and block in before and capacity[block] >= before[block]:
                continue
            path = (f"spec.blocks.{block.value}.seats" if offered[block].seats is not None
                    else "spec.seats")
            problems.append(
                f"{path}: would leave {block.value} {capacity[block]} seat(s), but {count} are "
                f"held by {_who(holders)}; use {count} or more")
    return problems


def _spec_problems(spec: Mapping[str, Any]) -> tuple[list[str], set[str], PoolSpec | None]:
    """(messages, keys, parsed spec): what is wrong with a Pool spec on its own. A key per
    problem (an owned flag or variable name, else the message) tells an update that brings a new
    problem from one that only keeps, or lessens, an old one."""
    problems = money_problems(spec)
    if problems:
        return problems, set(problems), None
    try:
        parsed = parse_pool_spec(dict(spec))
    except (ValidationError, ValueError) as exc:
        message = describe_validation_error(exc)
        return [message], {message}, None
    keys = {f"arg {_flag(a)}" for a in workload.check_extra_args(parsed.runtime.extra_args)}
    keys |= {f"env {e}" for e in workload.check_env(parsed.runtime.env)}
    return owned_problems(parsed), keys, parsed


def _flag(arg: str) -> str:
    return "--" + arg[2:].replace("_", "-") if arg.startswith("--") else arg


def check_pool(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> list[str]:
    """Why a Pool create (``old`` None) or update must be refused; [] to admit it.

    An update is refused for what it brings: a problem the stored spec already had (from before
    the webhook, or while it was down) is the reconcile's to report, and does not block an
    unrelated edit (pausing the pool, say) nor a partial fix."""
    spec = new.get("spec") or {}
    if old is None:
        return _spec_problems(spec)[0]
    old_spec = old.get("spec") or {}
    if old_spec == spec:
        return []  # metadata only (kopf's finalizers and annotations, labels): not ours to judge
    problems, keys, parsed = _spec_problems(spec)
    _, old_keys, old_parsed = _spec_problems(old_spec)
    if not keys <= old_keys:
        return problems
    if parsed is None:
        return []
    return seat_cut_problems(parsed, old,
                             old_parsed.capacity() if old_parsed is not None else None)


def held_terms(sub: Mapping[str, Any]) -> tuple[str, tuple[Block, ...], int | None] | None:
    """(pool, blocks, quantity) a Subscription holds seats with, or None when it holds none
    (the same fields ``subscription_service._held_terms`` keeps in force)."""
    status = sub.get("status") or {}
    pool, blocks = status.get("pool"), status.get("heldBlocks")
    if not pool or not blocks:
        return None
    try:
        held_blocks = normalize_blocks(blocks)
    except ValueError:
        return None
    qty = status.get("heldQuantity")
    return str(pool), held_blocks, int(qty) if qty is not None else None


def locked_problems(spec: SubscriptionSpec, namespace: str,
                    old: Mapping[str, Any]) -> list[str]:
    """Changes to a Subscription's pool, blocks or quantity once it holds seats. Only what this
    update changes is refused: a spec that already differed from the held terms (changed while
    the webhook was down; the reconcile's SpecLocked condition says so) may still be canceled."""
    held = held_terms(old)
    if held is None:
        return []
    pool, blocks, qty = held
    try:
        before: SubscriptionSpec | None = parse_subscription_spec(dict(old.get("spec") or {}))
    except (ValidationError, ValueError):
        before = None

    def changed(value: Any, of: Any) -> bool:
        return before is None or of(before) != value

    def pool_of(s: SubscriptionSpec) -> tuple[str, str]:
        return s.pool_ref.name, s.pool_ref.namespace or namespace

    def blocks_of(s: SubscriptionSpec) -> set[Block]:
        return set(s.normalized_blocks())

    how = ("to change it, cancel this subscription (spec.cancelAtPeriodEnd: true) and "
           "subscribe again")
    problems = []
    if pool_of(spec) != (pool, namespace) and changed(pool_of(spec), pool_of):
        problems.append(f"spec.poolRef: the subscription holds seats in pool {pool}; keep "
                        f"spec.poolRef.name {pool} in namespace {namespace}; {how}")
    if blocks_of(spec) != set(blocks) and changed(blocks_of(spec), blocks_of):
        problems.append(f"spec.blocks: the subscription holds seats in "
                        f"{', '.join(b.value for b in blocks)}; keep spec.blocks "
                        f"[{', '.join(b.value for b in blocks)}]; {how}")
    if (qty is not None and spec.quantity != qty
            and changed(spec.quantity, lambda s: s.quantity)):
        problems.append(f"spec.quantity: the subscription holds {qty} seat(s) per block; keep "
                        f"spec.quantity {qty}; {how}")
    return problems


def pool_ref_problems(spec: SubscriptionSpec, namespace: str, pool: Mapping[str, Any] | None,
                      published: list[str]) -> list[str]:
    """A Subscription must name a published Pool in its own namespace that sells its blocks.
    ``published``: the names of the namespace's published Pools, for the message."""
    ref_ns = spec.pool_ref.namespace
    name = spec.pool_ref.name
    choose = (f"published pools in {namespace}: {', '.join(published[:10])}" if published
              else f"no pool in {namespace} is published yet")
    if ref_ns and ref_ns != namespace:
        return [f"spec.poolRef.namespace: pool {ref_ns}/{name} is in another namespace; a "
                f"Subscription may only use a Pool in its own namespace: leave "
                f"spec.poolRef.namespace unset or set it to {namespace} ({choose})"]
    if pool is None:
        return [f"spec.poolRef.name: pool {name} does not exist in namespace {namespace}; "
                f"create the Pool first or name an existing one ({choose})"]
    try:
        pool_spec = parse_pool_spec(dict(pool.get("spec") or {}))
    except (ValidationError, ValueError):
        return []  # the Pool's own problem; its Ready condition says why
    if not pool_spec.published:
        return [f"spec.poolRef.name: pool {name} is not published (draft); publish it "
                f"(spec.published: true on the Pool) or name a published one ({choose})"]
    offered = pool_spec.capacity()
    missing = [b.value for b in spec.normalized_blocks() if b not in offered]
    if missing:
        return [f"spec.blocks: pool {name} does not sell {', '.join(missing)}; choose from "
                f"{', '.join(b.value for b in BLOCK_ORDER if b in offered)}"]
    return []


# -- the handlers ---------------------------------------------------------------------------


@dataclass
class _State:
    options: AdmissionOptions
    kube: Kube | None = None
    server: CaBundleKeeper | None = None
    tmpdir: Path | None = None


_state: _State | None = None


def _refuse(problems: list[str], kind: str, meta: Mapping[str, Any]) -> None:
    if problems:
        message = "; ".join(problems)
        log.info("admission: refused %s %s/%s: %s", kind, meta.get("namespace"),
                 meta.get("name") or meta.get("generateName"), message)
        raise kopf.AdmissionError(message, code=422)


class _QuietRefusals(logging.Filter):
    """kopf logs every refusal as an ERROR ("Webhook 'pools' failed permanently: ..."): a
    customer's mistake, not the operator's. ``_refuse`` logs it at INFO instead."""

    PREFIXES = tuple(f"Webhook '{id_}' failed permanently:" for id_ in (POOLS_ID,
                                                                        SUBSCRIPTIONS_ID))

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIXES))


def _as_dict(obj: Any) -> Obj:
    return dict(obj) if obj is not None else {}


async def validate_pool(*, body: kopf.Body, warnings: list[str],
                        old: kopf.Body | None = None, operation: str | None = None,
                        **_: Any) -> None:
    state = _state
    meta = body.get("metadata") or {}
    if state is None or not state.options.serves(meta.get("namespace")):
        return
    if operation not in ("CREATE", "UPDATE") or meta.get("deletionTimestamp"):
        return
    try:
        problems = check_pool(_as_dict(body), _as_dict(old) if old is not None else None)
    except Exception as exc:  # never refuse for a reason of our own
        log.exception("admission: could not check pool %s", meta.get("name"))
        warnings.append(f"gpupool could not check this Pool ({type(exc).__name__}); the "
                        "operator's reconcile will")
        return
    _refuse(problems, "Pool", meta)


async def validate_subscription(*, body: kopf.Body, warnings: list[str],
                                old: kopf.Body | None = None, operation: str | None = None,
                                **_: Any) -> None:
    state = _state
    meta = body.get("metadata") or {}
    ns = meta.get("namespace")
    if state is None or not ns or not state.options.serves(ns):
        return
    if operation not in ("CREATE", "UPDATE") or meta.get("deletionTimestamp"):
        return
    spec_raw = _as_dict(body.get("spec"))
    old_body = _as_dict(old) if old is not None else None
    if old_body is not None and _as_dict(old_body.get("spec")) == spec_raw:
        return  # metadata only
    try:
        spec = parse_subscription_spec(spec_raw)
    except (ValidationError, ValueError) as exc:
        _refuse([describe_validation_error(exc)], "Subscription", meta)
        return
    try:
        if old_body is not None:
            _refuse(locked_problems(spec, ns, old_body), "Subscription", meta)
            if held_terms(old_body) is not None:
                return  # holding seats, terms unchanged: only cancelAtPeriodEnd and the like
            old_spec = _as_dict(old_body.get("spec"))
            if (old_spec.get("poolRef") == spec_raw.get("poolRef")
                    and old_spec.get("blocks") == spec_raw.get("blocks")):
                return  # what was checked at creation is unchanged
        assert state.kube is not None
        pool = None
        ref_ns = spec.pool_ref.namespace
        if not ref_ns or ref_ns == ns:
            pool = await state.kube.get_custom("pools", ns, spec.pool_ref.name)
        published: list[str] = []
        if pool is None or not (pool.get("spec") or {}).get("published"):
            pools = await state.kube.list_custom("pools", ns)
            published = sorted(p["metadata"]["name"] for p in pools
                               if (p.get("spec") or {}).get("published") is True)
        problems = pool_ref_problems(spec, ns, pool, published)
    except kopf.AdmissionError:
        raise
    except Exception as exc:  # never refuse for a reason of our own
        log.exception("admission: could not check subscription %s/%s", ns, meta.get("name"))
        warnings.append(f"gpupool could not check this Subscription ({type(exc).__name__}); "
                        "the operator's reconcile will")
        return
    _refuse(problems, "Subscription", meta)


# -- TLS and the caBundle -------------------------------------------------------------------


def make_self_signed(hostnames: list[str], days: int = 365) -> tuple[bytes, bytes, bytes]:
    """A CA and a server certificate it signs, for ``hostnames`` (DNS names and IPs).
    Returns (ca.crt, tls.crt, tls.key) as PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpupool admission CA")])
    ca = (x509.CertificateBuilder()
          .subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    sans: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    cn = next((h for h in hostnames if not _is_ip(h)), hostnames[0])
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class CaBundleKeeper:
    """kopf's ``WebhookServer``, plus keeping the webhook configuration's ``caBundle`` equal to
    the CA of the certificate it serves, whenever the server (re)starts with a certificate and
    every RECHECK_SECONDS after that.

    It is what ``settings.admission.server`` holds: kopf iterates it for client configs; the
    configuration itself is not kopf-managed (``settings.admission.managed`` stays None), since
    kopf would write one cluster-wide, without the chart's namespace selector, failure policy
    and Service reference.
    """

    def __init__(self, server: kopf.WebhookServer, kube: Kube, configuration: str) -> None:
        self.server = server
        self.kube = kube
        self.configuration = configuration
        self.ca_bundle: str | None = None
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> CaBundleKeeper:
        await self.server.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
        await self.server.__aexit__(*exc)

    async def __call__(self, fn: kopf.WebhookFn) -> AsyncIterator[kopf.WebhookClientConfig]:
        async for client_config in self.server(fn):
            self.ca_bundle = client_config.get("caBundle")
            log.info("admission: serving validating webhooks over HTTPS on port %s",
                     self.server.port)
            if self.configuration and self.ca_bundle:
                self.changed.set()
                if self.task is None:
                    self.task = asyncio.create_task(self._keep())
            yield client_config

    async def _keep(self) -> None:
        failures = 0
        while True:
            self.changed.clear()
            try:
                await self.sync()
                failures = 0
                delay = RECHECK_SECONDS
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
                if failures in (0, len(RETRY_SECONDS)):
                    log.warning("admission: cannot write the caBundle of "
                                "ValidatingWebhookConfiguration %s (%s); retrying",
                                self.configuration, exc)
                failures += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=delay)

    async def sync(self) -> bool:
        """Write the caBundle into every webhook of the configuration that lacks it; True when
        something was written."""
        path = f"{VWC_PATH}/{self.configuration}"
        current = await self.kube.request("GET", path)
        if current is None:
            raise LookupError("not found: apply it from the chart (templates/admission.yaml)")
        stale = [w["name"] for w in current.get("webhooks") or []
                 if (w.get("clientConfig") or {}).get("caBundle") != self.ca_bundle]
        if not stale:
            return False
        patch = {"webhooks": [{"name": n, "clientConfig": {"caBundle": self.ca_bundle}}
                              for n in stale]}
        await self.kube.request("PATCH", path, patch, content_type=STRATEGIC)
        log.info("admission: caBundle of ValidatingWebhookConfiguration %s written (%s)",
                 self.configuration, ", ".join(stale))
        return True


def _server(options: AdmissionOptions, tmpdir: Path) -> kopf.WebhookServer:
    hostnames = options.hostnames()
    host = f"{options.service[1]}.{options.service[0]}.svc" if options.service else "localhost"
    if options.cert_dir is not None:
        d = options.cert_dir
        ca = d / "ca.crt"
        return kopf.WebhookServer(addr=options.addr, port=options.port, host=host,
                                  certfile=d / "tls.crt", pkeyfile=d / "tls.key",
                                  cafile=ca if ca.exists() else None)
    ca_pem, cert_pem, key_pem = make_self_signed(hostnames)
    for name, data in (("ca.crt", ca_pem), ("tls.crt", cert_pem), ("tls.key", key_pem)):
        path = tmpdir / name
        path.touch(mode=0o600)
        path.write_bytes(data)
    log.info("admission: self-signed certificate for %s", ", ".join(hostnames))
    return kopf.WebhookServer(addr=options.addr, port=options.port, host=host,
                              certfile=tmpdir / "tls.crt", pkeyfile=tmpdir / "tls.key",
                              cafile=tmpdir / "ca.crt")


def register(options: AdmissionOptions) -> None:
    """Register the validating handlers and the startup that sets up their HTTPS server.

    Only called when the webhooks are on: kopf refuses to start with admission handlers and no
    server configured."""
    global _state
    _state = _State(options=options)
    logging.getLogger("kopf.objects").addFilter(_QuietRefusals())

    kopf.on.validate(GROUP, VERSION, "pools", id=POOLS_ID,
                     operations=["CREATE", "UPDATE"])(validate_pool)
    kopf.on.validate(GROUP, VERSION, "subscriptions", id=SUBSCRIPTIONS_ID,
                     operations=["CREATE", "UPDATE"])(validate_subscription)

    @kopf.on.startup(id="admission-server")
    async def admission_startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        state = _state
        assert state is not None
        state.kube = await Kube.connect()
        state.tmpdir = Path(tempfile.mkdtemp(prefix="gpupool-admission-"))
        server = _server(state.options, state.tmpdir)
        state.server = CaBundleKeeper(server, state.kube, state.options.configuration)
        settings.admission.server = state.server
        settings.admission.managed = None  # the chart renders the configuration

    @kopf.on.cleanup(id="admission-cleanup")
    async def admission_cleanup(**_: Any) -> None:
        state = _state
        if state is None:
            return
        if state.kube is not None:
            await state.kube.close()
        if state.tmpdir is not None:
            shutil.rmtree(state.tmpdir, ignore_errors=True)
