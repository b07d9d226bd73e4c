"""Where the API server is and how to authenticate to it: the in-cluster ServiceAccount, or a
kubeconfig (``$KUBECONFIG``, else ``~/.kube/config``).

Small on purpose: the operator talks to the API server over plain aiohttp, so it does not load a
generated client library (about 60 MB of imports) just to read its configuration. Supported:
CA file or data, client certificate and key (file or data), bearer token or token file, basic
auth, ``insecure-skip-tls-verify``, and ``exec`` credential plugins that return a token.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD_SECONDS = 60.0
"""A projected ServiceAccount token is rotated by the kubelet; its file is read again this often."""


class ConfigError(Exception):
    """No usable cluster configuration."""


@dataclass
class Connection:
    server: str
    ssl_context: ssl.SSLContext | bool
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    basic: tuple[str, str] | None = field(default=None, repr=False)
    exec_config: dict[str, Any] | None = field(default=None, repr=False)
    _read_at: float = 0.0
    _expires_at: float = float("inf")

    def authorization(self) -> str | None:
        """The Authorization header value, refreshed from its source when due."""
        now = time.monotonic()
        if self.token_file and now - self._read_at > TOKEN_REREAD_SECONDS:
            self.token = Path(self.token_file).read_text().strip()
            self._read_at = now
        if self.exec_config is not None and (self.token is None or now >= self._expires_at):
            self.token, self._expires_at = _run_exec(self.exec_config)
        if self.token:
            return f"Bearer {self.token}"
        if self.basic:
            raw = f"{self.basic[0]}:{self.basic[1]}".encode()
            return f"Basic {base64.b64encode(raw).decode()}"
        return None

    def expire(self) -> None:
        """The API server refused the credentials (401): fetch them again before the next use."""
        self._read_at = 0.0
        self._expires_at = 0.0


def load(kubeconfig: str | None = None, context: str | None = None) -> Connection:
    """The in-cluster ServiceAccount when running in a pod (and no kubeconfig is named), else
    the kubeconfig's current (or named) context."""
    if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST") \
            and (SA_DIR / "token").exists():
        return in_cluster()
    return from_kubeconfig(kubeconfig, context)


def in_cluster() -> Connection:
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"
    ctx = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
    return Connection(server=f"https://{host}:{port}", ssl_context=ctx,
                      token_file=str(SA_DIR / "token"))


def from_kubeconfig(path: str | None = None, context: str | None = None) -> Connection:
    paths = [p for p in (path or os.environ.get("KUBECONFIG", "")).split(os.pathsep) if p]
    if not paths:
        paths = [str(Path("~/.kube/config").expanduser())]
    merged: dict[str, Any] = {"contexts": {}, "clusters": {}, "users": {}}
    current = None
    base_dir = Path(paths[0]).expanduser().parent
    for p in paths:
        file = Path(p).expanduser()
        if not file.exists():
            continue
        doc = yaml.safe_load(file.read_text()) or {}
        current = current or doc.get("current-context")
        for kind in ("contexts", "clusters", "users"):
            for item in doc.get(kind) or []:
                merged[kind].setdefault(item.get("name"), item.get(kind[:-1]) or {})
    name = context or current
    if not name or name not in merged["contexts"]:
        raise ConfigError(f"kubeconfig {':'.join(paths)}: no context {name!r} (and not running "
                          "in a pod)")
    ctx = merged["contexts"][name]
    cluster = merged["clusters"].get(ctx.get("cluster"))
    if cluster is None or not cluster.get("server"):
        raise ConfigError(f"kubeconfig context {name!r}: cluster {ctx.get('cluster')!r} has no "
                          "server")
    user = merged["users"].get(ctx.get("user")) or {}
    return Connection(
        server=str(cluster["server"]).rstrip("/"),
        ssl_context=_ssl_context(cluster, user, base_dir),
        token=user.get("token"),
        token_file=_resolve(user.get("tokenFile"), base_dir),
        basic=(user["username"], user.get("password", "")) if user.get("username") else None,
        exec_config=user.get("exec"))


def _resolve(path: str | None, base: Path) -> str | None:
    if not path:
        return None
    return str((base / Path(path).expanduser()).resolve())


def _ssl_context(cluster: dict[str, Any], user: dict[str, Any],
                 base: Path) -> ssl.SSLContext | bool:
    if not str(cluster["server"]).startswith("https"):
        return False
    if cluster.get("insecure-skip-tls-verify"):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif cluster.get("certificate-authority-data"):
        ctx = ssl.create_default_context(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
    elif cluster.get("certificate-authority"):
        ctx = ssl.create_default_context(cafile=_resolve(cluster["certificate-authority"], base))
    else:
        ctx = ssl.create_default_context()
    cert = _pem(user, "client-certificate", base)
    key = _pem(user, "client-key", base)
    if cert and key:
        # ssl loads a certificate chain from files only: a private, short-lived temporary one.
        with tempfile.TemporaryDirectory(prefix="gpupool-kubeconfig-") as tmp:
            cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert_path.write_bytes(cert)
            key_path.touch(mode=0o600)
            key_path.write_bytes(key)
            ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx


def _pem(user: dict[str, Any], name: str, base: Path) -> bytes | None:
    if user.get(f"{name}-data"):
        return base64.b64decode(user[f"{name}-data"])
    path = _resolve(user.get(name), base)
    return Path(path).read_bytes() if path else None


def _run_exec(spec: dict[str, Any]) -> tuple[str, float]:
    """A token from an ``exec`` credential plugin, and until when (monotonic) it holds."""
    env = dict(os.environ)
    env.update({e["name"]: e["value"] for e in spec.get("env") or []})
    env["KUBERNETES_EXEC_INFO"] = json.dumps({
        "apiVersion": spec.get("apiVersion", "client.authentication.k8s.io/v1"),
        "kind": "ExecCredential", "spec": {"interactive": False}})
    try:
        out = subprocess.run([spec["command"], *(spec.get("args") or [])], env=env,
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigError(f"kubeconfig exec plugin {spec.get('command')!r} failed: "
                          f"{type(exc).__name__}") from None
    status = (json.loads(out) or {}).get("status") or {}
    if not status.get("token"):
        raise ConfigError(f"kubeconfig exec plugin {spec.get('command')!r} returned no token "
                          "(client certificates from exec plugins are not supported)")
    expires = float("inf")
    if status.get("expirationTimestamp"):
        at = datetime.fromisoformat(str(status["expirationTimestamp"]).replace("Z", "+00:00"))
        expires = time.monotonic() + max(0.0, at.timestamp() - time.time() - 30)
    return str(status["token"]), expires
