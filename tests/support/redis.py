"""A throwaway Debian ``redis-server`` on a free loopback port.

``start_redis()`` is a context manager yielding a :class:`RedisServer` (``url``); the
``redis_server`` fixture (module scope) wraps it. ``redis-server`` comes from Debian
(``scripts/setup.sh`` installs it); without it the fixture fails and says so, unless
``GPUPOOL_ALLOW_NO_REDIS=1``, where it skips.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.waiting import wait_for

START_DEADLINE_S = 15.0


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.workdir / "redis.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def redis_binary() -> str | None:
    return shutil.which("redis-server")


@contextlib.contextmanager
def start_redis() -> Iterator[RedisServer]:
    binary = redis_binary()
    if binary is None:
        msg = "redis-server not found: run scripts/setup.sh (apt-get install -y redis-server)"
        if os.environ.get("GPUPOOL_ALLOW_NO_REDIS") == "1":
            pytest.skip(msg)
        pytest.fail(msg)
    workdir = Path(tempfile.mkdtemp(prefix="gpupool-redis-"))
    port = _free_port()
    with (workdir / "redis.log").open("wb") as log:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no",
             "--protected-mode", "yes", "--maxclients", "2000"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = RedisServer(proc, port, workdir)
    try:
        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}:\n"
                                   + server.log_tail())
            return _ping(port)

        wait_for(answers, timeout=START_DEADLINE_S, interval=0.05,
                 message=lambda: "redis-server did not answer PING:\n" + server.log_tail())
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with start_redis() as server:
        yield server
