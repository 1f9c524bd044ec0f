"""A real `digitkit serve` process on 127.0.0.1 for tests: started, waited for, and stopped."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)


@contextlib.contextmanager
def serve(model: Path | str, tmp: Path, *args: str, env: dict[str, str] | None = None,
          threads: int = 1, max_fds: int | None = None) -> Iterator[Server]:  # fmt: skip
    """Run `digitkit serve --model MODEL ARGS...` on a free port until the block ends (SIGTERM, then SIGKILL);
    `max_fds` sets the process's file-descriptor limit (soft and hard, as `ulimit -n` would)."""
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    full_env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
    cmd = [sys.executable, "-m", "digitkit", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), *args]  # fmt: skip
    with open(log_path, "wb") as log:
        limit = None if max_fds is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (max_fds, max_fds))
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, preexec_fn=limit)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_ready(server)
        yield server
    finally:
        stop(proc)


def wait_ready(server: Server, timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s:\n{server.log()}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
