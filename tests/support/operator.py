"""Run the real operator as a child process against the local control plane."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
LOG_DIR = Path(os.environ.get("GPUPOOL_TEST_LOGS", "/tmp/gpupool-test-logs"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ChildProcess:
    """A test's child process in its own session, logging to ``log_path``."""

    proc: subprocess.Popen[bytes] | None
    log_path: Path

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if it has not gone after 15 s."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class OperatorProcess(ChildProcess):
    """``gpupool operator`` in a subprocess, optionally under ``faketime``.

    Every log it writes stays under LOG_DIR so the key-leak test can read them all.
    """

    def __init__(self, kubeconfig: Path | str, name: str = "operator",
                 faketime: str | None = None, env: dict[str, str] | None = None,
                 namespaces: list[str] | None = None) -> None:
        self.kubeconfig = str(kubeconfig)
        self.name = name
        self.faketime = faketime
        self.env = env or {}
        self.namespaces = namespaces or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{name}-{os.getpid()}.log"

    def start(self, wait: bool = True) -> OperatorProcess:
        port = _free_port()
        cmd = [sys.executable, "-m", "gpupool", "operator",
               "--liveness", f"http://127.0.0.1:{port}/healthz"]
        for ns in self.namespaces:
            cmd += ["--namespace", ns]
        if self.faketime:
            cmd = ["faketime", "-f", self.faketime, *cmd]
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, "PYTHONUNBUFFERED": "1",
               "GPUPOOL_RESYNC_SECONDS": "30", **self.env}
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"--- start {self.starts} ---\n".encode())
        log.flush()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     cwd=ROOT, start_new_session=True)
        self.health = f"http://127.0.0.1:{port}/healthz"
        if wait:
            wait_for(self.healthy, timeout=60, interval=0.2,
                     message=lambda: f"operator healthy; log tail:\n{self.log_tail()}")
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"operator exited; log tail:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(self.health, timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: the operator dies at whatever line it is on."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()

