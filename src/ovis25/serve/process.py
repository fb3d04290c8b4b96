"""`ovis25 serve` in a child process on a free loopback port: for load tests, smoke tests and supervisors
that need the real command (its signals, exit status and memory of its own), not an app in a thread.

    with ServerProcess(model_dir, "--max-batch", "8") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused")
        ...
        server.rss_mb(), server.health()
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_SRC = Path(__file__).resolve().parents[2]  # the directory that holds the ovis25 package


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: str | Path, *args: str, startup_timeout: float = 120.0,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.command = [sys.executable, "-m", "ovis25", "serve", str(model_dir), "--port", str(self.port), *args]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_SRC), os.environ.get(
            "PYTHONPATH")])), **(env or {})}
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        # A file, not a pipe: a pipe nobody reads fills up and then blocks the server's logging.
        self._log = tempfile.TemporaryFile(mode="w+")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "ServerProcess":
        """Start the process and wait until /health answers."""
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the server did not answer /health within {self.startup_timeout:g} s:\n"
                                   f"{self.log_tail()}")
            try:
                self.health()
                return self
            except OSError:
                time.sleep(0.1)

    def health(self, timeout: float = 10.0) -> dict:
        """GET /health -> its JSON ({"status": "ok", "requests": held}); raises OSError if nobody answers."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise OSError(f"/health answered {response.status}")
        return json.loads(body)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until the server holds no request (finished or aborted)."""
        deadline = time.monotonic() + timeout
        while self.health()["requests"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server still holds requests after {timeout:g} s")
            time.sleep(0.05)

    def rss_mb(self) -> float:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise OSError("no VmRSS in /proc status")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send `sig` and wait for the exit status (killed if it does not come within `timeout`)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-chars:]

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.close()
