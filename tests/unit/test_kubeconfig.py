"""gpupool.kubeconfig: contexts, credentials and their refresh, without a cluster."""

from __future__ import annotations

import base64
import ssl
import sys
from pathlib import Path

import pytest
import yaml

from gpupool import kubeconfig


def _write(tmp_path: Path, users: list[dict[str, object]], current: str = "a",
           server: str = "https://127.0.0.1:6443") -> Path:
    doc = {
        "current-context": current,
        "clusters": [{"name": "c", "cluster": {"server": server,
                                                "insecure-skip-tls-verify": True}}],
        "contexts": [{"name": u["name"], "context": {"cluster": "c", "user": u["name"]}}
                     for u in users],
        "users": users,
    }
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_current_context_token(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"name": "a", "user": {"token": "t-a"}},
                             {"name": "b", "user": {"token": "t-b"}}])
    conn = kubeconfig.from_kubeconfig(str(path))
    assert conn.server == "https://127.0.0.1:6443"
    assert conn.authorization() == "Bearer t-a"
    assert isinstance(conn.ssl_context, ssl.SSLContext)
    assert conn.ssl_context.verify_mode == ssl.CERT_NONE
    assert kubeconfig.from_kubeconfig(str(path), "b").authorization() == "Bearer t-b"


def test_token_never_in_repr(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"name": "a", "user": {"token": "very-secret-token"}}])
    assert "very-secret-token" not in repr(kubeconfig.from_kubeconfig(str(path)))


def test_missing_context_is_a_clear_error(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"name": "a", "user": {}}])
    with pytest.raises(kubeconfig.ConfigError, match="no context 'zz'"):
        kubeconfig.from_kubeconfig(str(path), "zz")


def test_token_file_is_read_again_after_expire(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("one\n")
    path = _write(tmp_path, [{"name": "a", "user": {"tokenFile": "token"}}])
    conn = kubeconfig.from_kubeconfig(str(path))
    assert conn.authorization() == "Bearer one"
    token.write_text("two\n")
    assert conn.authorization() == "Bearer one"  # cached until due
    conn.expire()
    assert conn.authorization() == "Bearer two"


def test_basic_auth(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"name": "a", "user": {"username": "u", "password": "p"}}])
    expected = "Basic " + base64.b64encode(b"u:p").decode()
    assert kubeconfig.from_kubeconfig(str(path)).authorization() == expected


def test_exec_plugin_token(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "import json, os\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', "
        "'kind': 'ExecCredential', 'status': {'token': 'from-' + os.environ['WHO'], "
        "'expirationTimestamp': '2099-01-01T00:00:00Z'}}))\n")
    path = _write(tmp_path, [{"name": "a", "user": {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
        "args": [str(plugin)], "env": [{"name": "WHO", "value": "plugin"}]}}}])
    assert kubeconfig.from_kubeconfig(str(path)).authorization() == "Bearer from-plugin"


def test_exec_plugin_failure_names_the_command(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"name": "a", "user": {"exec": {"command": "/nonexistent/x"}}}])
    with pytest.raises(kubeconfig.ConfigError, match="/nonexistent/x"):
        kubeconfig.from_kubeconfig(str(path)).authorization()


def test_plain_http_has_no_tls(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"name": "a", "user": {}}], server="http://localhost:8080")
    conn = kubeconfig.from_kubeconfig(str(path))
    assert conn.ssl_context is False
    assert conn.authorization() is None
