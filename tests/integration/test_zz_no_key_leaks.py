"""No API key leaks: runs last in the integration suite (by name) and looks for every key in
what the suite left behind.

Keys looked for:
- every key that exists now: the ``apiKey`` of each Secret labelled ``gpupool.dev/kind`` in
  (api-key, upstream-key), and the values of each pool's open-keys Secret; each is also looked for
  without its prefix and base64-encoded (the form a dumped Secret would carry);
- every key that ever existed, deleted or rotated ones included: anything shaped like one, the
  ``sk_pool_`` prefix followed by key characters, plain or base64-encoded.

Places looked in:
- (a) every file under ``support.operator.LOG_DIR`` (each operator process's log);
- (b) every Event in every namespace (message, reason and the rest of it);
- (c) every Pool and Subscription in every namespace (spec, status, metadata), and, as they are
  just as readable, every ConfigMap, Deployment and Pod.
Captured pytest output and the API server's own logs are out of scope. Objects in namespaces
that earlier tests already deleted are gone; their operators' logs are not.

A finding names the place and the key's id (``keyId``, the pool of an upstream key, or a
SHA-256 prefix), never the key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from gpupool import keys
from support.kube import raw
from support.objects import Objects, pool_body, sub_body
from support.operator import LOG_DIR

pytestmark = pytest.mark.integration

PREFIX = keys.KEY_PREFIX
KEY_CHARS = "A-Za-z0-9_-"  # secrets.token_urlsafe
# A key's prefix then at least 12 key characters: longer than any masked form worth allowing.
SHAPED = re.compile(rf"{re.escape(PREFIX)}[{KEY_CHARS}]{{12,}}")
# base64 of text starting with the prefix: "sk_poo" encodes to c2tfcG9v, "l_" to bF..
SHAPED_B64 = re.compile(r"c2tfcG9vbF[A-Za-z0-9+/]{16,}")
KINDS = ("api-key", "upstream-key")


def fingerprint(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass
class Finding:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class Scanner:
    """Finds known keys (and anything shaped like a key) in text; reports ids, never keys."""

    known: dict[str, str] = field(default_factory=dict, repr=False)
    """key -> a printable id for it (never in a repr, so never in a failure message)."""
    _needles: list[tuple[str, str]] = field(default_factory=list, repr=False)

    def add(self, key: str, label: str) -> None:
        if not key or key in self.known:
            return
        self.known[key] = label
        body = key[len(PREFIX):] if key.startswith(PREFIX) else key
        self._needles.append((key, label))
        if len(body) >= 16:
            self._needles.append((body, f"{label} (without its prefix)"))
        self._needles.append((base64.b64encode(key.encode()).decode().rstrip("="),
                              f"{label} (base64)"))

    def label_of(self, candidate: str) -> str:
        for key, label in self.known.items():
            if key in candidate or candidate in key:
                return label
        return f"an unknown (deleted?) key {fingerprint(candidate)}"

    def scan(self, text: str, where: str) -> list[Finding]:
        found: dict[str, Finding] = {}
        for needle, label in self._needles:
            if needle in text:
                found.setdefault(label, Finding(where, label))
        for match in SHAPED.finditer(text):
            label = self.label_of(match.group())
            found.setdefault(label, Finding(where, label))
        for match in SHAPED_B64.finditer(text):
            decoded = SHAPED.match(_b64_prefix(match.group()))
            if decoded:
                label = f"{self.label_of(decoded.group())} (base64)"
                found.setdefault(label, Finding(where, label))
        return list(found.values())

    def scan_files(self, root: Path) -> tuple[int, list[Finding]]:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        findings: list[Finding] = []
        for path in files:
            findings += self.scan(path.read_bytes().decode("utf-8", errors="replace"),
                                  f"file {path}")
        return len(files), findings


def _b64_prefix(text: str) -> str:
    usable = text[: len(text) - len(text) % 4]
    try:
        return base64.b64decode(usable).decode("utf-8", errors="replace")
    except ValueError:
        return ""


def _decode(value: str | None) -> str:
    return base64.b64decode(value or "").decode("utf-8", errors="replace")


def _list(api_client: client.ApiClient, path: str, **query: str) -> Iterator[dict[str, Any]]:
    """Every item of a cluster-wide list, page by page."""
    cont = ""
    while True:
        page = raw(api_client).get(path, limit="500", **({"continue": cont} if cont else {}),
                                   **query)
        yield from page.get("items") or []
        cont = (page.get("metadata") or {}).get("continue") or ""
        if not cont:
            return


def collect_keys(api_client: client.ApiClient) -> Scanner:
    scanner = Scanner()
    selector = f"gpupool.dev/kind in ({','.join(KINDS)})"
    for secret in _list(api_client, "/api/v1/secrets", labelSelector=selector):
        meta = secret["metadata"]
        data = secret.get("data") or {}
        kind = (meta.get("labels") or {}).get("gpupool.dev/kind")
        if kind == "api-key":
            label = f"key {_decode(data.get('keyId')) or meta['name']}"
        else:
            label = f"upstream key of pool {meta['namespace']}/" + \
                    (meta.get("labels") or {}).get("gpupool.dev/pool", meta["name"])
        scanner.add(_decode(data.get("apiKey")), label)
    for secret in _list(api_client, "/api/v1/secrets", labelSelector="gpupool.dev/kind=open-keys"):
        for client_id, value in (secret.get("data") or {}).items():
            scanner.add(_decode(value), f"key {client_id}")
    return scanner


def scan_objects(scanner: Scanner, api_client: client.ApiClient,
                 kinds: Iterable[tuple[str, str]]) -> tuple[int, list[Finding]]:
    count, findings = 0, []
    for kind, path in kinds:
        for obj in _list(api_client, path):
            count += 1
            meta = obj.get("metadata") or {}
            findings += scanner.scan(json.dumps(obj), f"{kind} {meta.get('namespace')}/"
                                                      f"{meta.get('name')}")
    return count, findings


OBJECTS = [
    ("Event", "/api/v1/events"),
    ("Pool", "/apis/gpupool.dev/v1alpha1/pools"),
    ("Subscription", "/apis/gpupool.dev/v1alpha1/subscriptions"),
    ("ConfigMap", "/api/v1/configmaps"),
    ("Deployment", "/apis/apps/v1/deployments"),
    ("Pod", "/api/v1/pods"),
]


def test_the_scanner_finds_a_planted_key_and_never_prints_it(tmp_path: Path) -> None:
    known, unknown = keys.mint_key(), keys.mint_key()
    scanner = Scanner()
    scanner.add(known, "key key_planted")
    (tmp_path / "nested").mkdir()
    (tmp_path / "clean.log").write_text("INFO all quiet; key key_planted opened\n")
    (tmp_path / "nested" / "op.log").write_text(
        f"INFO minted {known}\nDEBUG body {{'data': {{'apiKey': "
        f"'{base64.b64encode(unknown.encode()).decode()}'}}}}\n"
        f"WARN retried with {unknown[len(PREFIX):]}... and {unknown}\n")
    count, findings = scanner.scan_files(tmp_path)
    assert count == 2
    report = "\n".join(map(str, findings))
    assert all("nested/op.log" in f.where for f in findings), report
    assert "key key_planted" in report
    assert f"an unknown (deleted?) key {fingerprint(unknown)}" in report
    assert f"{fingerprint(unknown)} (base64)" in report
    assert known not in report and unknown not in report
    assert known[len(PREFIX):] not in report and unknown[len(PREFIX):] not in report
    # The known key is also caught without its prefix and base64-encoded.
    for text in (known[len(PREFIX):], base64.b64encode(known.encode()).decode()):
        assert [str(f) for f in scanner.scan(f"x {text} y", "here")] != []
    # Masked forms and the bare prefix are not keys.
    assert scanner.scan("keys look like sk_pool_... or sk_pool_AbC1", "docs") == []


def test_no_key_in_logs_events_statuses_or_specs(kube: client.ApiClient, objs: Objects) -> None:
    # One key of this test's own, so the collector has something it must find.
    objs.create(pool_body("leakcheck", seats=1))
    objs.create(sub_body("leakcheck", "leakcheck", ["asia", "europe", "americas"]))
    sub = objs.wait_phase("subscriptions", "leakcheck", "active", timeout=60)
    scanner = collect_keys(kube)
    own = fingerprint((objs.secret_data(sub["status"]["keySecretName"]) or {}).get("apiKey", ""))
    collected = {fingerprint(k) for k in scanner.known}
    assert own in collected, "the collector missed a key that exists"
    assert any(label.startswith("upstream key of pool") for label in scanner.known.values())

    files, in_logs = scanner.scan_files(LOG_DIR)
    objects, in_objects = scan_objects(scanner, kube, OBJECTS)
    findings = in_logs + in_objects
    assert not findings, (
        f"{len(findings)} key leak(s) in {files} log file(s) under {LOG_DIR} and {objects} "
        f"object(s) checked for {len(scanner.known)} key(s):\n"
        + "\n".join(f"  {f}" for f in findings[:50]))
    assert files >= 1, f"no operator log under {LOG_DIR}"
