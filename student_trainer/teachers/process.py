"""Start and stop a local teacher service (``python -m teacher_server``) as a child process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalTeacher:
    """A teacher service on a free loopback port; use as a context manager so it always stops.

    Args:
        model: anything ``retnet-teacher --model`` accepts.
        log_path: where the server's output goes.
        env: extra ``TEACHER_*`` settings.
        ready_timeout: seconds to wait for ``GET /ready`` (the first start converts the GGUF).
    """

    def __init__(self, model: str, log_path: Path, env: dict[str, str] | None = None, ready_timeout: float = 300,
                 port: int | None = None) -> None:
        self.model = model
        self.log_path = log_path
        self.env = env or {}
        self.ready_timeout = ready_timeout
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LocalTeacher":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "teacher_server", "--model", self.model, "--host", "127.0.0.1", "--port", str(self.port)],
            # The service drains and exits when this process is gone, even after a kill -9, so a killed
            # trainer or main job never leaves an orphaned teacher holding a port and memory.
            env={**os.environ, "TEACHER_PARENT_PID": str(os.getpid()), **self.env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the teacher service exited with code {self.proc.returncode}; its log ({self.log_path}) ends:\n"
                    + self.log()[-2000:]
                )
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"the teacher service was not ready after {self.ready_timeout}s; see {self.log_path}")

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (the server drains and exits 0), SIGKILL if it hangs."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
