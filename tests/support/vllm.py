"""A real vLLM on the CPU for tests: start it, wait for /health, stop it.

Needs the venv that ``scripts/setup-vllm.sh`` makes (``$GPUPOOL_CACHE/vllm-venv``, default
``~/.cache/gpupool/vllm-venv``) and the tiny model ``scripts/make_tiny_model.py`` makes (made here
on first use, then cached in ``$GPUPOOL_CACHE/tiny-model``). Without the venv the fixtures skip,
unless ``GPUPOOL_REQUIRE_VLLM=1`` (CI that installed it), where they fail.

Use::

    def test_something(vllm_server: VllmServer) -> None:
        httpx.get(f"{vllm_server.base_url}/v1/models",
                  headers={"Authorization": f"Bearer {vllm_server.api_key}"})

``vllm_server`` is session-scoped: one vLLM (about a minute to start on 2 cores) serves every test
that asks for it. ``start_vllm(args, ...)`` starts one with any argument list.

The API key is generated per server and never printed: a failure message quotes vLLM's log with
the key masked.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
MAKE_TINY_MODEL = REPO / "scripts" / "make_tiny_model.py"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_SERVED_NAME = "tiny-llama"
# Seen: /health after 60-90 s on 2 cores; leave room for a busy machine.
START_DEADLINE_S = float(os.environ.get("GPUPOOL_VLLM_START_TIMEOUT", "420"))
STOP_DEADLINE_S = 30.0


def cache_dir() -> Path:
    return Path(os.environ.get("GPUPOOL_CACHE") or Path.home() / ".cache" / "gpupool")


def venv_python() -> Path:
    return cache_dir() / "vllm-venv" / "bin" / "python"


def vllm_available() -> bool:
    return venv_python().is_file()


def require_vllm() -> Path:
    """The vLLM venv's python, or skip (fail when ``GPUPOOL_REQUIRE_VLLM=1``) without it."""
    py = venv_python()
    if not py.is_file():
        msg = f"no vLLM venv at {py.parent.parent}: run scripts/setup-vllm.sh"
        if os.environ.get("GPUPOOL_REQUIRE_VLLM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return py


def tiny_model_dir() -> Path:
    """The tiny model's directory, made on first use (a few seconds) and cached after."""
    py = require_vllm()
    out = subprocess.run(
        [str(py), str(MAKE_TINY_MODEL)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_api_key() -> str:
    return "sk_internal_" + secrets.token_urlsafe(24)


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment vLLM runs in: offline, small KV cache, no usage reporting."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
    env.update({
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


@dataclass
class VllmServer:
    """A running vLLM. ``api_key`` is the key it requires on /v1 (None if it requires none)."""

    process: subprocess.Popen[bytes]
    port: int
    served_model_name: str | None
    api_key: str | None = field(repr=False)
    log_path: Path
    started_in_s: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, lines: int = 60) -> str:
        """The end of vLLM's output, with the API key masked."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        if self.api_key:
            text = text.replace(self.api_key, "***")
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Stop vLLM and its engine processes: its own process group, by the pid we started."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_DEADLINE_S)
        # Engine workers left in the group after the leader exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


def wait_healthy(server: VllmServer, deadline_s: float = START_DEADLINE_S) -> None:
    """Poll ``/health`` until it answers 200; fail early if vLLM exits, or at the deadline."""
    with httpx.Client(timeout=5.0) as client:
        def healthy() -> bool:
            if not server.alive():
                raise RuntimeError(
                    f"vLLM exited with {server.process.returncode} before /health answered:\n"
                    + server.log_tail())
            with contextlib.suppress(httpx.HTTPError):
                return client.get(f"{server.base_url}/health").status_code == 200
            return False

        wait_for(healthy, timeout=deadline_s, interval=0.5,
                 message=lambda: f"vLLM /health 200 within {deadline_s:.0f} s:\n"
                 + server.log_tail())


def start_vllm(
    args: Sequence[str],
    *,
    port: int,
    api_key: str | None = None,
    served_model_name: str | None = None,
    env: Mapping[str, str] | None = None,
    deadline_s: float = START_DEADLINE_S,
    wait: bool = True,
) -> VllmServer:
    """Start ``python -m vllm.entrypoints.openai.api_server ARGS`` from the cached venv.

    ``args`` are passed as they are (they must include ``--port PORT``, the same ``port``, for
    ``base_url`` to be right). ``api_key`` is only recorded for ``auth_headers``; pass it to vLLM
    yourself, in ``args`` (``--api-key``) or ``env`` (``VLLM_API_KEY``). Waits for ``/health``
    unless ``wait`` is false; on failure the process is stopped before raising.
    """
    py = require_vllm()
    fd, log_name = tempfile.mkstemp(prefix="gpupool-vllm-", suffix=".log")
    os.close(fd)
    log = Path(log_name)
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(py), "-m", SERVER_MODULE, *args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=server_env(env), cwd=tempfile.gettempdir(),
            start_new_session=True,  # its own process group: stop() ends vLLM and its engine
        )
    server = VllmServer(process=proc, port=port, served_model_name=served_model_name,
                        api_key=api_key, log_path=log)
    if wait:
        try:
            wait_healthy(server, deadline_s)
        except BaseException:
            server.stop()
            raise
        server.started_in_s = time.monotonic() - t0
        print(f"vLLM on port {port} healthy after {server.started_in_s:.1f} s", file=sys.stderr)
    return server


def default_args(
    model_dir: Path | str, served_model_name: str, port: int, api_key: str
) -> list[str]:
    return [
        "--model", str(model_dir),
        "--served-model-name", served_model_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--api-key", api_key,
        "--max-model-len", "256",
        "--dtype", "float32",
        # The gateway counts tokens from the usage in a stream's last chunk.
        "--enable-force-include-usage",
    ]


@contextlib.contextmanager
def running_vllm(served_model_name: str = DEFAULT_SERVED_NAME) -> Iterator[VllmServer]:
    """A tiny-model vLLM for the duration of the block."""
    model = tiny_model_dir()
    port = free_port()
    key = new_api_key()
    server = start_vllm(default_args(model, served_model_name, port, key), port=port,
                        api_key=key, served_model_name=served_model_name)
    try:
        yield server
    finally:
        server.stop()
        server.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def vllm_server() -> Iterator[VllmServer]:
    """One real vLLM serving the tiny model for the whole session (base_url, served_model_name,
    api_key, auth_headers)."""
    with running_vllm() as server:
        yield server
